"""The worker's side of the joblib bridge (``parmap.joblib``): what a task of a joblib
call runs under.

joblib's ``BatchedCalls`` runs each task under the nested backend the call chose; the
bridge sends its tasks to parmap's pool one by one, each function wrapped in
:class:`NestedCall`, which applies that backend (threads, at most the worker's share of
the CPUs: :class:`CappedThreads`) and caps the worker's BLAS and OpenMP thread pools
once per cap. It is apart from ``parmap.joblib`` (the backend, in the caller) so that
each module stays under 400 lines.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Any, Callable

import joblib  # type: ignore[import-untyped]
from joblib._parallel_backends import ThreadingBackend  # type: ignore[import-untyped]

__all__ = ["NestedCall", "CappedThreads", "REGISTERED", "library_limits"]

#: the names the caller gave the bridge (``register_parmap``) -> its backend class; a
#: worker that was not forked (forkserver, spawn) knows none of them, and a task that
#: names one (``Parallel(backend="parmap")``) failed there with "Invalid backend"
REGISTERED: dict[str, type] = {}


class CappedThreads(ThreadingBackend):
    """The backend of joblib calls made inside our tasks: threads, at most
    ``max_n_jobs`` of them (the worker's share of the CPUs); one means sequential.
    It carries the bridge's names (:data:`REGISTERED`) to the workers."""

    def __init__(self, max_n_jobs: int, nesting_level: int | None = None):
        super().__init__(nesting_level=nesting_level)
        self.max_n_jobs = max_n_jobs
        self.registered = tuple(REGISTERED.items())

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        return min(int(super().effective_n_jobs(n_jobs)), self.max_n_jobs)


class NestedCall:
    """A task's function, run under joblib's nested backend (what joblib's BatchedCalls
    does) with the worker's thread pools capped. Errors and crashes name the function
    itself: ``__qualname__`` and ``__name__`` are the wrapped function's."""

    __slots__ = ("func", "backend", "n_jobs", "threads")

    def __init__(self, func: Callable, backend: Any, n_jobs: int | None,
                 threads: tuple[tuple[str, int], ...]):
        self.func = func
        self.backend = backend
        self.n_jobs = n_jobs
        self.threads = threads

    def __getattr__(self, name: str) -> Any:
        if name in ("__qualname__", "__name__", "__wrapped__"):
            return getattr(self.func, name)
        raise AttributeError(name)

    def __reduce__(self) -> tuple:
        return NestedCall, (self.func, self.backend, self.n_jobs, self.threads)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(_applied, "backend", None) is not self.backend:
            _apply(self.backend, self.n_jobs, self.threads)
        return self.func(*args, **kwargs)


#: what _apply set in this worker thread: checked per task, so it must be cheap
_applied = threading.local()


def _apply(backend: Any, n_jobs: int | None, threads: tuple[tuple[str, int], ...]) -> None:
    """Make ``backend`` joblib's default in this worker thread until the next batch
    brings its own copy (parmap's workers keep ``threading`` as their default the same
    way): entering and leaving a ``parallel_config`` around each task costs microseconds
    per task. The previous setting is undone first, so settings never pile up."""
    previous = getattr(_applied, "config", None)
    if previous is not None:
        previous.unregister()
    for name, factory in getattr(backend, "registered", ()):
        joblib.register_parallel_backend(name, factory)  # a task's calls of them: inline
    _cap_thread_pools(threads)
    _applied.config = joblib.parallel_config(backend=backend, n_jobs=n_jobs)
    _applied.backend = backend


#: threadpoolctl's name of a library -> the variable that sets its thread count
_LIBRARY_VARS = (("openmp", "OMP_NUM_THREADS"), ("openblas", "OPENBLAS_NUM_THREADS"),
                 ("mkl", "MKL_NUM_THREADS"), ("blis", "BLIS_NUM_THREADS"))


def library_limits(threads: int, inner_max_num_threads: int | None
                   ) -> tuple[tuple[str, int], ...]:
    """In the caller: each library's thread count in the workers, ``threads``, but where
    the caller's environment sets one and no ``inner_max_num_threads`` is given: as in
    loky, the user's value wins (``spawn.thread_caps`` gives the workers' environment
    the same, which the libraries a task loads later read)."""
    limits = []
    for api, var in _LIBRARY_VARS:
        value = os.environ.get(var, "") if inner_max_num_threads is None else ""
        limits.append((api, int(value) if value.isdigit() and int(value) > 0 else threads))
    return tuple(limits)


_capped: tuple[int, tuple] | None = None  # (pid, limits) of the last cap applied


def _cap_thread_pools(limits: tuple[tuple[str, int], ...]) -> None:
    """Cap this worker's BLAS and OpenMP pools (``library_limits``), once per set of
    limits (best effort). Environment variables cannot: a forked worker's libraries read
    them when the parent loaded them."""
    global _capped
    if _capped == (os.getpid(), limits):
        return
    _capped = (os.getpid(), limits)
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            threadpool_limits(limits=dict(limits))
    except Exception:
        pass
