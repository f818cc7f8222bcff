"""Caller-side helpers of the ``dask`` backend: large arguments, and errors.

Large arguments (:class:`ArgumentScatter`, one per call)::

    batch's tasks ──externalise──> tasks with Scattered(slot) placeholders ──┐
         │ each argument above max_nbytes, by identity:                      ├─> client.submit
         └─> client.scatter at its first use in the call ──> futures, ───────┘    (futures as
             kept until the call ends (then the cluster frees the data)            top-level args)

Dask only resolves futures that are top-level arguments of a Dask task, so the futures go
last in ``client.submit(run_batch, ...)`` and the worker puts their values back in place of
the placeholders. The same object used by many tasks of a call is sent once; the
scheduler copies it from worker to worker when tasks elsewhere need it.

Errors: naming the unpicklable part of a batch, and turning Dask's own failures into
parmap's (a worker that kept dying becomes ``WorkerCrashedError``), without keeping raised
Dask errors whose frames would keep our futures, and so their tasks, alive.
"""
from __future__ import annotations

from typing import Any

from dask.sizeof import sizeof
from distributed.scheduler import KilledWorker

from .._errors import PoolError, SerializationError, WorkerCrashedError, func_name
from ._dask_worker import Scattered

__all__ = ["ArgumentScatter", "dask_error", "find_unpicklable", "span", "with_note",
           "drop_frames", "first_line"]

#: arguments of these types are never scattered (the common tiny-task case costs one lookup)
SMALL_TYPES = frozenset({int, float, bool, complex, type(None), range, slice})


class ArgumentScatter:
    """Sends each argument above ``limit`` bytes to the cluster once per call."""

    def __init__(self, client: Any, limit: int):
        self.client = client
        self.limit = limit
        self._scattered: dict[int, tuple[Any, Any]] = {}  # id(obj) -> (obj, future)

    def externalise(self, func: Any, tasks: list) -> tuple[list, tuple]:
        """``tasks`` (compact form when ``func`` is given) with large arguments replaced by
        ``Scattered`` placeholders, and the futures of those objects in slot order."""
        small = SMALL_TYPES
        slots: dict[int, int] = {}
        values: list = []  # the object of each slot of this batch
        out: list | None = None
        for position, task in enumerate(tasks):
            args, kwargs = (task, {}) if func is not None else (task[1], task[2])
            if not kwargs and all(type(a) in small for a in args):
                if out is not None:
                    out.append(task)
                continue
            new_args = tuple(self._swap(a, slots, values) for a in args)
            new_kwargs = {k: self._swap(v, slots, values) for k, v in kwargs.items()}
            if out is None and (any(a is not b for a, b in zip(new_args, args)) or any(
                    new_kwargs[k] is not v for k, v in kwargs.items())):
                out = list(tasks[:position])
            if out is not None:
                out.append(new_args if func is not None else (task[0], new_args, new_kwargs))
        if out is None:
            return tasks, ()
        return out, self._futures_for(values)

    def _swap(self, value: Any, slots: dict, values: list) -> Any:
        if type(value) in SMALL_TYPES:
            return value
        key = id(value)
        slot = slots.get(key)
        if slot is None:
            if key not in self._scattered and not is_large(value, self.limit):
                return value
            slot = slots[key] = len(values)
            values.append(value)
        return Scattered(slot)

    def _futures_for(self, values: list) -> tuple:
        new = [v for v in values if id(v) not in self._scattered]
        if new:  # one scatter for all the new objects of a batch
            # hash=False: with hashing, scatters from tasks on workers cancel each other
            futures = self.client.scatter(new, hash=False)
            for value, future in zip(new, futures):
                self._scattered[id(value)] = (value, future)  # holding value keeps its id
        return tuple(self._scattered[id(v)][1] for v in values)


def is_large(value: Any, limit: int) -> bool:
    nbytes = getattr(value, "nbytes", None)  # numpy arrays, pandas Series, memoryviews
    if isinstance(nbytes, int):
        return nbytes > limit
    if isinstance(value, (bytes, bytearray, str)):
        return len(value) > limit
    try:
        return bool(sizeof(value) > limit)  # dask's estimate: pandas, lists, dicts, ...
    except Exception:
        return False


# ---------------------------------------------------------------------- errors

def dask_error(future: Any, batch: Any) -> BaseException:
    """The error to report for a Dask task of ours that Dask itself marked failed."""
    exc = future.exception()
    if not isinstance(exc, BaseException):  # could not be sent back as itself
        exc = PoolError(f"Dask reported an error it could not send back: {exc!r:.200}")
    if isinstance(exc, KilledWorker):
        error = WorkerCrashedError(
            f"tasks {span(batch)} were running on Dask workers that died "
            f"{exc.allowed_failures + 1} times (last: {exc.last_worker.address}), so the "
            f"scheduler gave up on them; the call was cancelled. Look at the worker logs (out "
            f"of memory? a crash in native code?), or let Dask retry more often with the "
            f"distributed.scheduler.allowed-failures setting.",
            task_indices=tuple(range(batch.start, batch.start + len(batch))))
        error.__cause__ = exc
        return error
    # not the tasks' own errors (those come back as values): the function could not be
    # unpickled on the worker (a module missing there?), ...
    return with_note(exc.with_traceback(future.traceback()),
                     f"parmap: raised by Dask while running tasks {span(batch)}, not by the "
                     f"tasks themselves")


def find_unpicklable(batch: Any) -> SerializationError | None:
    """Name the first function or argument of ``batch`` that cloudpickle refuses."""
    import cloudpickle

    for offset in range(len(batch)):
        func, args, kwargs = batch.task(offset)
        parts = [("the function", func)]
        parts += [(f"argument {i}", arg) for i, arg in enumerate(args)]
        parts += [(f"keyword argument {key!r}", value) for key, value in kwargs.items()]
        for label, value in parts:
            try:
                cloudpickle.dumps(value)
            except Exception as exc:
                return SerializationError(
                    f"{label} of task {batch.start + offset} ({func_name(func)}) could not be "
                    f"pickled to send it to the Dask cluster: {type(exc).__name__}: {exc}. "
                    f"Pass picklable data, or create the object inside the task.")
    return None


def drop_frames(exc: BaseException | None) -> None:
    """Forget the tracebacks of an error raised by Dask's client: their frames hold our
    futures in reference cycles, which would keep the tasks wanted on the cluster until
    the next garbage collection."""
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        exc = todo.pop()
        if exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            exc.__traceback__ = None
            todo += [exc.__cause__, exc.__context__]


def first_line(exc: BaseException) -> str:
    """Dask puts whole tracebacks in some messages: the first line says what happened."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def span(batch: Any) -> str:
    """``"3..7 (f)"``: the tasks of a batch, for messages."""
    last = batch.start + len(batch) - 1
    name = func_name(batch.func) if batch.func is not None else "mixed functions"
    text = str(batch.start) if last == batch.start else f"{batch.start}..{last}"
    return f"{text} ({name})"


def with_note(exc: BaseException, note: str) -> BaseException:
    notes = getattr(exc, "__notes__", None)
    try:
        if isinstance(notes, list):
            notes.append(note)
        elif notes is None:
            exc.__notes__ = [note]  # type: ignore[attr-defined]  # 3.10 has no add_note
    except Exception:  # an exception class that forbids attributes
        pass
    return exc
