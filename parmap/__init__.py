"""parmap: fast, crash-safe parallel loops with joblib's ``Parallel``/``delayed`` API.

>>> from parmap import Parallel, delayed
>>> Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(4))
[0, 1, 2, 3]

The public names are imported on first use (PEP 562): a worker process imports this
package (it runs ``parmap.process.worker``) but never the front end (``Parallel``, the
dispatcher, the settings, the backends), which was about a third of a worker's imports:
the forkserver's start, and every worker's with spawn. Type checkers read the names
from ``__init__.pyi``.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = [
    "Parallel",
    "delayed",
    "parallel_config",
    "parallel_backend",
    "register_parallel_backend",
    "effective_n_jobs",
    "cpu_count",
    "shared_array",
    "worker_state",
    "worker_id",
    "ParallelBackendBase",
    "ParmapError",
    "PoolError",
    "WorkerCrashedError",
    "TerminatedWorkerError",
    "TaskTimeoutError",
    "SerializationError",
    "RemoteTaskError",
    "RemoteTraceback",
]

#: the module that defines each public name (each shows as ``parmap.X``: see _public)
_LAZY = {
    "Parallel": "parmap._parallel",
    "delayed": "parmap._delayed",
    "parallel_config": "parmap._settings",
    "parallel_backend": "parmap._settings",
    "register_parallel_backend": "parmap.backends",
    "effective_n_jobs": "parmap._settings",
    "cpu_count": "parmap._cpu",
    "shared_array": "parmap._shared",
    "worker_state": "parmap._worker_state",
    "worker_id": "parmap._worker_state",
    "ParallelBackendBase": "parmap.backends",
    "ParmapError": "parmap._errors",
    "PoolError": "parmap._errors",
    "WorkerCrashedError": "parmap._errors",
    "TerminatedWorkerError": "parmap._errors",
    "TaskTimeoutError": "parmap._errors",
    "SerializationError": "parmap._errors",
    "RemoteTaskError": "parmap._errors",
    "RemoteTraceback": "parmap._errors",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'parmap' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})


def _shutdown_pools() -> None:
    """Stop parmap's reusable worker processes now (tests use this; atexit does too)."""
    import sys  # stdlib: nothing of parmap's is hidden here

    registry = sys.modules.get("parmap.process.registry")
    if registry is not None:
        registry.shutdown_all()
