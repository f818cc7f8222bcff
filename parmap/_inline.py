"""``n_jobs=1``: every task in the caller's thread, unwrapped, so that exceptions,
tracebacks and pdb behave exactly as in a plain loop (``Parallel`` decides when; the
monitored variant is ``Monitor.run_inline``).
"""
from __future__ import annotations

import warnings
from itertools import islice
from typing import Any, Generator, Iterable, Iterator

from ._delayed import InlineStop, Task, check_task, each_result
from ._genexpr import delayed_calls
from .backends import ParallelBackendBase

__all__ = ["warn_unused", "run_all", "until_stopped", "run_each", "read_ahead"]


def warn_unused(timeout: float | None, backend: ParallelBackendBase) -> None:
    """What a call that runs its tasks in the caller (one worker) does not use."""
    if timeout is not None:
        warnings.warn(
            f"The backend class 'SequentialBackend' does not support timeout. You have set "
            f"'timeout={timeout:g}' in Parallel but the 'timeout' parameter will not be "
            f"used.", stacklevel=4)
    unused = [name for name in ("initializer", "finalizer")
              if getattr(backend, name, None) is not None]
    if unused:  # not run in the caller: one written for a worker (a SIGINT handler that
        # ignores Ctrl-C, say) would change the caller itself
        warnings.warn(
            f"{' and '.join(unused)} do{'es' if len(unused) == 1 else ''} not run with "
            f"n_jobs=1: the tasks run in the calling process, which is not a worker. If "
            f"they need what it sets up, call it yourself before the call.", stacklevel=4)


def run_all(iterable: Iterable[Task]) -> list:
    """``n_jobs=1``, a list, nothing to report: the plain loop, no generator in between
    (about 20 % of a tiny task's cost)."""
    found = delayed_calls(iterable)
    if found is not None:  # delayed(f)(x) for x in xs: as fast as map(f, xs)
        func, xs, _ = found
        return [func(x) for x in xs]  # not map: it would end at a task's StopIteration
    out: list = []
    append = out.append
    for task in iterable:
        if type(task) is not tuple or len(task) != 3:  # a str of 3 would unpack
            check_task(task, len(out))
        func, args, kwargs = task
        append(func(*args, **kwargs) if kwargs else func(*args))
    return out


def until_stopped(items: Iterable, stop: list[str]) -> Iterator:
    """``items``, until ``stop`` holds why not: raised then, if an item is left."""
    for item in items:
        if stop:
            raise RuntimeError(stop[0])
        yield item


def run_each(iterable: Iterable[Task], stop: list[str]) -> Generator[Any, None, None]:
    """``n_jobs=1``, a generator: each task as it is asked for (see _until_stopped)."""
    found = delayed_calls(iterable)
    if found is not None:
        func, xs, _ = found
        for index, x in enumerate(until_stopped(xs, stop)):
            try:
                result = func(x)
            except StopIteration as exc:
                raise InlineStop(exc, index, (func, (x,), {})) from None
            yield result
        return
    yield from each_result(until_stopped(iterable, stop))


def read_ahead(iterable: Iterable[Task], size: int) -> Iterator[Task]:
    """The tasks, read ``size`` at a time before the first of them runs: the order in
    which an explicit ``batch_size`` consumes the input, inline as in the workers."""
    tasks = iter(iterable)
    while chunk := list(islice(tasks, size)):
        yield from chunk
