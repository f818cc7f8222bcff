"""The user's task stream, read under a lock by whichever thread dispatches.

Only :class:`LockedIterator`'s holder reads: the caller's thread, or a backend thread
completing a batch (``_dispatch``). Tasks are read one at a time in compact form
(:meth:`LockedIterator.take_compact`), so each task tuple is freed as soon as its
arguments are taken; the first batch too, however large earlier calls make it. An input
written ``delayed(f)(x) for x in xs`` is not run at all: its ``x``'s are read straight
from ``xs`` (see ``_genexpr``).
"""
from __future__ import annotations

import threading
from itertools import chain, islice
from operator import length_hint
from typing import Any, Callable, Iterable, Iterator

from ._delayed import expand, is_task
from ._genexpr import delayed_calls

__all__ = ["LockedIterator"]

_END = object()


class LockedIterator:
    """The user's iterable, read by whichever thread dispatches, one at a time.

    Holders of ``lock`` may ``take`` tasks; the first batch may ``push_back`` what it
    read ahead. The lock is re-entrant: a synchronous backend's callback dispatches from
    inside ``submit``, in the thread that holds it.
    """

    def __init__(self, iterable: Iterable):
        self.lock = threading.RLock()
        #: ``delayed(f)(x) for x in xs``: ``f``, and ``_it`` iterates the ``x``'s
        self._unary: Callable[..., Any] | None = None
        #: the number of tasks, where the input tells it exactly
        self.length: int | None = None
        found = delayed_calls(iterable)
        if found is not None:
            self._unary, self._it, self.length = found
        else:
            self._it = iter(iterable)
            if hasattr(iterable, "__len__"):
                self.length = length_hint(iterable, 0) or None

    def take(self, n: int) -> list:
        """Up to ``n`` tasks (fewer: the input is exhausted). Lock held."""
        func = self._unary
        if func is not None:
            return [(func, (x,), {}) for x in islice(self._it, n)]
        return list(islice(self._it, n))  # at C speed

    def take_compact(self, n: int) -> tuple[Callable[..., Any] | None, list, bool]:
        """Up to ``n`` tasks in :func:`~parmap._delayed.compact` form, read one at a time,
        so that each task tuple is freed as soon as its arguments are taken: a list of
        10,000 live task tuples makes the cyclic garbage collector go over them again and
        again (about 40 % of the time spent reading tiny tasks). ``(None, tasks, False)``
        when the tasks are not all calls of one function without keywords; the last item
        is True when the list holds each task's only argument rather than argument tuples
        (``Batch.unary``). Lock held."""
        it = self._it
        if self._unary is not None:
            return self._unary, list(islice(it, n)), True  # at C speed, and no tuples
        first: Any = next(it, _END)
        if first is _END:
            return None, [], False
        if not (is_task(first) and not first[2]):
            return None, [first] + self.take(n - 1), False
        func = first[0]
        args = [first[1]]
        append = args.append
        tup, dct = tuple, dict  # locals: this loop runs once per task
        for task in islice(it, n - 1):
            if type(task) is tup and len(task) == 3:  # a str of 3 would unpack too
                f, a, k = task  # one unpacking: ~30 % faster than three subscripts
                if f is func and type(a) is tup and type(k) is dct and not k:
                    append(a)
                    continue
            # another function, keywords, or not a task: the general form
            tasks: list = [(func, a, {}) for a in args]
            tasks.append(task)
            return None, tasks + self.take(n - len(tasks)), False
        return func, args, False

    def take_more(self, read: tuple[Callable[..., Any] | None, list, bool], n: int
                  ) -> tuple[Callable[..., Any] | None, list, bool]:
        """``read`` (a result of :meth:`take_compact`) followed by up to ``n`` more tasks,
        in its compact form while they share it. Lock held."""
        func, tasks, unary = read
        more_func, more, more_unary = self.take_compact(n)
        if not more:
            return read
        if func is not None and more_func is func and more_unary == unary:
            return func, tasks + more, unary
        return None, expand(func, tasks, unary) + expand(more_func, more, more_unary), False

    def push_back(self, func: Callable[..., Any] | None, items: list, unary: bool) -> None:
        """Make ``items`` (in :meth:`take_compact`'s form) the next ones read. Lock
        held."""
        if self._unary is not None:  # the input gives the single arguments of _unary
            back = items if unary else [args[0] for _, args, _ in expand(func, items, False)]
        else:
            back = expand(func, items, unary)
        self._it = chain(back, self._it)
