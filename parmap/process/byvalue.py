"""Functions of ``__main__`` sent by value, without cloudpickle.

A worker started by spawn or forkserver never runs the caller's ``__main__``, and a
forked one has it as it was when the worker started: a function defined in a script or
a notebook must travel by value. cloudpickle does that, but importing it costs ~20 ms
(``dataclasses``, ``inspect``, ``logging``...), which nearly every script paid on its
first parallel call, for the one function it defines. This module sends such functions
the way cloudpickle does, for what a script's functions are made of:

* the code object, by ``marshal`` (the workers run this same interpreter);
* the globals its code names (``LOAD_GLOBAL`` and the like, read with ``dis``), looked up
  now, so a global changed between two calls is seen; functions of the same module in
  one message share one globals dict, as cloudpickle's do;
* defaults, keyword defaults, closure cells, ``__qualname__``, ``__doc__``,
  ``__annotations__`` and attributes;
* modules named by those globals, by name (``import numpy as np``: ``np``), and the
  loaded submodules the code reaches through them (``xml.dom.minidom``), which the
  worker imports too;
* methods bound to an object, with the function by value (:func:`bind`);
* ``functools.lru_cache``/``cache`` wrappers of such functions, as a cache of the same
  size around the function by value, kept in each worker, one per cache of the caller's
  (:func:`cached`: a forked worker uses the one it inherited; by reference, as
  cloudpickle sends them, the worker looks the name up in a ``__main__`` that does not
  have it).

:class:`ImportablePickler` raises for what this does not cover (a class defined in
``__main__`` and whatever else names ``__main__`` as its module, a module that is not
importable by its name, one ``cloudpickle.register_pickle_by_value`` names), and the
request then goes through :func:`cloud_pickler`: cloudpickle, with the functions of
``__main__`` still sent as here (their frames keep the script's file and line).
"""
from __future__ import annotations

import builtins
import functools
import importlib
import marshal
import os
import pickle
import sys
import types
import weakref
from collections import OrderedDict
from itertools import chain, count
from typing import Any, Callable

__all__ = ["ImportablePickler", "cloud_pickler", "reduce_function", "module_base",
           "module_name", "registered_by_value", "bind", "cached", "token_main_caches",
           "unpickle"]

#: the globals an instruction of these kinds names: what cloudpickle sends too
_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL"})
#: what a module's globals dict of the caller shares with its rebuilt functions
_MODULE_KEYS = ("__package__", "__name__", "__path__", "__file__")

_names_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _ByValue(Exception):
    """Raised by ImportablePickler for an object a worker might not be able to import."""


_CONTAINERS = frozenset({tuple, list, dict, set, frozenset})
_LRU_CACHE = type(functools.lru_cache(maxsize=None)(len))


class _SharedGlobals:
    def _base_globals(self, known: dict) -> dict:
        """One base dict per module's globals in a message (pickle then sends it once,
        and the functions of that module share it in the worker, as in the caller)."""
        bases: dict[int, tuple[dict, dict]] | None = getattr(self, "_bases", None)
        if bases is None:
            bases = {}
            self._bases = bases
        entry = bases.get(id(known))
        if entry is None:  # (known is kept in the entry: its id stays its own)
            entry = bases[id(known)] = (known, module_base(known))
        return entry[1]


def _reduce_main(obj: Any, base_globals: Callable[[dict], dict]) -> tuple | None:
    """The reduce tuple of a function of ``__main__``, a method bound to one (plain
    pickle: by its name), or an lru_cache of one; None for anything else."""
    if isinstance(obj, types.FunctionType):
        return reduce_function(obj, base_globals) if obj.__module__ == "__main__" else None
    if isinstance(obj, types.MethodType):
        return (bind, (obj.__func__, obj.__self__)) \
            if getattr(obj.__func__, "__module__", None) == "__main__" else None
    return _reduce_cache(obj)


