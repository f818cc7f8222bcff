"""joblib (and so scikit-learn) on parmap's reusable, crash-safe process pool.

``register_parmap()`` registers the joblib backend ``"parmap"``; the recipe is in
docs/sklearn.rst. ``import parmap`` never imports joblib: only importing this module does.

Data flow of one ``joblib.Parallel`` call::

    joblib.Parallel ── BatchedCalls(items) ──> ParmapBackend.submit
        its items become one parmap Batch (task indices run on across the call), each
        function wrapped in NestedCall (joblib's nested backend, thread caps)
        ──> ProcessBackend.submit ──> the shared WorkerPool ──> a worker runs the batch
        (arrays over max_nbytes travel through /dev/shm, as in parmap's own calls)
    result list | exception ──> the pool's manager thread ──> submit's ``done``
        (records the in-worker duration for batch sizing) ──> joblib's callback
        ──> retrieve_result_callback: the results, or the error made joblib-friendly

What changes against loky: a dead worker fails only its call, with
:class:`JoblibWorkerCrashedError` (both ``parmap.WorkerCrashedError`` and joblib's
``TerminatedWorkerError``) naming the task and the signal, and the pool carries on;
workers start by fork when that is safe, so a cold pool costs milliseconds.

Fork and OpenMP: GNU libgomp breaks in a forked child once the parent has run an OpenMP
region (the child hangs or segfaults at its first parallel region) unless the child
keeps OpenMP to one thread. So a worker caps its thread pools (threadpoolctl) before it
runs our first task, and when that cap is above one and libgomp is loaded here, the
workers are started by forkserver instead of fork.
"""
from __future__ import annotations

import multiprocessing
import sys
import copy
import threading
import weakref
from typing import Any, Callable

try:
    import joblib  # type: ignore[import-untyped]
    from joblib._parallel_backends import (  # type: ignore[import-untyped]
        FallbackToBackend, ParallelBackendBase, SequentialBackend)
    from joblib.externals.loky.process_executor import (  # type: ignore[import-untyped]
        TerminatedWorkerError)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"parmap.joblib needs joblib ({exc}); install it with "
                      f"`pip install 'parmap[joblib]'`") from exc

from . import RemoteTraceback, TaskTimeoutError, WorkerCrashedError, cpu_count
from ._delayed import Batch
from ._joblib_worker import REGISTERED, CappedThreads, NestedCall, library_limits
from .backends import CallOptions
from .backends.process import ProcessBackend

__all__ = ["register_parmap", "ParmapBackend", "JoblibWorkerCrashedError",
           "JoblibTaskTimeoutError"]

#: batches grow at most this many times at once while auto batching learns
MAX_GROWTH = 8
MAX_BATCH = 10_000
#: what joblib.Parallel passes to configure() besides n_jobs and parallel
_JOBLIB_CALL_ARGS = frozenset({"max_nbytes", "temp_folder", "mmap_mode", "verbose",
                               "context", "prefer", "require"})


class JoblibWorkerCrashedError(WorkerCrashedError, TerminatedWorkerError):
    """A worker died while running a task of a joblib call.

    It is both :class:`parmap.WorkerCrashedError` (``exitcode``, ``task_indices``) and
    joblib's ``TerminatedWorkerError``, so existing ``except`` clauses of either kind
    keep working.
    """


class JoblibTaskTimeoutError(TaskTimeoutError, multiprocessing.TimeoutError):
    """A task ran past ``Parallel(timeout=...)``; its worker was stopped.

    Both :class:`parmap.TaskTimeoutError` (a ``TimeoutError``) and the
    ``multiprocessing.TimeoutError`` that joblib raises on a timeout.
    """


def register_parmap(name: str = "parmap", make_default: bool = False) -> None:
    """Register parmap's process pool as the joblib backend ``name``.

    Then ``joblib.parallel_config(backend=name, n_jobs=...)`` runs joblib's (and
    scikit-learn's) parallel loops on it. Calling it again is harmless.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_parmap(name=...): expected a non-empty str, got {name!r}")
    joblib.register_parallel_backend(name, ParmapBackend, make_default=make_default)
    REGISTERED[name] = ParmapBackend  # for the workers that were not forked


def _configure_pool(inner: ProcessBackend, n_jobs: int, options: CallOptions) -> int:
    """The one place that calls into the pool's configuration (see the module doc)."""
    return inner.configure(n_jobs, options)


