"""Lazy dispatch: read tasks, group them into batches, keep a bounded number in flight.

Data flow::

    user iterable ──(locked read)──> Batch ──submit──> backend workers
          ^                                                   │
          │ dispatch() from the caller's thread, and from     │ callback(outcome)
          │ the backend's threads when a batch completes      v
          └──────────────── Dispatcher ◄──── events queue ◄───┘
                                 │
                                 └──> results(): in submission or completion order

The throttle: at most ``pre_dispatch`` batches are *unreleased* at any time. A batch is
released when its results are no longer the dispatcher's to hold: on completion for
``return_as="list"`` (the list keeps them anyway), when handed to the consumer for the
generator modes. So an infinite generator is read at most ``pre_dispatch`` batches ahead
of what the caller consumed, and a slow consumer bounds memory.

The input is a :class:`~parmap._input.LockedIterator`: read only under its lock, whichever thread
dispatches. Completion callbacks must not block, so they only *try* the lock; whoever holds
it re-checks the room after each batch, so no dispatch opportunity is lost. All
bookkeeping that decides what to yield happens in the consumer's thread, from the events
queue.

Each batch carries the settings that ``Parallel`` calls made by its tasks see: the
backend's :meth:`~parmap.backends._base.ParallelBackendBase.get_nested_backend`, one
nesting level deeper (applied by the batch wherever it runs, worker processes included).

An optional :class:`Observer` (``Parallel(insights=True)``) sees each batch as it is
submitted, with the time reading the input took, and each outcome as it arrives.
"""
from __future__ import annotations

import math
import threading
from operator import itemgetter, length_hint
from queue import Empty, SimpleQueue
from time import monotonic, perf_counter
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, cast

from ._batching import MAX_PRIMED, AutoBatchSizer, estimate_nbytes, fit_to_limit
from ._delayed import Batch, check_task, compact
from ._errors import timeout_error
from ._input import LockedIterator
from .backends._base import Outcome, ParallelBackendBase

__all__ = ["Dispatcher", "Observer", "nested_settings", "statistics"]

#: how often the consumer wakes to check timeouts (and, on Windows, to see Ctrl-C)
POLL_INTERVAL = 0.1


class Observer(Protocol):
    """Watches a call's batches (insights); both methods must be quick and never raise."""

    def submitting(self, batch: Batch, read_s: float) -> None:
        """``batch`` goes to the backend now; reading and batching its tasks took
        ``read_s`` seconds. Called with the input's lock held."""

    def completed(self, batch: Batch, outcome: Outcome) -> None:
        """The backend called back with ``outcome``; from any thread."""


class _Job:
    """One submitted batch, as the dispatcher tracks it."""

    __slots__ = ("batch", "outcome", "ready", "task_index", "task_started")

    def __init__(self, batch: Batch):
        self.batch = batch
        self.outcome: Outcome | None = None
        self.ready = False  # set by the consumer thread once it has seen the outcome
        self.task_index = -1
        self.task_started = 0.0

    def mark(self, index: int, started: float) -> None:  # Batch.tracker protocol
        self.task_index = index
        self.task_started = started


class _InputError:
    """Raised by the user's iterable (or by checking its items) while dispatching."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


def nested_settings(backend: ParallelBackendBase) -> Mapping[str, object] | None:
    """What ``Parallel`` calls made by the backend's tasks see (see the module doc)."""
    spec = backend.get_nested_backend()
    if spec is None:
        return None
    nested_backend, n_jobs = spec
    settings: dict[str, object] = {"backend": nested_backend, "backend_params": {},
                                   "nesting_level": backend.nesting_level + 1}
    if n_jobs is not None:
        settings["n_jobs"] = n_jobs
    return settings


