"""parmap: fast, crash-safe parallel loops with joblib's ``Parallel``/``delayed`` API.

>>> from parmap import Parallel, delayed
>>> Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(4))
[0, 1, 2, 3]
"""
from ._cpu import cpu_count
from ._delayed import delayed
from ._errors import (ParmapError, PoolError, RemoteTaskError, RemoteTraceback,
                      SerializationError, TaskTimeoutError, TerminatedWorkerError,
                      WorkerCrashedError)
from ._parallel import Parallel
from ._settings import effective_n_jobs, parallel_backend, parallel_config
from ._shared import shared_array
from ._worker_state import worker_id, worker_state
from .backends import ParallelBackendBase, register_parallel_backend

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

# Users see parmap.Parallel, not parmap._parallel.Parallel.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("parmap."):
        try:
            _obj.__module__ = "parmap"
        except (AttributeError, TypeError):
            pass
del _name, _obj


def _shutdown_pools() -> None:
    """Stop parmap's reusable worker processes now (tests use this; atexit does too)."""
    import sys  # stdlib: nothing of parmap's is hidden here

    registry = sys.modules.get("parmap.process.registry")
    if registry is not None:
        registry.shutdown_all()
