"""The backend registry: from a name (or an instance) to a configured-ready backend.

A *backend spec* is a registered name, a :class:`ParallelBackendBase` instance, a
:mod:`multiprocessing` context (the process backend with that start method, as joblib
accepts it), or None for the default. Built in: ``"sequential"``, ``"threading"`` and ``"processes"`` (the
default; joblib's ``"loky"`` and ``"multiprocessing"`` name it too).

The process backend is named by module path and imported on first use: its module
brings in :mod:`multiprocessing`, which would double the time of ``import parmap``. The
import checker (``tests/import_graph.py``) counts these paths as imports, so the module
graph stays honest.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Mapping, Union

from .._public import public
from ._base import CallOptions, ParallelBackendBase
from .sequential import SequentialBackend
from .threading import ThreadingBackend

__all__ = ["ParallelBackendBase", "CallOptions", "BackendSpec", "register_parallel_backend",
           "check_backend", "check_backend_kwargs", "make_backend", "backend_names",
           "start_method_of", "default_is_processes"]

if TYPE_CHECKING:  # annotations only: importing multiprocessing costs ~5 ms
    from multiprocessing.context import BaseContext

BackendSpec = Union[str, ParallelBackendBase, "BaseContext", None]
Factory = Callable[..., ParallelBackendBase]

#: name -> "module:attribute" of a factory imported on first use (see the module doc)
LAZY: dict[str, str] = {
    "processes": "parmap.backends.process:make_process_backend",
    "loky": "parmap.backends.process:make_loky_backend",
    "multiprocessing": "parmap.backends.process:make_multiprocessing_backend",
    "dask": "parmap.backends.dask:DaskBackend",  # the optional dask extra
}
_factories: dict[str, Factory] = {"sequential": SequentialBackend,
                                  "threading": ThreadingBackend}
_default = ["processes"]  # a list so register_parallel_backend can swap it


def default_is_processes() -> bool:
    """Whether ``backend=None`` means the built-in process backend (not a registered one),
    without importing it."""
    name = _default[0]
    factory = _factories.get(name)
    if factory is None:
        return LAZY.get(name) == LAZY["processes"]
    return getattr(factory, "__module__", None) == LAZY["processes"].partition(":")[0]


#: joblib's built-in backend classes (``joblib._parallel_backends``) -> parmap's backend of
#: the same meaning: an instance of one, as joblib code passes it, means that backend
JOBLIB_BUILTINS = {"LokyBackend": "loky", "MultiprocessingBackend": "multiprocessing",
                   "ThreadingBackend": "threading", "SequentialBackend": "sequential"}


def joblib_builtin(backend: object) -> str | None:
    """parmap's name for an instance of one of joblib's built-in backend classes (not a
    subclass of one: that is a custom joblib backend), else None."""
    kind = type(backend)
    if kind.__module__ == "joblib._parallel_backends":
        return JOBLIB_BUILTINS.get(kind.__name__)
    return None


def _foreign_backend_error(what: str, backend: object) -> TypeError:
    return TypeError(f"Invalid backend: {what} {backend!r:.80} is "
                     f"not a parmap backend: a joblib backend class does not plug into "
                     f"parmap (its contract differs, see the 'Coming from joblib' page); "
                     f"subclass parmap.ParallelBackendBase, or use a name such as "
                     f"'threading'")


def backend_names() -> list[str]:
    return sorted({*_factories, *LAZY})


def _factory(name: str) -> Factory:
    factory = _factories.get(name)
    if factory is None:
        module, _, attribute = LAZY[name].partition(":")
        factory = _factories[name] = getattr(importlib.import_module(module), attribute)
    return factory


@public
def register_parallel_backend(name: str, factory: Factory, make_default: bool = False) -> None:
    """Register ``factory`` (a backend class or a callable returning a backend) as ``name``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_parallel_backend: name must be a non-empty str, got "
                        f"{name!r}")
    if not callable(factory):
        raise TypeError(f"register_parallel_backend: factory must be callable, got "
                        f"{factory!r}")
    builtin = JOBLIB_BUILTINS.get(getattr(factory, "__name__", "")) \
        if getattr(factory, "__module__", "") == "joblib._parallel_backends" else None
    if builtin is not None:  # one of joblib's own: parmap's backend of that meaning
        factory = _factory(builtin)
    LAZY.pop(name, None)
    _factories[name] = factory
    if make_default:
        _default[0] = name


def start_method_of(backend: object) -> str | None:
    """The start method of a :mod:`multiprocessing` context, or None for anything else."""
    if type(backend).__module__ == "multiprocessing.context" and \
            callable(getattr(backend, "get_start_method", None)):
        return str(backend.get_start_method())  # type: ignore[attr-defined]
    return None