def _checked_compact(tasks: list, start: int) -> tuple[Callable[..., Any] | None, list]:
    """``tasks`` (the first of them has index ``start``) in compact form, when the usual
    ``delayed(f)(x)`` (the batch's fast loop); an item that is not a task is named. The
    shape checks run at C speed; only a batch that fails them is checked task by task."""
    if not (set(map(type, tasks)) == {tuple} and set(map(len, tasks)) == {3}
            and all(map(callable, map(_FUNC, tasks)))
            and set(map(type, map(_ARGS, tasks))) == {tuple}
            and set(map(type, map(_KWARGS, tasks))) == {dict}):
        for offset, task in enumerate(tasks):
            check_task(task, start + offset)
    return compact(tasks)


_FUNC, _ARGS, _KWARGS = itemgetter(0), itemgetter(1), itemgetter(2)


class Dispatcher:
    """Runs one ``Parallel`` call on a configured backend."""

    def __init__(self, iterable: Iterable, backend: ParallelBackendBase, n_jobs: int,
                 pre_dispatch: int | None, batch_size: int | str, retain: bool,
                 timeout: float | None = None,
                 on_progress: Callable[[Dispatcher], None] | None = None,
                 observer: Observer | None = None, prime: bool = True):
        self.backend, self.n_jobs, self.retain = backend, n_jobs, retain
        self.timeout = timeout
        self.on_progress = on_progress
        self.observer = observer
        self._input = LockedIterator(iterable)
        self.n_tasks: int | None = self._input.length
        self._limit = pre_dispatch if pre_dispatch is not None else math.inf
        self._fixed_size = batch_size if isinstance(batch_size, int) else None
        self._max_size = backend.max_batch_size  # e.g. a worker's max_tasks_per_child
        self._fitted: int | None = None  # the last auto size fitted to it
        self.sizer = AutoBatchSizer(backend.target_batch_duration, n_jobs, self.n_tasks)
        self._prime = prime  # False: the first batch holds one task, whatever was learnt
        self._nested = nested_settings(backend)
        self._track = timeout is not None and not backend.enforces_timeout
        self._count_lock = threading.Lock()  # guards _unreleased; never held across calls
        self._dispatching = False
        self._abort_done = False
        self._events: SimpleQueue[_Job | _InputError] = SimpleQueue()
        self._jobs: dict[int, _Job] = {}  # batch start index -> job, in dispatch order
        self.exhausted = False
        self.aborted = False
        self._cancelled_because: str | None = None  # see abort
        self._handed: tuple[list, Iterator] | None = None  # last list out, its iterator
        self.n_dispatched = 0  # tasks read from the iterable and submitted
        self.n_batches = 0
        self.n_completed = 0  # tasks whose results the consumer has seen
        self._unreleased = 0  # batches dispatched and not yet released (see module doc)

    # ------------------------------------------------------------------ dispatching
    def dispatch(self, blocking: bool = True) -> None:
        """Submit batches while there is room. Safe from any thread, never re-entrant."""
        lock = self._input.lock
        if not lock.acquire(blocking):
            return
        try:
            if self._dispatching:  # a synchronous backend called back into us
                return
            self._dispatching = True
            try:
                while (not self.exhausted and not self.aborted
                       and self._unreleased < self._limit):
                    self._dispatch_one()
            except BaseException as exc:
                self.aborted = True
                if blocking and not isinstance(exc, Exception):
                    raise  # Ctrl-C, SystemExit in the caller's thread: now, not after results
                self._events.put(_InputError(exc))
            finally:
                self._dispatching = False
        finally:
            lock.release()

    def _dispatch_one(self) -> None:
        start = self.n_dispatched
        size = self._fixed_size or self.sizer.next_size(start)
        if self._max_size is not None:  # an explicit batch_size is only capped
            size = min(size, self._max_size) if self._fixed_size \
                else fit_to_limit(size, self._max_size, self._fitted)
            self._fitted = size
        observer = self.observer
        read_from = perf_counter() if observer is not None else 0.0
        func, tasks, unary = self._input.take_compact(size)
        # the first batch; its size may come from earlier calls of the function
        if start == 0 and tasks and self._fixed_size is None and (
                func is not None or type(tasks[0]) is tuple and len(tasks[0]) == 3):
            func, tasks, unary, size = _first_batch(self, func, tasks, unary, size)
        if tasks and func is None:
            func, tasks = _checked_compact(tasks, start)
        # only now: a consumer that sees the input exhausted with no batch left returns,
        # and must not do so before the error of an item of this batch reached it
        if len(tasks) < size:
            self.exhausted = True
            self.n_tasks = start + len(tasks)
        if not tasks:
            return
        batch = Batch(start, tasks, func, self._nested)
        batch.unary = unary
        if self.sizer.per_task is not None:
            batch.expected = self.sizer.per_task * len(tasks)
        job = _Job(batch)
        if self._track:
            batch.tracker = job
        self._jobs[start] = job
        self.n_dispatched = start + len(tasks)
        self.n_batches += 1
        with self._count_lock:
            self._unreleased += 1
        if observer is not None:
            observer.submitting(batch, perf_counter() - read_from)
        self.backend.submit(batch, lambda outcome: self._on_done(job, outcome))

    def _on_done(self, job: _Job, outcome: Outcome) -> None:
        """Backend callback, from any thread."""
        job.outcome = outcome
        if self.observer is not None:
            self.observer.completed(job.batch, outcome)
        if isinstance(outcome, list):
            batch = job.batch
            nbytes = batch.nbytes if batch.nbytes >= 0 else estimate_nbytes(outcome)
            self.sizer.observe(len(batch), batch.duration, batch.task(0)[0], nbytes)
        if self.retain:
            with self._count_lock:
                self._unreleased -= 1
        self._events.put(job)
        if self.retain and not self.aborted and self.backend.dispatch_from_callbacks:
            # Opportunistic: keeps workers fed without waiting for the consumer to wake.
            # If the lock is busy, the consumer's dispatch after this event covers it.
            self.dispatch(blocking=False)

    def _release(self) -> None:
        """Called by the consumer after it handled (list) or yielded (generators) a batch."""
        if not self.retain:
            with self._count_lock:
                self._unreleased -= 1
        self.dispatch()

    # ------------------------------------------------------------------ consuming
    def start(self) -> None:
        self.backend.start_call()
        self.dispatch()

    def batches(self, ordered: bool) -> Iterator[list]:
        """Yield the result list of each batch, in submission or completion order."""
        return self._ordered() if ordered else self._unordered()

    def close(self, finished: bool, keep_backend: bool) -> None:
        """End the call; cancel what is left unless it ``finished``."""
        if not finished:
            self.aborted = True
            # even if abort() ran already: without keep_backend the workers must now go,
            # without waiting for tasks that may never end
            self.backend.abort_everything(ensure_ready=keep_backend)
        self.backend.stop_call()

    @property
    def finished(self) -> bool:  # every task read, every result handed out
        return self.exhausted and not self._jobs and (
            self._handed is None or length_hint(self._handed[1]) == 0)

    def _ordered(self) -> Iterator[Any]:
        next_start = 0
        jobs = self._jobs
        while True:
            self._check_cancelled()
            job = jobs.get(next_start)
            if job is not None and job.ready:
                del jobs[next_start]
                next_start += len(job.batch)
                if not self.retain:
                    self._release()  # (which may read the input a long while)
                results = cast(list, job.outcome)  # (ready: a list)
                handed = iter(results)  # (an iterator: ``finished`` asks what is left)
                self._handed = results, handed  # then the check: see abort
                self._check_cancelled()
                yield handed
                self._handed = job = None  # not kept while the next batch is awaited
                del results, handed
            elif self.exhausted and not jobs:
                return
            else:
                self._handle(self._next_event())
                if self.retain:
                    self._release()

    def _unordered(self) -> Iterator[Any]:
        jobs = self._jobs
        while True:
            self._check_cancelled()  # (also after the last: its list may have been cut)
            if self.exhausted and not jobs:
                return
            job = self._handle(self._next_event())
            del jobs[job.batch.start]
            self._release()
            results = cast(list, job.outcome)
            handed = iter(results)
            self._handed = results, handed
            self._check_cancelled()
            yield handed
            self._handed = None
            del job, results, handed  # not kept while the next batch is awaited

    def _check_cancelled(self) -> None:
        """No result once the call's block ended (``abort(why=...)``), even one in."""
        if self._cancelled_because is not None:
            raise RuntimeError(self._cancelled_because)

    def _next_event(self) -> _Job | _InputError:
        if not self._jobs and not self.exhausted:
            self.dispatch()  # nothing in flight: make sure something is
        get = self._events.get
        while True:
            try:
                return get(timeout=POLL_INTERVAL)
            except Empty:
                self._check_cancelled()
                if self._track:
                    self._check_timeouts()

    def _handle(self, event: _Job | _InputError) -> _Job:
        outcome = event.exc if isinstance(event, _InputError) else event.outcome
        if isinstance(outcome, BaseException):  # the input's error, or the batch's
            self.abort()
            raise outcome
        assert isinstance(event, _Job) and outcome is not None  # put once it is set
        event.ready = True
        self.n_completed += len(outcome)
        if self.on_progress is not None:
            self.on_progress(self)
        return event

    def _check_timeouts(self) -> None:
        now = monotonic()
        for job in list(self._jobs.values()):
            if job.outcome is None and job.task_started and \
                    now - job.task_started > self.timeout:  # type: ignore[operator]
                index = job.task_index
                task = job.batch.task(index - job.batch.start)
                self.abort()
                raise timeout_error(index, task, self.timeout, "the call was cancelled")

    def abort(self, ensure_ready: bool = True, why: str | None = None) -> None:
        """Stop dispatching and cancel what the backend has not finished. ``why``: what a
        consumer still waiting for results is told (cancelled jobs send none)."""
        self.aborted, self._cancelled_because = True, why or self._cancelled_because
        # the rest of the list the consumer iterates is not handed out either (it sets
        # _handed before it checks _cancelled_because: one of the two sees the other)
        handed = self._handed
        if why is not None and handed is not None:
            handed[0].clear()
        if not self._abort_done:
            self._abort_done = True
            self.backend.abort_everything(ensure_ready=ensure_ready)


