"""The default backend: a thin adapter from the backend contract to ``parmap.process``.

A ``ProcessBackend`` is a per-``Parallel`` handle on the shared pool
(``parmap.process.registry``): it encodes batches (``protocol.encode_request``), tags them
with the current call so that a cancelled call only cancels its own work, places large
numpy arguments through an ``ArgumentPlacer`` for the call, and holds the pool while a
call (or a ``with Parallel(...)`` block) runs. It answers to ``"processes"`` and to
joblib's ``"loky"`` and ``"multiprocessing"``.

Inside a task (nesting level 1 and deeper) a process backend is never made: the factory
returns threads instead, so nested parallel calls cannot start processes from processes
(with joblib's warning where joblib would refuse: see :class:`NestedThreads`).

Long runs (``docs/long_runs.rst``): ``max_tasks_per_child`` caps the dispatcher's batches
(``max_batch_size``) and the pool replaces a worker once it has run that many tasks;
``max_memory_per_child`` replaces a worker whose RSS is above it after a batch (one
warning per call, at its end); ``finalizer`` runs in each worker as it exits normally.
"""
from __future__ import annotations

import sys
import threading
import warnings
from time import perf_counter
from typing import Any, Callable

from .._checks import check_positive_int, parse_size
from .._delayed import Batch
from .._errors import SerializationError, func_name
from ..process import protocol, registry
from ..process.pool import PoolOptions, WorkerPool
from ..process.scheduler import CallOwner, PoolJob
from ..process.shm import ArgumentPlacer
from ..process.spawn import choose_start_method
from ._base import Callback, CallOptions, ParallelBackendBase
from .threading import ThreadingBackend

__all__ = ["ProcessBackend", "make_process_backend", "make_loky_backend",
           "make_multiprocessing_backend", "NestedThreads", "DEFAULT_IDLE_TIMEOUT"]

DEFAULT_IDLE_TIMEOUT = 300.0
#: a batch of tasks expected to take at least this long each (seconds) has its worker
#: publish each task's index as the task starts, so that a crash names the task, not
#: only its batch: ~1 µs a task (the worker leaves its fastest loop), 0.1 % of a 1 ms
#: task but 10 % of a 10 µs one, which keep the fast loop (a timeout marks them all)
MARK_MIN_TASK = 0.001


