"""The one contract every backend implements.

A backend runs *batches*: zero-argument callables that return a list of results (see
:class:`parmap._delayed.Batch`). The front end calls, for each ``Parallel`` call::

    n = backend.configure(n_jobs, parallel)     # start or reuse workers, return the count
    backend.start_call()
    backend.submit(batch, callback)             # many times, from any thread
        ... later, from any thread: callback(list_of_results | exception)
    backend.abort_everything()                  # only when the call is cancelled or fails
    backend.stop_call()
    backend.terminate()                         # unless a `with Parallel(...)` keeps it

Only :meth:`submit` is required; the rest have defaults suitable for an in-process backend.
``callback`` must be called exactly once per submitted batch that was not cancelled, with
the batch's result list or the exception it raised (the original exception, with its
traceback). A backend may set ``batch.duration`` (seconds the tasks ran) for auto batching.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

__all__ = ["ParallelBackendBase"]


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

    def __init__(self, nesting_level: int = 0, **backend_kwargs: Any):
        self.nesting_level = nesting_level
        self.backend_kwargs = backend_kwargs
        self.n_jobs = 1
        self.timeout: float | None = None

    def effective_n_jobs(self, n_jobs: int) -> int:
        """How many workers ``n_jobs`` (already resolved to >= 1) really gives."""
        return n_jobs

    def configure(self, n_jobs: int = 1, parallel: Any = None, **backend_kwargs: Any) -> int:
        """Get ready to run batches on ``n_jobs`` workers; return the effective count."""
        self.n_jobs = self.effective_n_jobs(n_jobs)
        self.timeout = getattr(parallel, "timeout", None)
        return self.n_jobs

    @abstractmethod
    def submit(self, batch: Callable[[], list], callback: Callable[[Any], None]) -> None:
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

    def get_nested_backend(self) -> tuple[str, int | None]:
        """(backend name, n_jobs) a ``Parallel`` inside one of our tasks uses by default."""
        return "sequential", None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_jobs={self.n_jobs})"