def _reduce_cache(obj: Any) -> tuple | None:
    if type(obj) is _LRU_CACHE:
        func = getattr(obj, "__wrapped__", None)
        if isinstance(func, types.FunctionType) and func.__module__ == "__main__":
            parameters = obj.cache_parameters()
            return cached, (_token(obj), func, parameters["maxsize"], parameters["typed"])
    return None


#: each cache of the caller's that went to workers -> its token there, (pid, serial):
#: a worker keeps one cache per token (``cached``), so two caches of the caller never
#: share one (two made by one factory, around closures of different cells, say)
_cache_tokens: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_cache_serials = count()


def _token(cache: Any) -> tuple:
    # (setdefault: two threads pickling one cache at once get one token)
    token: tuple = _cache_tokens.setdefault(cache, (os.getpid(), next(_cache_serials)))
    return token


def token_main_caches() -> None:
    """Before workers are forked: give a token to each cache ``__main__`` holds, so that
    a forked worker knows the caches it inherited by the tokens they arrive with (see
    ``cached``). A cache made or rebound after the fork gets a token they do not have."""
    main = sys.modules.get("__main__")
    for value in list(getattr(main, "__dict__", {}).values()):
        if type(value) is _LRU_CACHE and \
                getattr(getattr(value, "__wrapped__", None), "__module__", None) == "__main__":
            _token(value)


class ImportablePickler(_SharedGlobals, pickle.Pickler):
    """Plain pickle, with the functions of ``__main__`` by value (a worker started with
    spawn or forkserver does not run ``__main__``, and a forked one lacks whatever was
    defined after it started), their bound methods and caches as such, and modules by
    name. It refuses whatever else claims ``__main__`` as its module (its classes, their
    instances, a ``TypeVar`` made there: plain pickle would name them ``__main__.X``),
    modules a worker cannot import by name, and what ``cloudpickle.register_pickle_by_
    value`` names; lambdas and closures of other modules plain pickle refuses itself.
    (The checks of :func:`_reduce_main` are written out here: this runs for every
    object of a request that is not a container or a number or string.)"""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) in _CONTAINERS:  # the most common by far: no question to ask
            return NotImplemented
        if isinstance(obj, types.FunctionType):
            module = obj.__module__
            if module == "__main__":
                return reduce_function(obj, self._base_globals)
            if registered_by_value(module):
                raise _ByValue(obj)
        elif isinstance(obj, types.MethodType):
            if getattr(obj.__func__, "__module__", None) == "__main__":
                return bind, (obj.__func__, obj.__self__)  # (plain: by its name)
        elif isinstance(obj, types.ModuleType):
            name = module_name(obj)
            if name is None or registered_by_value(name):
                raise _ByValue(obj)
            return importlib.import_module, (name,)
        elif getattr(obj, "__module__", None) == "__main__":
            reduced = _reduce_cache(obj)
            if reduced is None:
                raise _ByValue(obj)
            return reduced
        return NotImplemented


_cloud_pickler: list[type] = []


def cloud_pickler() -> type:
    """cloudpickle's Pickler, made to send what :func:`_reduce_main` covers as
    :class:`ImportablePickler` does (made once: importing cloudpickle costs ~20 ms)."""
    if not _cloud_pickler:
        import cloudpickle

        class CloudPickler(_SharedGlobals, cloudpickle.Pickler):
            def reducer_override(self, obj: Any) -> Any:
                reduced = _reduce_main(obj, self._base_globals)
                return super().reducer_override(obj) if reduced is None else reduced

        _cloud_pickler.append(CloudPickler)
    return _cloud_pickler[0]