class ProcessBackend(ParallelBackendBase):
    enforces_timeout = True
    # callbacks run in the pool's manager thread, which delivers every call's results:
    # an input generator run there that blocks (one that calls Parallel itself, say)
    # would stall them all, or deadlock
    dispatch_from_callbacks = False
    target_batch_duration = 0.05  # ~0.2 ms of the caller's CPU per batch: 0.4 %

    def __init__(self, nesting_level: int = 0, initializer: Callable[..., Any] | None = None,
                 initargs: tuple = (), idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 start_method: str | None = None,
                 finalizer: Callable[[], Any] | None = None,
                 max_tasks_per_child: int | None = None,
                 max_memory_per_child: int | str | None = None):
        super().__init__(nesting_level)
        for name, function in (("initializer", initializer), ("finalizer", finalizer)):
            if function is not None and not callable(function):
                raise TypeError(f"{name} must be callable, got {function!r:.60}")
        self.max_tasks_per_child = check_positive_int("max_tasks_per_child")(
            max_tasks_per_child)
        self.max_memory_per_child = parse_size(max_memory_per_child, "max_memory_per_child")
        if self.max_memory_per_child == 0:
            raise ValueError("max_memory_per_child must be None or a positive size such as "
                             "'2G', got 0")
        #: the dispatcher never makes a batch larger than a worker may run
        self.max_batch_size = self.max_tasks_per_child
        self.finalizer = finalizer
        if not isinstance(initargs, tuple):
            raise TypeError(f"initargs must be a tuple, got {type(initargs).__name__}")
        if isinstance(idle_timeout, bool) or not isinstance(idle_timeout, (int, float)) \
                or idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be a positive number of seconds, got "
                             f"{idle_timeout!r}")
        if start_method is not None:
            choose_start_method(start_method)  # validates
        self.initializer = initializer
        self.initargs = initargs
        self.idle_timeout = float(idle_timeout)
        self.start_method = start_method
        self._pool: WorkerPool | None = None
        self._owner = CallOwner()
        self._placer: ArgumentPlacer | None = None

    def configure(self, n_jobs: int, options: CallOptions) -> int:
        n_jobs = super().configure(n_jobs, options)
        pool_options = PoolOptions(self.start_method, self._pickled_initializer(),
                                   options.inner_max_num_threads, self.idle_timeout,
                                   self._pickled_finalizer(), self.max_tasks_per_child,
                                   self.max_memory_per_child)
        pool = self._pool
        if pool is not None and (pool.closed or pool.options != pool_options
                                 or pool.size != n_jobs):
            registry.release_pool(pool)
            self._pool = pool = None
        if pool is None:
            self._pool = pool = registry.acquire_pool(n_jobs, pool_options)
        pool.prestart()  # a forkserver starts while the caller reads its first tasks
        return n_jobs

    def _pickled_initializer(self) -> bytes | None:
        if self.initializer is None:
            return None
        import cloudpickle

        try:
            return cloudpickle.dumps((self.initializer, self.initargs))  # type: ignore[no-any-return]
        except Exception as exc:
            raise SerializationError(f"initializer {func_name(self.initializer)} or its "
                                     f"initargs could not be pickled: {exc}") from exc

    def _pickled_finalizer(self) -> bytes | None:
        """Plain pickle for an importable function (a new worker then needs no
        cloudpickle to run it: recycled workers start faster), cloudpickle otherwise."""
        finalizer = self.finalizer
        if finalizer is None:
            return None
        plain = protocol.dumps_importable(finalizer)
        if plain is not None:
            return plain
        import cloudpickle

        try:
            return cloudpickle.dumps(finalizer)  # type: ignore[no-any-return]
        except Exception as exc:
            raise SerializationError(f"finalizer {func_name(self.finalizer)} could not be "
                                     f"pickled: {exc}") from exc

    def start_call(self) -> None:
        self._owner = CallOwner(self.n_jobs)  # never more workers at once, in a larger pool
        self._placer = None
        options = self.options
        if (options.max_nbytes is not None and options.mmap_mode is not None
                and "numpy" in sys.modules):  # no numpy loaded: no arrays to place
            pool = self._pool
            self._placer = ArgumentPlacer(options.max_nbytes, options.mmap_mode,
                                          options.temp_folder,
                                          can_inherit=pool.will_fork if pool else None)

    def stop_call(self) -> None:
        placer, self._placer = self._placer, None
        if placer is not None:
            placer.close()
        self._report_memory(self._pool)

    def _report_memory(self, pool: WorkerPool | None) -> None:
        """The call's warning about workers replaced for memory, once (the pool keeps
        its record until then): from stop_call, or from terminate when a failing call
        let go of the pool before (``abort_everything``)."""
        if pool is not None and self.max_memory_per_child is not None:
            with pool.lock:
                report = pool.recycler.memory_report(self._owner)
            if report is not None:
                warnings.warn(report, UserWarning, stacklevel=3)

    def submit(self, batch: Batch, callback: Callback) -> None:
        pool, owner, placer = self._pool, self._owner, self._placer
        if pool is None:
            raise RuntimeError("ProcessBackend.submit called before configure")
        timeout = self.options.timeout
        expected = batch.expected
        track = timeout is not None or (len(batch) > 1 and expected is not None
                                        and expected >= MARK_MIN_TASK * len(batch))
        result_nbytes = self.options.max_nbytes
        record = batch.record  # insights: pickling time and bytes are the caller's share
        t0 = perf_counter() if record is not None else 0.0
        if placer is None:  # no arrays placed, so no worker can ask for the batch again
            payload = protocol.encode_request(batch, track, placer, result_nbytes)
            if record is not None:
                record.pickle_s, record.request_bytes = perf_counter() - t0, len(payload)
            pool.submit(PoolJob(owner, batch, payload, callback, timeout))
            return
        with placer.held() as arrays:
            payload = protocol.encode_request(batch, track, placer, result_nbytes)
        if record is not None:
            record.pickle_s, record.request_bytes = perf_counter() - t0, len(payload)
        resubmit = _Resubmit(pool, owner, batch, callback, timeout, placer, track,
                             result_nbytes, arrays)
        pool.submit(resubmit.job(payload))

    def abort_everything(self, ensure_ready: bool = True) -> None:
        if self._pool is not None:
            self._pool.cancel(self._owner)
        if not ensure_ready:
            self.terminate()

    def terminate(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            self._report_memory(pool)
            registry.release_pool(pool)


class _Resubmit:
    """The callback of a batch whose arguments were placed: a worker that was not forked
    after they were pinned, or could not open an earlier call's file of one, answers
    ``RETRY``, and the batch is placed again and sent anew. An object that holds no job,
    not a closure that names itself: such a cycle held the batch and the dispatcher's
    callback (the call's arguments, its input generator) after a cancelled call until a
    garbage collection, where this goes as the pool drops the job. It holds the arrays
    its encoding placed (``ArgumentPlacer.held``) until the batch is done."""

    __slots__ = ("pool", "owner", "batch", "final", "timeout", "placer", "track",
                 "result_nbytes", "arrays")

    def __init__(self, pool: WorkerPool, owner: object, batch: Batch, final: Callback,
                 timeout: float | None, placer: ArgumentPlacer, track: bool,
                 result_nbytes: int | None, arrays: list):
        self.pool, self.owner, self.batch = pool, owner, batch
        self.final: Callback | None = final  # None once told
        self.timeout, self.placer, self.track = timeout, placer, track
        self.result_nbytes, self.arrays = result_nbytes, arrays

    def job(self, payload: bytes) -> PoolJob:
        return PoolJob(self.owner, self.batch, payload, self, self.timeout)

    def __call__(self, outcome: Any) -> None:
        final = self.final
        if final is None:
            return
        if outcome is not protocol.RETRY:
            self.final = None
            final(outcome)
            self.arrays = []
            return
        if self.placer.closed:  # a late answer: the call has ended (failed, cancelled)
            self.final = None
            return
        try:
            self.placer.stop_inheriting()
            with self.placer.held() as arrays:
                again = protocol.encode_request(self.batch, self.track, self.placer,
                                                self.result_nbytes)
            self.arrays = arrays
            self.pool.submit(self.job(again))
        except BaseException as exc:  # the call is failing: report, never hang
            self.final = None
            if not self.placer.closed:  # (it ended meanwhile: nobody listens)
                final(exc)


class NestedThreads(ThreadingBackend):
    """What a process backend asked for inside a task runs on. Where joblib would refuse
    the processes (a nested ``"multiprocessing"``, ``"loky"`` below threads) it warns, in
    joblib's words, when the call has more than one worker."""

    def __init__(self, nesting_level: int, warning: str | None = None):
        super().__init__(nesting_level)
        self.warning = warning

    def configure(self, n_jobs: int, options: CallOptions) -> int:
        if self.warning is not None and n_jobs != 1:
            warnings.warn(self.warning, stacklevel=4)
        return super().configure(n_jobs, options)


class _Factory:
    """The factory of a name of the process backend: ``"processes"``, and joblib's
    ``"loky"`` and ``"multiprocessing"``, which warn as joblib does when nested where
    joblib would refuse processes. Its ``make`` is what the registry calls; its keyword
    parameters are the backend's (the registry checks a call's keywords against them)."""

    def __init__(self, joblib_name: str | None):
        self.joblib_name = joblib_name

    def make(self, nesting_level: int = 0, initializer: Callable[..., Any] | None = None,
             initargs: tuple = (), idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
             start_method: str | None = None, finalizer: Callable[[], Any] | None = None,
             max_tasks_per_child: int | None = None,
             max_memory_per_child: int | str | None = None) -> ParallelBackendBase:
        """A process backend at the top level; threads inside a task (no fork bombs)."""
        if nesting_level > 0:
            return NestedThreads(nesting_level, self._nested_warning())
        return ProcessBackend(nesting_level, initializer, initargs, idle_timeout,
                              start_method, finalizer, max_tasks_per_child,
                              max_memory_per_child)

    def _nested_warning(self) -> str | None:
        name = self.joblib_name
        if name == "multiprocessing" or (
                name == "loky" and threading.current_thread() is not threading.main_thread()):
            where = "nested" if name == "multiprocessing" else "nested below threads"
            return (f"{name.capitalize()}-backed parallel loops cannot be {where}: this "
                    f"nested call runs on threads instead (parmap starts processes only "
                    f"from the top level). Use backend='threading' to silence this.")
        return None


make_process_backend = _Factory(None).make
make_loky_backend = _Factory("loky").make
make_multiprocessing_backend = _Factory("multiprocessing").make
