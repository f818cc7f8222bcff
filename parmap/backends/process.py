"""The default backend: batches run in parmap's reusable pool of worker processes.

A ``ProcessBackend`` is a thin per-``Parallel`` handle on the shared pool (see
``parmap._pool``, shared through ``parmap._registry``): it serialises batches, tags them
with the current call so that a cancelled call only cancels its own work, and holds the
pool while a call (or a ``with Parallel(...)`` block) runs. It answers to
``"processes"`` and to joblib's ``"loky"`` and ``"multiprocessing"``.
"""
from __future__ import annotations

import io
import pickle
import sys
from types import FunctionType
from typing import Any, Callable

from .._errors import SerializationError, func_name
from ._base import ParallelBackendBase

__all__ = ["ProcessBackend", "process_backend_factory"]

DEFAULT_IDLE_TIMEOUT = 300.0


class ProcessBackend(ParallelBackendBase):
    enforces_timeout = True
    target_batch_duration = 0.05  # ~0.2 ms of the caller's CPU per batch: 0.4 %

    def __init__(self, nesting_level: int = 0, initializer: Callable | None = None,
                 initargs: tuple = (), idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 start_method: str | None = None, **backend_kwargs: Any):
        super().__init__(nesting_level, **backend_kwargs)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got {initializer!r:.60}")
        if not isinstance(initargs, tuple):
            raise TypeError(f"initargs must be a tuple, got {type(initargs).__name__}")
        if isinstance(idle_timeout, bool) or not isinstance(idle_timeout, (int, float)) \
                or idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be a positive number of seconds, got "
                             f"{idle_timeout!r}")
        if start_method is not None:
            from .._spawn import choose_start_method

            choose_start_method(start_method)  # validates
        self.initializer = initializer
        self.initargs = initargs
        self.idle_timeout = float(idle_timeout)
        self.start_method = start_method
        self.inner_max_num_threads: int | None = None
        self._pool: Any = None
        self._registry: Any = None
        self._owner: object = object()
        self._placer: Any = None
        self._max_nbytes: int | None = None
        self._mmap_mode: str | None = "r"
        self._temp_folder: str | None = None

    def configure(self, n_jobs: int = 1, parallel: Any = None, **backend_kwargs: Any) -> int:
        from .. import _registry
        from .._pool import PoolOptions

        self._registry = _registry  # terminate() may run at shutdown: no import there

        n_jobs = super().configure(n_jobs, parallel)
        self.inner_max_num_threads = getattr(parallel, "inner_max_num_threads", None)
        self._max_nbytes = getattr(parallel, "max_nbytes", None)
        self._mmap_mode = getattr(parallel, "mmap_mode", "r")
        self._temp_folder = getattr(parallel, "temp_folder", None)
        options = PoolOptions(self.start_method, self._pickled_initializer(),
                              self.inner_max_num_threads, self.idle_timeout)
        pool = self._pool
        if pool is not None and (pool.closed or pool.options != options
                                 or pool.size != n_jobs):
            _registry.release_pool(pool)
            self._pool = pool = None
        if pool is None:
            self._pool = _registry.acquire_pool(n_jobs, options)
        return n_jobs

    def _pickled_initializer(self) -> bytes | None:
        if self.initializer is None:
            return None
        import cloudpickle

        try:
            return cloudpickle.dumps((self.initializer, self.initargs))
        except Exception as exc:
            raise SerializationError(f"initializer {func_name(self.initializer)} or its "
                                     f"initargs could not be pickled: {exc}") from exc

    def start_call(self) -> None:
        self._owner = object()
        self._placer = None
        if (self._max_nbytes is not None and self._mmap_mode is not None
                and "numpy" in sys.modules):  # no numpy loaded: no arrays to place
            from .._shm import ArgumentPlacer

            pool = self._pool
            self._placer = ArgumentPlacer(self._max_nbytes, self._mmap_mode,
                                          self._temp_folder,
                                          can_inherit=pool.will_fork if pool else None)

    def stop_call(self) -> None:
        placer, self._placer = self._placer, None
        if placer is not None:
            placer.close()

    def submit(self, batch: Any, callback: Callable[[Any], None]) -> None:
        from .._pool import RETRY, PoolJob

        if self._pool is None:
            raise RuntimeError("ProcessBackend.submit called before configure")
        payload = dumps_batch(batch, self.timeout is not None, self._placer, self._max_nbytes)
        pool, owner, placer = self._pool, self._owner, self._placer
        if placer is None:  # no arrays pinned, so no worker can ask for the batch again
            pool.submit(PoolJob(owner, batch, payload, callback, self.timeout))
            return

        def done(outcome: Any) -> None:
            if outcome is not RETRY:
                callback(outcome)
                return
            # a worker that was not forked after our arrays were pinned: place them
            try:
                placer.stop_inheriting()
                again = dumps_batch(batch, self.timeout is not None, placer,
                                    self._max_nbytes)
                pool.submit(PoolJob(owner, batch, again, done, self.timeout))
            except BaseException as exc:  # the call is failing: report, never hang
                callback(exc)

        pool.submit(PoolJob(owner, batch, payload, done, self.timeout))

    def abort_everything(self, ensure_ready: bool = True) -> None:
        if self._pool is not None:
            self._pool.cancel(self._owner)
        if not ensure_ready:
            self.terminate()

    def terminate(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # no import here: this also runs when a generator is finalised at shutdown
            self._registry.release_pool(pool)

    def get_nested_backend(self) -> tuple[str, int | None]:
        return "threading", None


def process_backend_factory(**backend_kwargs: Any) -> ParallelBackendBase:
    """Inside a worker, a process backend becomes threads: no fork bombs."""
    from .. import _worker

    if _worker.IN_WORKER:
        from .threading import ThreadingBackend

        return ThreadingBackend(nesting_level=1)
    return ProcessBackend(**backend_kwargs)


def dumps_batch(batch: Any, track: bool, placer: Any = None,
                result_nbytes: int | None = None) -> bytes:
    """Serialise a batch for a worker (large arrays go through ``placer``); on failure,
    name the task and the part that cannot be pickled.

    Plain pickle first: it is faster, and the common case (functions from importable
    modules) then never imports cloudpickle, which costs ~25 ms of cold start. Whatever
    plain pickle cannot send faithfully (lambdas, closures, anything from ``__main__``)
    goes through cloudpickle.
    """
    from .._delayed import compact

    func, tasks = (batch.func, batch.tasks) if batch.func is not None else compact(batch.tasks)
    if func is not None:
        # keep the compact form in the caller too: the task tuples can go now, which
        # spares the garbage collector tens of thousands of live tuples per batch
        batch.func, batch.tasks = func, tasks
    message = (batch.start, func, tasks, track, result_nbytes)
    try:
        return _dumps(_ImportablePickler, message, placer)
    except Exception:
        pass
    import cloudpickle

    try:
        return _dumps(cloudpickle.Pickler, message, placer)
    except Exception as exc:
        raise _find_unpicklable(batch, exc) from exc


def _dumps(pickler: type, message: tuple, placer: Any) -> bytes:
    if placer is None:
        buf = io.BytesIO()
        pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
        return buf.getvalue()
    from .._shm import dumps_with

    return dumps_with(pickler, message, placer)


class _ByValue(Exception):
    """Raised by _ImportablePickler for an object a worker might not be able to import."""


class _ImportablePickler(pickle.Pickler):
    """Plain pickle that refuses functions and classes of ``__main__``: a worker started
    with spawn or forkserver does not run ``__main__``, and a forked one lacks whatever
    was defined after it started. Lambdas and closures plain pickle refuses itself."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (FunctionType, type)) and \
                getattr(obj, "__module__", None) == "__main__":
            raise _ByValue(obj)
        return NotImplemented


def _find_unpicklable(batch: Any, exc: Exception) -> SerializationError:
    import cloudpickle

    for offset in range(len(batch)):
        func, args, kwargs = batch.task(offset)
        parts = [("the function", func)]
        parts += [(f"argument {i}", arg) for i, arg in enumerate(args)]
        parts += [(f"keyword argument {key!r}", value) for key, value in kwargs.items()]
        for label, value in parts:
            try:
                cloudpickle.dumps(value)
            except Exception as part_exc:
                return SerializationError(
                    f"{label} of task {batch.start + offset} ({func_name(func)}) could not "
                    f"be pickled to send it to a worker process: {type(part_exc).__name__}: "
                    f"{part_exc}. Pass picklable data, create the object inside the task, "
                    f"or use backend='threading'.")
    return SerializationError(f"tasks {batch.start}..{batch.start + len(batch) - 1} could not "
                              f"be pickled: {type(exc).__name__}: {exc}")