def reduce_function(func: types.FunctionType, base_globals: Callable[[dict], dict]) -> tuple:
    """The reduce tuple of ``func`` (for ``Pickler.reducer_override``). ``base_globals``
    maps the caller's globals dict to the one dict that the functions of one message
    share (made by :func:`module_base`)."""
    known = func.__globals__
    used = {name: known[name] for name in _global_names(func.__code__) if name in known}
    closure = func.__closure__
    cells = None if closure is None else tuple(_cell_value(cell) for cell in closure)
    # packages' submodules the code reaches as attributes (``xml.dom.minidom``): the
    # worker imports them as it unpickles the state (as cloudpickle does)
    submodules = _submodules(func.__code__, chain(used.values(),
                                                  (v for full, v in cells or () if full)))
    state = (used, func.__defaults__, func.__kwdefaults__, cells, func.__qualname__,
             func.__module__, func.__doc__, func.__dict__ or None,
             getattr(func, "__annotations__", None) or None, submodules)
    return (_rebuild, (marshal.dumps(func.__code__), base_globals(known), func.__name__,
                       -1 if closure is None else len(closure)), state, None, None,
            _set_state)


def module_base(known: dict) -> dict:
    """A fresh base globals dict for the functions of the module whose globals are
    ``known``: its name and file, as cloudpickle's."""
    return {key: known[key] for key in _MODULE_KEYS if key in known}


def module_name(module: types.ModuleType) -> str | None:
    """The name a worker imports ``module`` by, or None when it cannot (``__main__``,
    a module made at run time and not in ``sys.modules``)."""
    name = getattr(module, "__name__", None)
    if not isinstance(name, str) or name == "__main__" or sys.modules.get(name) is not module:
        return None
    return name


def registered_by_value(name: Any) -> bool:
    """Whether ``cloudpickle.register_pickle_by_value`` names module ``name`` (or a
    package of it): such a module is sent by value, through cloudpickle."""
    registry = getattr(sys.modules.get("cloudpickle.cloudpickle"), "_PICKLE_BY_VALUE_MODULES",
                       None)
    if not registry or not isinstance(name, str):
        return False
    return any(name == m or name.startswith(m + ".") for m in registry)


def _global_names(code: types.CodeType) -> frozenset[str]:
    names = _names_cache.get(code)
    if names is None:
        import dis  # stdlib, ~2 ms: only once a function of __main__ is sent

        found: set[str] = set()
        stack = [code]
        while stack:
            current = stack.pop()
            found.update(ins.argval for ins in dis.get_instructions(current)
                         if ins.opname in _GLOBAL_OPS)
            stack += [c for c in current.co_consts if isinstance(c, types.CodeType)]
        names = _names_cache[code] = frozenset(found)
    return names


def _all_names(code: types.CodeType) -> set[str]:
    names: set[str] = set()
    stack = [code]
    while stack:
        current = stack.pop()
        names.update(current.co_names)
        stack += [c for c in current.co_consts if isinstance(c, types.CodeType)]
    return names


def _submodules(code: types.CodeType, values: Any) -> tuple | None:
    """The loaded submodules of the packages among ``values`` that the code reaches as
    attributes (``xml.dom.minidom``), as cloudpickle's ``_find_imported_submodules``."""
    found = []
    names = None
    for value in values:
        if isinstance(value, types.ModuleType) and getattr(value, "__package__", None):
            prefix = value.__name__ + "."
            for name in list(sys.modules):
                if name.startswith(prefix):
                    names = _all_names(code) if names is None else names
                    if set(name[len(prefix):].split(".")) <= names:
                        found.append(sys.modules[name])
    return tuple(found) or None


def _cell_value(cell: Any) -> tuple:
    try:
        return (True, cell.cell_contents)
    except ValueError:  # an empty cell (a variable not yet assigned)
        return (False, None)


# --------------------------------------------------------------------------- in the worker

def bind(func: Callable, obj: Any) -> types.MethodType:
    """A method of ``obj`` (``types.MethodType`` itself cannot be pickled by name)."""
    return types.MethodType(func, obj)


#: the caches made here, by the token of the caller's cache (see ``_reduce_cache``): one
#: per cache of the caller's, not one per batch; with each, where its calls go (the
#: function as the latest batch sent it). The least recently sent go beyond
#: ``KEPT_CACHES`` (a caller that makes a new cache for every task would fill the
#: worker's memory with them otherwise; one dropped and sent again starts empty)
_caches: OrderedDict[tuple, tuple[Any, list[types.FunctionType] | None]] = OrderedDict()
KEPT_CACHES = 16


