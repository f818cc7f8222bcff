"""What watches one ``Parallel`` call: ``verbose`` lines, the ``progress`` bar, ``insights``.

``Parallel`` makes a :class:`Monitor` only when one of them is on; otherwise a call runs
exactly as before, with nothing in its loops. The monitor is, for the dispatcher::

    on_progress(dispatcher)   after each completed batch, in the consumer's thread:
                              verbose lines and the bar (done, total: None until the
                              input is exhausted)
    observer                  the Insights (or None): records each batch
    consumed(batches)         wraps the result batches to time the caller's own loop

and, for ``n_jobs=1``, :meth:`Monitor.run_inline`: the inline loop with the bar updated
at most every ``INLINE_INTERVAL`` and, with insights, a record per ~20 ms of tasks.
``close(done)`` ends it all: the final line and bar, the insights' end time.
"""
from __future__ import annotations

import sys
from itertools import count
from time import monotonic, perf_counter, time
from typing import Any, Callable, Generator, Iterable, Iterator

from ._delayed import InlineStop, check_task, each_result
from ._genexpr import delayed_calls
from ._insights import Insights
from ._progress import INLINE_INTERVAL, Bar, Progress, make_bar
from ._record import BatchRecord

__all__ = ["Monitor", "backend_label"]

#: while tasks run inline, one insights record covers about this many seconds of tasks
INLINE_RECORD = 0.02


def backend_label(backend: Any, inline: bool) -> str:
    """``"process"``, ``"threading"``, ``"sequential"``: how reports name a backend."""
    if inline:
        return "sequential"
    name = type(backend).__name__
    return name[:-len("Backend")].lower() if name.endswith("Backend") else name


class Monitor:
    def __init__(self, verbose: float, progress: object, insights: bool, n_jobs: int,
                 backend: Any, inline: bool, total: int | None, started: float,
                 write: Callable[[str], None] | None = None):
        label = backend_label(backend, inline)
        self.lines = Progress(verbose, n_jobs, "sequential" if inline
                              else type(backend).__name__, write) if verbose else None
        self.bar: Bar | None = make_bar(progress, total)
        self.insights = Insights(label, n_jobs, started) if insights else None
        self.total = total

    @staticmethod
    def wanted(verbose: float, progress: object, insights: bool) -> bool:
        return bool(verbose) or (progress is not False and progress is not None) or insights

    # ------------------------------------------------------------------ dispatched calls
    def __call__(self, dispatcher: Any) -> None:
        """The dispatcher's ``on_progress`` hook."""
        done, total = dispatcher.n_completed, dispatcher.n_tasks
        if self.lines is not None:
            self.lines.update(done, total)
        if self.bar is not None:
            self.bar.update(done, total)

    def consumed(self, batches: Iterator[list]) -> Iterator[list]:
        """``batches``, timing how long the caller keeps each (its own loop)."""
        insights = self.insights
        if insights is None:
            yield from batches
            return
        for results in batches:
            t0 = perf_counter()
            yield results
            del results  # not kept while the next batch is awaited
            insights.consumer_s += perf_counter() - t0

    closed = False
    #: inline: the record the tasks running now go to, and those tasks (``_observed``)
    _pending: tuple[BatchRecord, dict[int, tuple]] | None = None

    def close(self, done: int | None) -> None:
        """The call ended: with ``done`` tasks, or (None) failed or was cancelled. Only
        the first close counts."""
        if self.closed:
            return
        self.closed = True
        pending, self._pending = self._pending, None
        if pending is not None:  # inline tasks run since the last record
            self._add(*pending)
        if self.lines is not None and done is not None:
            self.lines.finish(done)
        if self.bar is not None:
            self.bar.close(done)
        if self.insights is not None:
            self.insights.close(done is not None)

    # ------------------------------------------------------------------ inline calls
    def counted(self, iterable: Iterable) -> Iterable:
        """``iterable``, and its number of tasks as the total where it is
        ``delayed(f)(x) for x in xs`` over a range, list or tuple (as the dispatcher
        reads it with workers): read through its ``xs`` from now on."""
        found = None if self.total is not None else delayed_calls(iterable)
        if found is None or found[2] is None:
            return iterable
        func, xs, self.total = found
        return ((func, (x,), {}) for x in xs)

    def run_inline(self, iterable: Iterable) -> Generator[Any, None, None]:
        """Every task in the caller's thread, unwrapped, watched. Closes the monitor."""
        done = 0
        try:
            if self.insights is None:
                for done, result in zip(count(1), each_result(iterable)):
                    yield result
                    self._update_inline(done)
            else:
                for done, result in zip(count(1), self._observed(iterable)):
                    yield result
                    self._update_inline(done)
        except BaseException:
            self.close(None)
            raise
        self.close(done)

    _next_update = 0.0

    def _update_inline(self, done: int) -> None:
        if self.lines is not None:
            self.lines.update(done, self.total)
        if self.bar is not None:
            now = monotonic()
            if now >= self._next_update:
                self._next_update = now + INLINE_INTERVAL
                self.bar.update(done, self.total)

    def _observed(self, iterable: Iterable) -> Iterator[Any]:
        """Like :func:`_delayed.each_result`, each task timed; a record per ``INLINE_RECORD`` seconds."""
        insights = self.insights
        assert insights is not None
        tasks: dict[int, tuple] = {}
        record: BatchRecord | None = None
        until = 0.0
        iterator = iter(iterable)
        index = 0
        try:
            while True:
                t0 = perf_counter()
                task: Any = next(iterator, _END)
                insights.input_s += perf_counter() - t0
                if task is _END:
                    break
                if type(task) is not tuple or len(task) != 3:
                    check_task(task, index)
                if record is None:
                    record = BatchRecord(time())
                    record.start()
                    until = monotonic() + INLINE_RECORD
                    self._pending = record, tasks
                tasks[index] = task
                func, args, kwargs = task
                try:
                    result = record.run(index, func, args, kwargs)
                except StopIteration as exc:
                    raise InlineStop(exc, index, task) from None
                if monotonic() >= until:
                    self._pending = None
                    self._add(record, tasks)
                    record, tasks = None, {}
                t1 = perf_counter()
                yield result
                insights.consumer_s += perf_counter() - t1
                index += 1
        finally:  # (not at the interpreter's exit, for a generator left open: too late)
            pending, self._pending = self._pending, None
            if pending is not None and not sys.is_finalizing():
                self._add(*pending)

    def _add(self, record: BatchRecord, tasks: dict[int, tuple]) -> None:
        record.finish(tasks.__getitem__)
        record.collected = record.ended
        assert self.insights is not None
        self.insights.add(record)


_END = object()