class ParmapBackend(ParallelBackendBase):
    """joblib's backend contract on top of parmap's shared worker pool.

    Backend parameters (``parallel_config(backend="parmap", **params)``):
    ``idle_timeout`` (seconds an idle pool lives), ``start_method`` (None: parmap's
    choice), ``initializer`` and ``initargs`` (run once in each worker).
    """

    default_n_jobs = 1
    supports_retrieve_callback = True
    supports_return_generator = True
    supports_timeout = True
    supports_inner_max_num_threads = True
    supports_sharedmem = False
    uses_threads = False

    def __init__(self, nesting_level: int | None = None,
                 inner_max_num_threads: int | None = None, *,
                 idle_timeout: float = 300.0, start_method: str | None = None,
                 initializer: Callable | None = None, initargs: tuple = ()):
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads)
        # validates the arguments now, where the user passed them
        ProcessBackend(idle_timeout=idle_timeout, start_method=start_method,
                       initializer=initializer, initargs=initargs)
        self._pool_args: dict[str, Any] = {"idle_timeout": idle_timeout,
                                           "initializer": initializer, "initargs": initargs}
        self.start_method = start_method
        self._inner: ProcessBackend | None = None
        self._n_jobs = 1
        self._threads = 1  # thread cap of each worker's libraries and nested calls
        self._nested: tuple[Any, int | None] | None = None
        self._lock = threading.Lock()
        #: (the joblib Parallel whose call holds this backend, held weakly, its thread),
        #: from configure() to terminate(); see _held_elsewhere and _twin
        self._holder: tuple[weakref.ref, int] | None = None
        self._call = object()  # this call's token: late results of an old call are ignored
        self._next_index = 0  # index of the next task of this call
        self._batch_size = 1
        self._per_task: float | None = None

    # ------------------------------------------------------------------ sizing up
    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning; use a positive "
                             "number of workers, -1 for all CPUs, or None")
        if n_jobs is None or _in_parmap_worker():
            return 1  # a task of ours starts no processes: no fork bombs
        if n_jobs < 0:
            return max(cpu_count() + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: Any = None,
                  require: Any = None, **kwargs: Any) -> int:
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        with self._lock:
            busy = self._held_elsewhere(parallel)
            if not busy:
                self._holder = None if parallel is None else (
                    weakref.ref(parallel), threading.get_ident())
        if busy:
            raise FallbackToBackend(self._twin())
        try:
            return self._configure(n_jobs, parallel, kwargs)
        except BaseException:
            with self._lock:
                self._holder = None
            raise

    @property
    def parallel(self) -> Any:
        """The joblib ``Parallel`` whose call holds this backend (held weakly)."""
        return self._holder[0]() if self._holder is not None else None

    def _held_elsewhere(self, parallel: Any) -> bool:
        """Whether another joblib call holds this backend (under ``_lock``).

        joblib hands every ``Parallel`` of a ``parallel_config`` block the same backend
        object, and a call made while a generator of another is unfinished (a loop over
        one call's results that makes a call per item) would share its state: its end
        released the pool under the first call, whose next batch failed. Such a call
        gets a twin instead (:meth:`_twin`).

        The holder holds it inside its ``with Parallel(...)`` block and while its
        output generator lives (joblib's own attributes). A call that failed before its
        output was made (a non-iterable input) never reaches terminate(); its
        ``Parallel`` holds nothing, and the next call takes the backend back (joblib
        refuses the failed object's later calls as "already running"). A holder in
        another thread may be between configure() and its output: it holds."""
        if self._holder is None:
            return False
        ref, thread = self._holder
        holder = ref()
        if holder is None or holder is parallel:
            return False
        if thread != threading.get_ident() or getattr(holder, "_managed_backend", True):
            return True
        output = getattr(holder, "_call_ref", ref)  # (unknown joblib: it holds)
        return output is not None and output() is not None

    def _twin(self) -> ParmapBackend:
        """A copy of this backend (subclass and parameters included) with none of its
        state, for a call made while another holds it: both use the same shared pool."""
        twin = copy.copy(self)
        twin._lock = threading.Lock()
        twin._holder = twin._inner = twin._nested = None
        twin._call, twin._next_index = object(), 0
        twin._batch_size, twin._per_task = 1, None
        return twin

    def _configure(self, n_jobs: int, parallel: Any, kwargs: dict[str, Any]) -> int:
        unknown = sorted(set(kwargs) - _JOBLIB_CALL_ARGS)
        if unknown:
            raise TypeError(f"Parallel(...) got {', '.join(map(repr, unknown))}, which the "
                            f"parmap backend does not accept; pool settings (idle_timeout, "
                            f"start_method, initializer, initargs) go to "
                            f"parallel_config(backend='parmap', ...)")
        max_nbytes = kwargs.get("max_nbytes")
        if isinstance(max_nbytes, str):
            from joblib.disk import memstr_to_bytes  # type: ignore[import-untyped]

            max_nbytes = memstr_to_bytes(max_nbytes)
        options = CallOptions(getattr(parallel, "timeout", None), max_nbytes,
                               kwargs.get("mmap_mode", "r"), kwargs.get("temp_folder"),
                               self.inner_max_num_threads, kwargs.get("verbose", 0))
        self._threads = self.inner_max_num_threads or max(cpu_count() // n_jobs, 1)
        start_method = self.start_method
        if start_method is None and self._threads > 1 and _libgomp_loaded():
            start_method = "forkserver"  # see the module doc: fork + libgomp
        if self._inner is None or self._inner.start_method != start_method:
            if self._inner is not None:
                self._inner.terminate()
            self._inner = ProcessBackend(start_method=start_method, **self._pool_args)
        self._n_jobs = _configure_pool(self._inner, n_jobs, options)
        return self._n_jobs

    def get_nested_backend(self) -> tuple[Any, int | None]:
        """Parallel calls made by our tasks run on at most ``threads`` threads (one:
        sequentially), inside the worker: they never start processes."""
        nested = self._nested
        if nested is None or nested[0].max_n_jobs != self._threads:
            level = (self.nesting_level or 0) + 1
            nested = self._nested = (CappedThreads(self._threads, nesting_level=level),
                                     None)
        return nested

    # ------------------------------------------------------------------ a call
    def start_call(self) -> None:
        _drop_read_ahead(self.parallel)
        with self._lock:
            self._call, self._next_index = object(), 0
            self._batch_size, self._per_task = 1, None
        if self._inner is not None:
            self._inner.start_call()

    def stop_call(self) -> None:
        if self._inner is not None:
            self._inner.stop_call()

    def submit(self, func: Any, callback: Callable[[Any], None] | None = None) -> Batch:
        """Send joblib's batch to the pool; every outcome, even a failure to send it,
        comes back through ``callback``."""
        items: Any = getattr(func, "items", None)
        opaque = not (isinstance(items, list) and items
                      and all(type(t) is tuple and len(t) == 3 for t in items))
        tasks: list[tuple] = []
        if opaque:  # not joblib's BatchedCalls: one task that returns the result list
            tasks.append((func, (), {}))
        else:
            backend, n_jobs = self.get_nested_backend()
            # one wrapper per function (delayed(f)(x) tasks share f): sent once per batch
            wrappers: dict[int, NestedCall] = {}
            limits = library_limits(self._threads, self.inner_max_num_threads)
            for f, args, kwargs in items:
                wrapper = wrappers.get(id(f))  # items hold every f: no id is reused here
                if wrapper is None:
                    wrapper = wrappers[id(f)] = NestedCall(f, backend, n_jobs, limits)
                tasks.append((wrapper, args, kwargs))
        with self._lock:
            call, start, per_task = self._call, self._next_index, self._per_task
            self._next_index += len(tasks)
        batch = Batch(start, tasks)
        if per_task is not None:
            # the pool queues a batch behind a busy worker only if it is short: a long
            # one waits for the first free worker instead (no idle worker at the end)
            batch.expected = per_task * len(tasks)

        def done(outcome: Any) -> None:
            if isinstance(outcome, list):
                self._observe(call, len(batch), batch.duration)
                if opaque:
                    outcome = outcome[0]
            if callback is not None:
                callback(outcome)

        try:
            if self._inner is None:
                raise RuntimeError("ParmapBackend.submit called before configure")
            self._inner.submit(batch, done)
        except Exception as exc:  # e.g. an argument that cannot be pickled
            done(exc)
        return batch

    apply_async = submit  # the name joblib < 1.5 calls

    def retrieve_result_callback(self, out: Any) -> list:
        if isinstance(out, BaseException):
            raise _for_joblib(out)
        results: list = out
        return results

    def compute_batch_size(self) -> int:
        return self._batch_size

    def batch_completed(self, batch_size: int, duration: float) -> None:
        """Unused: joblib's duration counts the wait in the queue; _observe has the
        worker's own measure."""

    def _observe(self, call: object, n_tasks: int, duration: float) -> None:
        """Auto batching: batches of about ProcessBackend.target_batch_duration."""
        with self._lock:
            if call is not self._call or n_tasks <= 0:
                return
            per_task = max(duration / n_tasks, 1e-7)
            if self._per_task is None:
                self._per_task = per_task
            else:  # weighted by evidence: a big batch says more than one task
                weight = n_tasks / (n_tasks + self._batch_size)
                self._per_task += weight * (per_task - self._per_task)
            ideal = int(ProcessBackend.target_batch_duration / self._per_task)
            self._batch_size = max(1, min(ideal, self._batch_size * MAX_GROWTH, MAX_BATCH))

    # ------------------------------------------------------------------ the end
    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Drop this call's queued batches and kill the workers running its tasks; the
        pool (and the other calls on it) carry on."""
        if self._inner is not None:
            self._inner.abort_everything(ensure_ready=ensure_ready)

    def terminate(self) -> None:
        """Release the shared pool; its workers stay for the next call."""
        if self._inner is not None:
            self._inner.terminate()
        with self._lock:
            self._holder = None

    def __repr__(self) -> str:
        return f"ParmapBackend(n_jobs={self._n_jobs})"


def _in_parmap_worker() -> bool:
    return multiprocessing.current_process().name == "parmap-worker"


def _libgomp_loaded() -> bool:
    """Is GNU OpenMP loaded in this process (Linux; elsewhere parmap does not fork)?"""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:
        return True  # unknown: assume the worst


def _for_joblib(exc: BaseException) -> BaseException:
    """The exception a joblib user expects, keeping what parmap knows.

    joblib drops the ``__traceback__`` of a task's exception, so the worker's traceback
    (rebuilt by parmap) is kept as text in ``__cause__``, as loky does. The text holds
    the whole chain: an exception raised ``from`` another replaces that cause with it
    (keeping the cause would have lost the frames that raised the exception itself).
    """
    if isinstance(exc, WorkerCrashedError) and not isinstance(exc, TerminatedWorkerError):
        return JoblibWorkerCrashedError(exc.args[0] if exc.args else str(exc),
                                        exc.exitcode, exc.task_indices)
    if isinstance(exc, TaskTimeoutError) and not isinstance(exc, multiprocessing.TimeoutError):
        return JoblibTaskTimeoutError(*exc.args)
    if exc.__traceback__ is not None and not isinstance(exc.__cause__, RemoteTraceback):
        import traceback

        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        exc.__cause__ = RemoteTraceback(text)
    return exc


def _drop_read_ahead(parallel: Any) -> None:
    """joblib (1.6) keeps the batches a failed or cancelled call had read ahead in its
    ``Parallel``'s ``_ready_batches``, never emptied, and dispatches them first in the
    next call of that ``Parallel``: that call then returned the old call's results."""
    ready = getattr(parallel, "_ready_batches", None)
    while ready is not None and not ready.empty():
        try:
            ready.get_nowait()
        except Exception:  # emptied meanwhile
            break
