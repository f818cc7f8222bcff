"""``delayed``, and the batch: the safe-call wrapper every backend runs tasks through.

A task is the plain tuple ``(function, args, kwargs)``, as in joblib, so code that builds
those tuples by hand keeps working. ``delayed(f)`` is called once per task in the usual
idiom ``delayed(f)(x) for x in xs``, so it is kept cheap: one closure, no
``functools.wraps`` (about a microsecond per task), and the wrapper of the last function
is reused, which halves the cost of the idiom.

A :class:`Batch` is the *safe-call wrapper*: calling it runs its tasks in order and
returns their results; when a task raises, the exception propagates unchanged, with a
note naming the task (index and call), and the batch records which task it was. The
same object runs in the caller (sequential), in a thread, or in a worker process.
"""
from __future__ import annotations

from time import monotonic
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

from . import _context
from ._errors import add_task_note
from ._public import public
from ._record import BatchRecord, run_observed

__all__ = ["delayed", "Batch", "Task", "check_task", "is_task", "compact", "expand",
           "stopped_error", "InlineStop", "each_result"]

#: ``(function, args, kwargs)``
Task = tuple


class Tracker(Protocol):
    """Told which task starts when, so that a timeout can be enforced from outside."""

    def mark(self, index: int, started: float) -> None: ...


_last: tuple[Any, Any] = (None, None)  # (function, its wrapper): delayed(f) is called per task


@public
def delayed(function: Callable[..., Any]) -> Callable[..., Task]:
    """Capture a call: ``delayed(f)(*args, **kwargs)`` returns ``(f, args, kwargs)``.

    Also usable as a decorator: ``@delayed`` makes every call of the function return the
    task tuple instead of running it.
    """
    global _last
    last = _last  # one read: another thread may replace it, never tear it
    if last[0] is function:
        return last[1]  # type: ignore[no-any-return]
    if not callable(function):
        raise TypeError(f"delayed(function): expected a callable, got "
                        f"{type(function).__name__} {function!r:.60}")

    def delayed_function(*args: Any, **kwargs: Any) -> Task:
        return function, args, kwargs

    delayed_function.__wrapped__ = function  # type: ignore[attr-defined]
    _last = (function, delayed_function)
    return delayed_function


def is_task(task: object) -> bool:
    """Whether ``task`` is a ``(function, args, kwargs)`` tuple, as ``delayed`` makes."""
    return (isinstance(task, tuple) and len(task) == 3 and callable(task[0])
            and isinstance(task[1], tuple) and isinstance(task[2], dict))


def check_task(task: object, index: int) -> None:
    """Raise a TypeError naming the task when ``task`` is not a ``delayed`` call."""
    if not is_task(task):
        raise TypeError(
            f"Parallel(...)(iterable): item {index} of the iterable is {type(task).__name__} "
            f"{task!r:.80}, not a task; wrap each call with delayed, as in "
            f"`Parallel()(delayed(f)(x) for x in xs)`")


def stopped_error(index: int, task: tuple) -> RuntimeError:
    """What a task's StopIteration becomes: raised on, it would end the loop that
    collects the results, and drop the rest without a word."""
    error = RuntimeError(
        "the task raised StopIteration, which would silently end the loop that collects "
        "the results; as Python does in generators, it is turned into this RuntimeError: "
        "raise another exception in the task")
    add_task_note(error, index, task)
    return error


class InlineStop(Exception):
    """A task's StopIteration on its way out of the generators that run tasks inline
    (``n_jobs=1``), which would turn it into a RuntimeError that names nothing (PEP
    479): for a list it is raised as it is, as in a plain loop; for a generator, it
    becomes :func:`stopped_error`."""

    def __init__(self, stop: StopIteration, index: int, task: tuple):
        super().__init__(index)
        self.stop, self.index, self.task = stop, index, task


def each_result(tasks: Iterable) -> Iterator[Any]:
    """The tasks' results one by one, run here (``n_jobs=1``); a task's StopIteration
    leaves as :class:`InlineStop`."""
    for index, task in enumerate(tasks):
        if type(task) is not tuple or len(task) != 3:  # a str of 3 would unpack
            check_task(task, index)
        func, args, kwargs = task
        try:
            result = func(*args, **kwargs) if kwargs else func(*args)
        except StopIteration as exc:
            raise InlineStop(exc, index, task) from None
        yield result


