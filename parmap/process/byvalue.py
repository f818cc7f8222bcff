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
* methods bound to an object, with the function by value (:func:`bind`).

The pickler (``protocol._ImportablePickler``) raises for what this does not cover (a
class defined in ``__main__`` and whatever else names ``__main__`` as its module, a
module that is not importable by its name, one ``cloudpickle.register_pickle_by_value``
names), and the request then goes through cloudpickle as before.
"""
from __future__ import annotations

import builtins
import marshal
import sys
import types
import weakref
from itertools import chain
from typing import Any, Callable

__all__ = ["reduce_function", "module_base", "module_name", "registered_by_value", "bind"]

#: the globals an instruction of these kinds names: what cloudpickle sends too
_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL"})
#: what a module's globals dict of the caller shares with its rebuilt functions
_MODULE_KEYS = ("__package__", "__name__", "__path__", "__file__")

_names_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
