"""What type checkers see of ``parmap``: its names are imported on first use at run
time (``__init__.py``, PEP 562), here as plain re-exports."""
from ._cpu import cpu_count as cpu_count
from ._delayed import delayed as delayed
from ._errors import ParmapError as ParmapError
from ._errors import PoolError as PoolError
from ._errors import RemoteTaskError as RemoteTaskError
from ._errors import RemoteTraceback as RemoteTraceback
from ._errors import SerializationError as SerializationError
from ._errors import TaskTimeoutError as TaskTimeoutError
from ._errors import TerminatedWorkerError as TerminatedWorkerError
from ._errors import WorkerCrashedError as WorkerCrashedError
from ._parallel import Parallel as Parallel
from ._settings import effective_n_jobs as effective_n_jobs
from ._settings import parallel_backend as parallel_backend
from ._settings import parallel_config as parallel_config
from ._shared import shared_array as shared_array
from ._worker_state import worker_id as worker_id
from ._worker_state import worker_state as worker_state
from .backends import ParallelBackendBase as ParallelBackendBase
from .backends import register_parallel_backend as register_parallel_backend

__version__: str
__all__: list[str]
_LAZY: dict[str, str]

def _shutdown_pools() -> None: ...
