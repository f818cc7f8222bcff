"""The one contract every backend implements.

A backend runs *batches* (:class:`parmap._delayed.Batch`): zero-argument callables that
return a list of results. For each ``Parallel`` call the front end does::

    n = backend.configure(n_jobs, options)      # start or reuse workers, return the count
    backend.start_call()
    backend.submit(batch, callback)             # many times, from any thread
        ... later, from any thread: callback(list_of_results | exception)
    backend.abort_everything(ensure_ready)      # only when the call is cancelled or fails
    backend.stop_call()
    backend.terminate()                         # unless a `with Parallel(...)` keeps it

Only :meth:`submit` is required; the rest have defaults suitable for an in-process backend.
``callback`` must be called exactly once per submitted batch that was not cancelled, with
the batch's result list or the exception it raised (the original exception, with its
traceback). A backend may set ``batch.duration`` (seconds the tasks ran) for auto batching.

Keyword arguments a backend accepts (``Parallel(..., initializer=f)``, or
``parallel_config(backend=..., **params)``) are the parameters of its ``__init__``; any
other keyword is a ``TypeError`` that names it. ``configure`` receives the call's other
settings as one :class:`CallOptions`.

Nesting: the settings a ``Parallel`` call *made by a task* sees come from
:meth:`ParallelBackendBase.get_nested_backend` of the backend running the task, one
level deeper (see ``_dispatch``). By default, the first nested level uses threads and
deeper levels run sequentially, so recursive parallel calls cannot multiply workers.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Union

from .._delayed import Batch
from .._public import public

__all__ = ["ParallelBackendBase", "CallOptions", "Callback", "NestedSpec", "Outcome"]

#: what a batch ends with: its result list, or the exception it raised
Outcome = Union[list, BaseException]
#: called once per batch with its outcome
Callback = Callable[[Outcome], None]
#: (backend name or instance, n_jobs or None to keep the caller's) for nested calls
NestedSpec = tuple["str | ParallelBackendBase", "int | None"]


class CallOptions:
    """The settings of one ``Parallel`` call that a backend may act on."""

    __slots__ = ("timeout", "max_nbytes", "mmap_mode", "temp_folder",
                 "inner_max_num_threads", "verbose", "requested_n_jobs")

    def __init__(self, timeout: float | None = None, max_nbytes: int | None = 1024 ** 2,
                 mmap_mode: str | None = "r", temp_folder: str | None = None,
                 inner_max_num_threads: int | None = None, verbose: float = 0,
                 requested_n_jobs: int | None = None):
        self.timeout = timeout
        self.max_nbytes = max_nbytes
        self.mmap_mode = mmap_mode
        self.temp_folder = temp_folder
        self.inner_max_num_threads = inner_max_num_threads
        self.verbose = verbose
        #: n_jobs as the caller gave it (None, k or -k), for backends whose workers are
        #: not this machine's CPUs (a cluster counts its own for -1)
        self.requested_n_jobs = requested_n_jobs

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"CallOptions({fields})"


@public
class ParallelBackendBase(ABC):
    """Base class of parmap backends; subclass it and register with
    :func:`parmap.register_parallel_backend`."""

    #: tasks run in the caller's address space (threads, or the caller itself)
    supports_sharedmem: bool = False
    #: the backend itself stops a task that runs past ``timeout`` (and raises
    #: TaskTimeoutError through the callback); otherwise the front end raises it
    enforces_timeout: bool = False
    #: auto batching aims for batches that take about this long in a worker
    target_batch_duration: float = 0.02
    #: the backend cannot run two batches at once (the front end then runs inline)
    inline: bool = False
    #: no batch may hold more tasks than this (a process worker recycled after that many
    #: tasks); the dispatcher splits accordingly. None: no limit
    max_batch_size: int | None = None
    #: the callback may read the next tasks from the user's input, in the thread that
    #: calls it (a list call's workers are then fed without waiting for the caller to
    #: wake); False where that thread serves others and must never run user code
    dispatch_from_callbacks: bool = True

    def __init__(self, nesting_level: int = 0):
        #: how many parallel calls enclose the one this backend runs (0: top level)
        self.nesting_level = nesting_level
        self.n_jobs = 1
        self.options = CallOptions()

    def effective_n_jobs(self, n_jobs: int) -> int:
        """How many workers ``n_jobs`` (already resolved to >= 1) really gives."""
        return n_jobs

    def configure(self, n_jobs: int, options: CallOptions) -> int:
        """Get ready to run batches on ``n_jobs`` workers; return the effective count."""
        self.n_jobs = self.effective_n_jobs(n_jobs)
        self.options = options
        return self.n_jobs

    @abstractmethod
    def submit(self, batch: Batch, callback: Callback) -> None:
        """Schedule ``batch()``; call ``callback`` with its result list or exception."""

    def start_call(self) -> None:
        """Called before the first batch of each ``Parallel`` call."""

    def stop_call(self) -> None:
        """Called after the last result (or the abort) of each ``Parallel`` call."""

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Drop batches not started yet and stop the running ones where possible.

        ``callback`` need not be called for dropped batches. With ``ensure_ready`` the
        backend must accept new batches afterwards (a ``with Parallel`` block goes on).
        """

    def terminate(self) -> None:
        """Release workers; the backend may be configured again later."""

    def get_nested_backend(self) -> NestedSpec | None:
        """The backend (and n_jobs) of ``Parallel`` calls made by this backend's tasks,
        one nesting level deeper; None leaves the tasks' settings as they are."""
        return ("threading" if self.nesting_level == 0 else "sequential"), None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_jobs={self.n_jobs})"
