"""``delayed`` and the batch object that carries tasks to a backend.

A task is the plain tuple ``(function, args, kwargs)``, as in joblib, so code that builds
those tuples by hand keeps working. ``delayed(f)`` is called once per task in the usual
idiom ``delayed(f)(x) for x in xs``, so it is kept cheap: one closure, no
``functools.wraps`` (about a microsecond per task), and the wrapper of the last function
is reused, which halves the cost of the idiom.
"""
from __future__ import annotations

from time import monotonic
from typing import Any, Callable

from ._errors import add_task_note

__all__ = ["delayed", "Batch", "check_task", "compact"]

Task = tuple  # (function, args, kwargs)


_last: tuple = (None, None)  # (function, its wrapper): the idiom calls delayed(f) per task


def delayed(function: Callable) -> Callable[..., Task]:
    """Capture a call: ``delayed(f)(*args, **kwargs)`` returns ``(f, args, kwargs)``.

    Also usable as a decorator: ``@delayed`` makes every call of the function return the
    task tuple instead of running it.
    """
    global _last
    last = _last  # one read: another thread may replace it, never tear it
    if last[0] is function:
        return last[1]
    if not callable(function):
        raise TypeError(f"delayed(function): expected a callable, got "
                        f"{type(function).__name__} {function!r:.60}")

    def delayed_function(*args: Any, **kwargs: Any) -> Task:
        return function, args, kwargs

    delayed_function.__wrapped__ = function  # type: ignore[attr-defined]
    _last = (function, delayed_function)
    return delayed_function


def check_task(task: Any, index: int) -> None:
    """Raise a TypeError naming the task when ``task`` is not a ``delayed`` call."""
    if not (isinstance(task, tuple) and len(task) == 3 and callable(task[0])
            and isinstance(task[1], tuple) and isinstance(task[2], dict)):
        raise TypeError(
            f"Parallel(...)(iterable): item {index} of the iterable is {type(task).__name__} "
            f"{task!r:.80}, not a task; wrap each call with delayed, as in "
            f"`Parallel()(delayed(f)(x) for x in xs)`")


class Batch:
    """Consecutive tasks ``start, start+1, ...`` run together in one worker call.

    ``Batch()`` returns the list of results. When a task raises, its exception propagates
    with a note naming the task index and call. ``tracker`` (optional) receives
    ``tracker.mark(index, started)`` before each task so a timeout can be enforced.
    """

    __slots__ = ("start", "tasks", "func", "tracker", "duration", "failed", "expected",
                 "transform")

    def __init__(self, start: int, tasks: list, func: Callable | None = None):
        self.start = start
        self.tasks = tasks
        #: the compact form: every task calls ``func`` with no keywords, and ``tasks``
        #: holds only the argument tuples (see :func:`compact`)
        self.func = func
        self.tracker: Any = None
        self.duration = 0.0  # seconds spent running the tasks, set by __call__
        self.failed = -1  # position in the batch of the task that raised
        self.expected: float | None = None  # seconds the dispatcher expects it to run
        self.transform: Callable[[Any], Any] | None = None  # applied to each result

    def __len__(self) -> int:
        return len(self.tasks)

    def __repr__(self) -> str:
        return f"<Batch of tasks {self.start}..{self.start + len(self.tasks) - 1}>"

    def task(self, position: int) -> Task:
        """The ``(function, args, kwargs)`` of the task at ``position`` in the batch."""
        if self.func is not None:
            return self.func, self.tasks[position], {}
        return self.tasks[position]

    def __call__(self) -> list:
        t0 = monotonic()
        out: list = []
        append = out.append
        tracker = self.tracker
        func = self.func
        try:
            if self.transform is not None:
                self._run_transformed(append)
            elif func is not None and tracker is None:
                for args in self.tasks:
                    append(func(*args))
            elif func is not None:
                index = self.start
                for args in self.tasks:
                    tracker.mark(index, monotonic())
                    append(func(*args))
                    index += 1
            elif tracker is None:
                for func, args, kwargs in self.tasks:
                    append(func(*args, **kwargs) if kwargs else func(*args))
            else:
                index = self.start
                for func, args, kwargs in self.tasks:
                    tracker.mark(index, monotonic())
                    append(func(*args, **kwargs))
                    index += 1
        except BaseException as exc:
            position = self.failed = len(out)
            add_task_note(exc, self.start + position, self.task(position))
            raise
        finally:
            self.duration = monotonic() - t0
        return out

    def _run_transformed(self, append: Callable[[Any], None]) -> None:
        transform, tracker, func = self.transform, self.tracker, self.func
        index = self.start
        for task in self.tasks:
            f, args, kwargs = (func, task, {}) if func is not None else task
            if tracker is not None:
                tracker.mark(index, monotonic())
            append(transform(f(*args, **kwargs)))
            index += 1


def compact(tasks: list) -> tuple[Callable | None, list]:
    """``(func, [args, ...])`` when every task calls the same ``func`` without keywords
    (the usual ``delayed(f)(x) for x in xs``), else ``(None, tasks)``.

    The compact form pickles the function once per batch instead of once per task and
    drops the empty keyword dicts: about 5x less work to serialise tiny tasks.
    """
    func = tasks[0][0]
    args = [a for f, a, k in tasks if f is func and not k]
    if len(args) == len(tasks):
        return func, args
    return None, tasks