class Batch:
    """Consecutive tasks ``start, start+1, ...`` run together in one worker call.

    ``Batch()`` returns the list of results. Optional parts, set by whoever runs it:
    ``tracker`` receives ``tracker.mark(index, started)`` before each task (timeouts);
    ``transform`` is applied to each result as its task returns; ``nested`` holds the
    settings that ``Parallel`` calls made *by the tasks* see (their backend, n_jobs and
    nesting level: see ``ParallelBackendBase.get_nested_backend``); ``record``, when set
    (a call with insights on), makes the batch time every task into it (see ``_record``).
    """

    __slots__ = ("start", "tasks", "func", "unary", "tracker", "duration", "failed",
                 "expected", "transform", "nested", "nbytes", "record")

    def __init__(self, start: int, tasks: list, func: Callable[..., Any] | None = None,
                 nested: Mapping[str, Any] | None = None):
        self.start = start
        self.tasks = tasks
        #: the compact form: every task calls ``func`` with no keywords, and ``tasks``
        #: holds only the argument tuples (see :func:`compact`)
        self.func = func
        #: compact form whose every task has one argument, and ``tasks`` holds those
        #: arguments themselves, not 1-tuples: how a worker receives ``delayed(f)(x)``
        #: batches (see ``process.protocol``), to unpickle and run at C speed
        self.unary = False
        self.nested = nested
        self.tracker: Tracker | None = None
        self.transform: Callable[[Any], Any] | None = None
        self.duration = 0.0  # seconds spent running the tasks, set by __call__
        self.failed = -1  # position in the batch of the task that raised
        self.expected: float | None = None  # seconds the dispatcher expects it to run
        #: bytes its results took to reach the caller, where a backend serialised them
        self.nbytes = -1
        self.record: BatchRecord | None = None

    def __len__(self) -> int:
        return len(self.tasks)

    def __repr__(self) -> str:
        return f"<Batch of tasks {self.start}..{self.start + len(self.tasks) - 1}>"

    def task(self, position: int) -> Task:
        """The ``(function, args, kwargs)`` of the task at ``position`` in the batch."""
        if self.func is not None:
            if self.unary:
                return self.func, (self.tasks[position],), {}
            return self.func, self.tasks[position], {}
        return self.tasks[position]  # type: ignore[no-any-return]

    def __call__(self) -> list:
        t0 = monotonic()
        out: list = []
        token = _context.push(self.nested) if self.nested is not None else None
        try:
            func = self.func
            if self.unary and (self.tracker is not None or self.transform is not None
                               or self.record is not None):
                # the general ways below take argument tuples
                self.tasks, self.unary = [(arg,) for arg in self.tasks], False
            if self.unary and func is not None:  # the fastest loop, at C speed: delayed(f)(x) in a worker
                out.extend(map(func, self.tasks))  # on error, out holds those before it
                if len(out) < len(self.tasks):  # map took a task's StopIteration for its end
                    raise StopIteration
            elif func is not None and self.tracker is None and self.transform is None \
                    and self.record is None:
                append = out.append
                for args in self.tasks:  # the fast loop: delayed(f)(*args) for ...
                    append(func(*args))
            elif self.record is not None:
                run_observed(self, out)  # insights: every task timed
            else:
                self._run_general(out)
        except BaseException as exc:
            position = self.failed = len(out)
            if isinstance(exc, StopIteration):  # raised on, it would end a loop instead
                raise stopped_error(self.start + position, self.task(position)) from exc
            add_task_note(exc, self.start + position, self.task(position))
            raise
        finally:
            if token is not None:
                _context.pop(token)
            self.duration = monotonic() - t0
        return out

    def _run_general(self, out: list) -> None:
        """Any function per task, keywords, a tracker and a transform."""
        append, tracker, transform = out.append, self.tracker, self.transform
        tasks = self.tasks if self.func is None else \
            [(self.func, args, None) for args in self.tasks]
        index = self.start
        for func, args, kwargs in tasks:
            if tracker is not None:
                tracker.mark(index, monotonic())
            result = func(*args, **kwargs) if kwargs else func(*args)
            append(result if transform is None else transform(result))
            index += 1


def compact(tasks: list) -> tuple[Callable[..., Any] | None, list]:
    """``(func, [args, ...])`` when every task calls the same ``func`` without keywords
    (the usual ``delayed(f)(x) for x in xs``), else ``(None, tasks)``.

    The compact form pickles the function once per batch instead of once per task and
    drops the empty keyword dicts: about 5x less work to serialise tiny tasks, and the
    fast loop of :meth:`Batch.__call__` runs it.
    """
    func = tasks[0][0]
    args = [a for f, a, k in tasks if f is func and type(k) is dict and not k]
    if len(args) == len(tasks):
        return func, args
    return None, tasks


def expand(func: Callable[..., Any] | None, items: list, unary: bool) -> list:
    """The task tuples of a compact form (the inverse of :func:`compact`): ``items`` are
    argument tuples of ``func``, or its single arguments where ``unary``; with ``func``
    None they are task tuples already."""
    if func is None:
        return items
    if unary:
        return [(func, (x,), {}) for x in items]
    return [(func, args, {}) for args in items]