def cached(token: tuple, func: types.FunctionType, maxsize: int | None, typed: bool
           ) -> Any:
    """This worker's cache of the caller's cache ``token`` around ``func``: made for the
    first batch that sends it and kept for the next ones (a "load once" function then
    loads once per worker). Its misses run ``func`` as the latest batch sent it, so with
    the globals, cells and defaults the caller had then, as the caller's own cache does
    for its misses; a result it holds stays, as in the caller's.

    A forked worker uses the caller's cache itself where it inherited it (found by its
    token, ``token_main_caches``): what the caller cached before the fork stays cached,
    and a task may return it (pickled by name). Its function, the worker's copy, is
    brought to the state the batch sent once the request is unpickled
    (``unpickle``; not before: a function's state comes after the function)."""
    entry = _caches.get(token)
    if entry is None:
        inherited = None if token[0] == os.getpid() else \
            next((cache for cache, t in list(_cache_tokens.items()) if t == token), None)
        if inherited is not None:
            entry = _caches[token] = (inherited, None)
        else:
            calls = [func]
            entry = _caches[token] = (functools.lru_cache(maxsize=maxsize, typed=typed)(
                lambda *args, **kwargs: calls[0](*args, **kwargs)), calls)
        if len(_caches) > KEPT_CACHES:
            _caches.popitem(last=False)
    else:
        _caches.move_to_end(token)
    cache: Any = entry[0]
    latest = entry[1]
    if latest is None:
        _to_refresh.append((cache.__wrapped__, func))
    else:
        latest[0] = func
        functools.update_wrapper(cache, func)  # its name, doc and __wrapped__: func's
    return cache


#: (inherited function, the function as a batch sent it), until its request is loaded
_to_refresh: list[tuple[types.FunctionType, types.FunctionType]] = []


def unpickle(data: bytes) -> Any:
    """``pickle.loads`` of a request, in a worker; then, if it loaded, the inherited
    caches' functions take the globals, cells and defaults that came with it (their
    globals are the worker's copy of ``__main__``, which thereby catches up with the
    caller's for the names those functions use)."""
    try:
        obj = pickle.loads(data)
    except BaseException:
        del _to_refresh[:]  # half-made functions: nothing to take from them
        raise
    if _to_refresh:  # (a forked worker sent an inherited cache: rare)
        _refresh_inherited()
    return obj


def _refresh_inherited() -> None:
    pending = _to_refresh[:]
    del _to_refresh[:]
    for target, sent in pending:
        target.__globals__.update(
            (name, value) for name, value in sent.__globals__.items()
            if not name.startswith("__"))
        target.__defaults__, target.__kwdefaults__ = sent.__defaults__, sent.__kwdefaults__
        for mine, theirs in zip(target.__closure__ or (), sent.__closure__ or ()):
            try:
                mine.cell_contents = theirs.cell_contents
            except ValueError:  # an empty cell
                pass


def _rebuild(code: bytes, base: dict, name: str, n_cells: int) -> types.FunctionType:
    base.setdefault("__builtins__", builtins)
    closure = None if n_cells < 0 else tuple(types.CellType() for _ in range(n_cells))
    return types.FunctionType(marshal.loads(code), base, name, None, closure)


def _set_state(func: types.FunctionType, state: tuple) -> None:
    """The rest, once the function exists: its globals and cells may refer to it."""
    used, defaults, kwdefaults, cells, qualname, module, doc, attrs, annotations, _ = state
    func.__globals__.update(used)
    func.__defaults__, func.__kwdefaults__ = defaults, kwdefaults
    for cell, (full, value) in zip(func.__closure__ or (), cells or ()):
        if full:
            cell.cell_contents = value
    func.__qualname__, func.__module__, func.__doc__ = qualname, module, doc
    if attrs:
        func.__dict__.update(attrs)
    if annotations:
        func.__annotations__ = annotations