def _first_batch(d: Dispatcher, func: Callable[..., Any] | None, tasks: list, unary: bool,
                 size: int) -> tuple[Callable[..., Any] | None, list, bool, int]:
    """Size the first batch of ``d`` (read by ``take_compact``, and in its form) from
    earlier calls of the same function, if any."""
    if d._prime:
        d.sizer.prime(func if func is not None else tasks[0][0], d.n_tasks)
    want = d.sizer.size
    if d._max_size is not None:
        want = fit_to_limit(want, d._max_size)
    if want <= size:
        return func, tasks, unary, size
    # an input of unknown length: read enough to give every worker a batch (within
    # MAX_PRIMED), one more to tell if that was all: n_jobs tasks that wait for each
    # other must not share a batch because an earlier call found the function quick
    ahead = want if d.n_tasks is not None else \
        max(want, min(want * d.n_jobs, MAX_PRIMED))
    func, tasks, unary = d._input.take_more((func, tasks, unary), ahead + 1 - len(tasks))
    if len(tasks) > ahead:
        d._input.push_back(func, tasks[want:], unary)
        tasks = tasks[:want]
    elif d.n_tasks is None and len(tasks) > 1:
        # that was every task: share them out so that every worker gets some
        share = math.ceil(len(tasks) / d.n_jobs)
        d.sizer.size = share  # the next batches too: one per worker, not one more
        d._input.push_back(func, tasks[share:], unary)
        tasks = tasks[:share]
    return func, tasks, unary, len(tasks)  # the end, if this was it, shows next read


def statistics(d: Dispatcher) -> dict[str, Any]:
    """A snapshot of a call's dispatching, for tests."""
    return {
        "dispatched_tasks": d.n_dispatched,
        "dispatched_batches": d.n_batches,
        "completed_tasks": d.n_completed,
        "unreleased_batches": d._unreleased,
        "batch_size": d._fixed_size or d.sizer.size,
        "exhausted": d.exhausted,
        "n_tasks": d.n_tasks if d.exhausted or d.n_tasks else None,
    }