def check_backend(backend: object) -> BackendSpec:
    """``backend`` itself when it is a registered name, an instance, a multiprocessing
    context or None."""
    if backend is None or isinstance(backend, ParallelBackendBase) or \
            start_method_of(backend) is not None or joblib_builtin(backend) is not None:
        return backend  # type: ignore[return-value]
    if type(backend).__module__.split(".")[0] == "joblib" or \
            hasattr(backend, "apply_async"):
        raise _foreign_backend_error(f"the {type(backend).__name__} object", backend)
    if not isinstance(backend, str):
        raise TypeError(f"Invalid backend: expected a registered name or a "
                        f"ParallelBackendBase instance, got {type(backend).__name__} "
                        f"{backend!r:.60}")
    if backend not in _factories and backend not in LAZY:
        raise ValueError(f"Invalid backend: {backend!r} is not registered; choose one of "
                         f"{backend_names()} or register it with register_parallel_backend")
    return backend


def _parameters(factory: Factory) -> tuple[set[str], bool] | None:
    """(keyword parameters, takes **kwargs) of ``factory``; None where it cannot be
    told (not a plain Python function or class)."""
    target: Any = getattr(factory, "__init__") if isinstance(factory, type) else factory
    code = getattr(target, "__code__", None)
    if code is None:
        return None
    names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    if isinstance(factory, type) or hasattr(target, "__self__"):
        names = names[1:]  # self
    return set(names), bool(code.co_flags & 0x08)


#: keywords of the process backend that only manage its workers: a backend the caller
#: did not name drops them (see check_backend_kwargs). Not the initializer or finalizer:
#: tasks may depend on what they set up
_POOL_HINTS = frozenset({"max_tasks_per_child", "max_memory_per_child", "start_method",
                        "idle_timeout"})


def check_backend_kwargs(backend: BackendSpec, kwargs: Mapping[str, object],
                         where: str = "Parallel()", implicit: bool = False
                         ) -> dict[str, object]:
    """The keywords to pass to the backend ``backend``; a TypeError names any it would not
    accept. ``implicit``: the caller did not choose the backend (it comes from a
    ``parallel_config`` block or the nesting level): then the process backend's
    ``_POOL_HINTS`` that it does not take are dropped, as joblib ignores them: library
    code asking for recycling must run under the backend its user chose, and as a task
    (nested calls run on threads)."""
    if not kwargs:
        return {}
    if implicit:
        kwargs = {key: value for key, value in kwargs.items()
                  if key not in _POOL_HINTS or _takes(backend, key)}
        if not kwargs:
            return {}
    if isinstance(backend, ParallelBackendBase):
        raise TypeError(f"{where} got keyword arguments {sorted(kwargs)} for a backend "
                        f"instance ({type(backend).__name__}); pass them to its constructor")
    name = _name_of(backend)
    params = _parameters(_factory(name))
    if params is None or params[1]:
        return dict(kwargs)  # takes anything: the backend checks for itself
    accepted = params[0] - {"nesting_level"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        takes = ", ".join(sorted(accepted)) or "none"
        listed = ", ".join(map(repr, unknown))
        if name != "processes" and set(unknown) <= _keywords_of("processes"):
            raise TypeError(f"{where} got {listed}, an option of the process backend, but "
                            f"runs on backend {name!r}, which accepts these keywords: "
                            f"{takes}. Drop it, or choose backend='processes'.")
        raise TypeError(f"{where} got unexpected keyword argument(s) {listed}: not a "
                        f"setting, and backend {name!r} accepts these keywords: {takes}. "
                        f"Check the spelling.")
    return dict(kwargs)


def _keywords_of(name: str) -> set[str]:
    params = _parameters(_factory(name))
    return params[0] - {"nesting_level"} if params is not None else set()


def _name_of(backend: BackendSpec) -> str:
    """The registered name a (non-instance) spec makes its backend from."""
    if not isinstance(backend, (str, type(None))):
        backend = joblib_builtin(backend) or "processes"  # else a multiprocessing context
    return _default[0] if backend is None else backend


def _takes(backend: BackendSpec, keyword: str) -> bool:
    """Whether the backend a spec makes takes ``keyword`` (an instance takes none)."""
    if isinstance(backend, ParallelBackendBase):
        return False
    params = _parameters(_factory(_name_of(backend)))
    return params is None or params[1] or keyword in params[0]


def make_backend(backend: BackendSpec, nesting_level: int = 0, *, implicit: bool = False,
                 **kwargs: object) -> ParallelBackendBase:
    """A backend instance from a spec (an instance is returned as it is). ``implicit``:
    as for :func:`check_backend_kwargs`."""
    if isinstance(backend, ParallelBackendBase):
        check_backend_kwargs(backend, kwargs, implicit=implicit)  # it takes none
        return backend
    backend = joblib_builtin(backend) or backend
    start_method = start_method_of(backend)
    if start_method is not None:
        kwargs.setdefault("start_method", start_method)
        backend = "processes"
    name = _default[0] if backend is None else backend
    assert isinstance(name, str)
    check_backend(name)
    kwargs = check_backend_kwargs(name, kwargs, implicit=implicit)
    factory = _factory(name)
    params = _parameters(factory)
    if params is not None and ("nesting_level" in params[0] or params[1]):
        instance = factory(nesting_level=nesting_level, **kwargs)
    else:
        instance = factory(**kwargs)
        instance.nesting_level = nesting_level
    if not isinstance(instance, ParallelBackendBase):
        raise _foreign_backend_error(f"backend {name!r} made", instance)
    return instance
