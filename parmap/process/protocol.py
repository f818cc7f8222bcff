"""The wire format between the pool and its workers: every message is built and read here.

One pipe each way per worker; a worker runs its batches in the order received and replies
to each, so no message needs an id (the pool knows which batches each worker holds)::

    pool -> worker   STOP (b"")            exit after the current batch
                     Request, pickled:     start        index of the batch's first task
                                           func         the compact form's one function,
                                                        or None (tasks are full tuples)
                                           tasks        argument tuples, or (f, args,
                                                        kwargs) tuples, or (unary) the
                                                        one argument of each task
                                           unary        tasks are single arguments:
                                                        ``delayed(f)(x)``, 5x cheaper to
                                                        pickle and unpickle than 1-tuples
                                           track        publish (task index, start time)
                                                        for the pool's timeout check
                                           result_nbytes  result arrays above this go
                                                        through /dev/shm (None: never)
                                           nested       settings that Parallel calls
                                                        made by the tasks see
                                           [insights]   only when true: measure the batch
    worker -> pool   Reply, pickled:       status       OK, ERR or RETRY (below)
                                           payload      OK: the result list (or, with
                                                        shm_files, its pickle bytes)
                                                        ERR: a CapturedError
                                           duration     seconds the tasks ran
                                           shm_files    /dev/shm files holding result
                                                        arrays, or None
                                           [record]     only with insights: the batch's
                                                        ``_record.BatchRecord``

``RETRY``: the worker was not forked after an array of the batch was pinned (see
``shm.ArgumentPlacer``); the pool answers the caller with :data:`RETRY` and the batch is
sent again with its arrays placed in shared memory.

Requests go through plain pickle first: it is faster, and the common cases (functions
from importable modules, and those a script or notebook defines: ``byvalue``) then never
import cloudpickle (~20-25 ms of cold start); the rest (classes defined in ``__main__``,
lambdas and closures of other modules) goes through cloudpickle. Large arrays go as
files where a placer says so (``dumps_with``, at the end).

Insights (``Parallel(insights=True)``) change the messages in one place each, and only
for the batches of such a call: the request's ``insights`` field (sent only when true),
and an OK reply that carries the record as a fifth field, its results pickled apart (as
with ``shm_files``) so that the worker can time that pickling (:func:`_observed_reply`).
Without insights, requests and replies are what they were: not a byte more.
"""
from __future__ import annotations

import io
import mmap
import os
import pickle
import sys
import time
from itertools import chain
from typing import Any, Callable, Mapping, NamedTuple, Protocol

from .._delayed import Batch, compact
from .._errors import CapturedError, SerializationError, add_note, func_name
from .._record import BatchRecord
from . import byvalue, shm, shm_results

__all__ = ["OK", "ERR", "RETRY", "STOP", "STATUS_SLOTS", "READ", "INITIALIZER", "Request",
           "Reply", "encode_request", "decode_request", "encode_reply", "error_reply",
           "retry_reply", "unloadable_request", "decode_reply", "discard_reply", "dumps",
           "dumps_importable", "task_pipe_room"]

OK, ERR, RETRY_STATUS = 0, 1, 2
STOP = b""
#: the status a worker shares with the pool, in doubles: the running task's index and
#: its start time (under a timeout, and for tasks of 1 ms or more, so that a crash names
#: the task: ``backends.process.MARK_MIN_TASK``), the worker's RSS (``recycling.RSS``),
#: and ``READ``, how many messages it has taken from its pipe (counted as one starts to
#: arrive): a worker that dies with requests still in its pipe never started them
STATUS_SLOTS = 4
READ = 3
#: the index a worker shows (with its start time) while it runs the pool's initializer,
#: which the call's timeout covers too
INITIALIZER = -2


class _Retry:
    """The outcome of a batch whose worker asks for it again with its arrays placed."""

    def __repr__(self) -> str:
        return "RETRY"


RETRY = _Retry()


class Request(NamedTuple):
    start: int
    func: Callable[..., Any] | None
    tasks: list
    unary: bool
    track: bool
    result_nbytes: int | None
    nested: Mapping[str, Any] | None
    insights: bool = False


class Reply(NamedTuple):
    status: int
    payload: Any
    duration: float
    shm_files: list[str] | None


# ---------------------------------------------------------------------- requests

def encode_request(batch: Batch, track: bool, placer: shm.ArgumentPlacer | None = None,
                   result_nbytes: int | None = None) -> bytes:
    """Serialise ``batch`` for a worker (large arrays go through ``placer``). On failure,
    a SerializationError names the task and the part that cannot be pickled."""
    func, tasks = (batch.func, batch.tasks) if batch.func is not None else compact(batch.tasks)
    if func is not None:
        # keep the compact form in the caller too: the task tuples can go now, which
        # spares the garbage collector tens of thousands of live tuples per batch
        batch.func, batch.tasks = func, tasks
    unary = batch.unary  # read as such from the input (see _genexpr)
    if not unary and func is not None and set(map(len, tasks)) == {1}:
        # delayed(f)(x): send the x's themselves (the caller's batch is unchanged)
        tasks, unary = list(chain.from_iterable(tasks)), True
    request = Request(batch.start, func, tasks, unary, track, result_nbytes, batch.nested,
                      batch.record is not None)
    try:
        return _dumps_request(byvalue.ImportablePickler, request, placer)
    except Exception:
        pass
    try:  # (cloudpickle: third party, and 25 ms: only for what plain pickle refuses)
        return _dumps_request(byvalue.cloud_pickler(), request, placer)
    except Exception as exc:
        raise _find_unpicklable(batch, exc) from exc


def decode_request(data: bytes) -> Request:
    """In the worker. Raises ``shm.NotInherited`` when a pinned array is missing."""
    return Request(*byvalue.unpickle(data))


def _dumps_request(pickler: type, request: Request, placer: shm.ArgumentPlacer | None) -> bytes:
    message = tuple(request)  # a plain tuple: the worker need not import this class
    if not request.insights:
        message = message[:-1]  # without insights, not a byte more (the field defaults)
    if placer is None:
        buf = io.BytesIO()
        pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
        return buf.getvalue()
    return dumps_with(pickler, message, placer)


def dumps_importable(obj: Any) -> bytes | None:
    """``obj`` pickled without cloudpickle if a worker can load it that way (see
    :class:`byvalue.ImportablePickler`), else None."""
    buf = io.BytesIO()
    try:
        byvalue.ImportablePickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    except Exception:
        return None
    return buf.getvalue()


def _find_unpicklable(batch: Batch, exc: Exception) -> SerializationError:
    import cloudpickle

    for offset in range(len(batch)):
        func, args, kwargs = batch.task(offset)
        parts: list[tuple[str, Any]] = [("the function", func)]
        parts += [(f"argument {i}", arg) for i, arg in enumerate(args)]
        parts += [(f"keyword argument {key!r}", value) for key, value in kwargs.items()]
        for label, value in parts:
            try:
                cloudpickle.dumps(value)
            except Exception as part_exc:
                return SerializationError(
                    f"Could not pickle the task to send it to the workers: {label} of task "
                    f"{batch.start + offset} ({func_name(func)}) could not be pickled "
                    f"({type(part_exc).__name__}: {part_exc}). Pass picklable data, create "
                    f"the object inside the task, or use backend='threading'.")
    return SerializationError(
        f"Could not pickle the task to send it to the workers: tasks {batch.start}.."
        f"{batch.start + len(batch) - 1}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------- replies (worker)

def dumps(obj: Any) -> bytes:
    """Pickle for a reply; cloudpickle for results holding lambdas or local classes."""
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        import cloudpickle

        data: bytes = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        return data


def encode_reply(status: int, payload: Any, duration: float, start: int, t0: float,
                 placer: shm_results.ResultPlacer | None = None,
                 record: BatchRecord | None = None) -> bytes:
    """The reply's bytes. With ``placer``, result arrays above its limit go through
    /dev/shm (those placed as their tasks returned travel as their files' references).
    With ``record`` (insights), see :func:`_observed_reply`."""
    if status == OK and record is not None:
        early = len(placer.created) if placer is not None else 0
        try:
            return _observed_reply(payload, duration, placer, record)
        except Exception:  # the ordinary way below names what cannot be pickled
            if placer is not None:
                shm_results.discard_results(placer.created[early:])
                del placer.created[early:]
    if status == OK and placer is not None:
        early = len(placer.created)  # files written as tasks returned: still referenced
        try:
            inner = dumps_with(pickle.Pickler, payload, placer)
            return dumps((OK, inner, duration, placer.created))
        except Exception:
            shm_results.discard_results(placer.created[early:])  # pickled the ordinary way below
            del placer.created[early:]
    placed = placer.created if placer is not None else []
    try:
        return dumps((status, payload, duration, None))
    except Exception as exc:
        if placed:
            shm_results.discard_results(placed)  # nobody will map them now
        return _unpicklable_reply(status, payload, exc, start, t0)


def _observed_reply(payload: Any, duration: float, placer: shm_results.ResultPlacer | None,
                    record: BatchRecord) -> bytes:
    """An OK reply that carries the batch's record: the results are pickled first, timed,
    then sent as bytes next to the record (``shm_files`` [] or the files: see
    :func:`decode_reply`)."""
    t0 = time.perf_counter()
    inner = dumps_with(pickle.Pickler, payload, placer) if placer is not None \
        else dumps(payload)
    files = placer.created if placer is not None else []
    record.shm_bytes = sum(os.stat(path).st_size for path in files)
    record.worker_pickle_s = time.perf_counter() - t0
    record.sent = time.time()
    return dumps((OK, inner, duration, files, record))


def error_reply(exc: BaseException, index: int, duration: float = 0.0) -> bytes:
    """An ERR reply for ``exc`` raised by task ``index`` (-1: no task in particular)."""
    return dumps((ERR, CapturedError.capture(exc, index, dumps), duration, None))


def retry_reply() -> bytes:
    return dumps((RETRY_STATUS, None, 0.0, None))


def _unpicklable_reply(status: int, payload: Any, exc: Exception, start: int,
                       t0: float) -> bytes:
    """Reply with a SerializationError naming the result (or exception) that failed."""
    index, culprit = start, "result"
    if status == OK:
        for offset, result in enumerate(payload):
            try:
                dumps(result)
            except Exception:
                index, culprit = start + offset, f"result ({type(result).__name__})"
                break
    else:
        culprit = "exception"
    error = SerializationError(
        f"the {culprit} of task {index} could not be pickled to send it back from the "
        f"worker: {type(exc).__name__}: {exc}. Return plain data (numbers, strings, "
        f"lists, dicts, numpy arrays) or make the object picklable.")
    return error_reply(error, index, time.monotonic() - t0)


def unloadable_request(exc: BaseException) -> bytes:
    """The reply to a request the worker could not unpickle."""
    error = SerializationError(
        f"a batch of tasks could not be unpickled in the worker: {type(exc).__name__}: "
        f"{exc}. The function or an argument refers to something the worker cannot import "
        f"(a module not on its sys.path, or an object defined after the pool started).")
    return error_reply(error, -1)


# ---------------------------------------------------------------------- replies (pool)

def decode_reply(data: bytes, batch: Batch, describe: Callable[[], str]) -> Any:
    """The outcome for the caller: the result list, the exception to raise, or RETRY.
    Sets ``batch.duration`` from the worker's measurement."""
    nbytes = len(data)
    arrived = time.time() if batch.record is not None else 0.0
    try:
        status, payload, duration, shm_files, *observed = pickle.loads(data)
        if shm_files is not None:
            t0 = time.perf_counter()
            try:
                payload = pickle.loads(payload)
            finally:
                shm_results.discard_results(shm_files)
            nbytes += sum(getattr(result, "nbytes", 0) for result in payload)
            if observed and batch.record is not None:  # insights: see _observed_reply
                batch.record.absorb(observed[0])
                batch.record.arrived = arrived
                batch.record.unpickle_s = time.perf_counter() - t0
                batch.record.reply_bytes = len(data)
    except Exception as exc:
        return SerializationError(
            f"the results of {describe()} could not be unpickled in the caller: "
            f"{type(exc).__name__}: {exc}")
    batch.duration, batch.nbytes = duration, nbytes
    if status == RETRY_STATUS:
        return RETRY
    if status == OK:
        return payload
    error = payload.rebuild()
    if payload.index < 0:  # the batch as a whole (it could not be unpickled there)
        add_note(error, f"parmap: raised for {describe()}")
    return error


def discard_reply(data: bytes) -> None:
    """Unlink the shared-memory result files of a reply nobody will read."""
    try:
        shm_files = pickle.loads(data)[3]
    except Exception:
        return
    if shm_files:
        shm_results.discard_results(shm_files)


#: what a pipe holds for sure where its size cannot be read: POSIX's PIPE_BUF at least
#: (macOS and FreeBSD shrink a new pipe to a page or less when pipe memory runs short;
#: the buffer sizes of Windows' named pipes are advisory)
_PORTABLE_PIPE_BYTES = 512


def task_pipe_room(fd: int) -> int:
    """How large a request may wait in a worker's task pipe (``fd``: its write end) while
    the worker runs a batch, so that writing it never waits for the worker: the pipe
    holds at most that one request then (``scheduler``, rule 2), and a STOP behind it.
    The pipe keeps its size (a larger one would count against the user's pipe quota,
    which every program of the user shares). Linux counts a pipe in page-sized slots:
    a page is kept for the STOP, and 8 bytes let the request's last page take its
    header; elsewhere a pipe counts bytes."""
    if sys.platform.startswith("linux"):
        import fcntl  # stdlib, POSIX only

        try:
            return max(0, fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) - mmap.PAGESIZE - 8)
        except OSError:  # not a pipe (cannot happen here): as elsewhere
            pass
    return _PORTABLE_PIPE_BYTES - 8  # the request's header and a STOP


# ------------------------------------------------ pickling with arrays placed in files
class Placer(Protocol):
    """Reduces a numpy array to a file reference for pickling, or returns None."""

    def reduce(self, arr: Any) -> tuple | None: ...


_pickler_classes: dict[type, type] = {}


def dumps_with(base: type, obj: Any, placer: Placer, protocol: int = 5) -> bytes:
    """Pickle ``obj`` with the pickler class ``base``, letting ``placer`` reduce ndarrays."""
    cls = _pickler_classes.get(base)
    if cls is None:
        cls = _pickler_classes[base] = _ndarray_pickler(base)
    buf = io.BytesIO()
    pickler = cls(buf, protocol=protocol)
    pickler.placer = placer
    pickler.dump(obj)
    return buf.getvalue()


def _ndarray_pickler(base: type) -> type:
    import numpy as np

    ndarray, memmap = np.ndarray, np.memmap
    parent_override = getattr(base, "reducer_override", None)

    class _Pickler(base):
        placer: Any = None

        def reducer_override(self, obj: Any) -> Any:
            # an ndarray or a memmap; not other subclasses (masked arrays, matrices):
            # a file holds only the data, they are pickled whole
            if isinstance(obj, ndarray) and (type(obj) is ndarray or isinstance(obj, memmap)):
                reduced = self.placer.reduce(obj)
                if reduced is not None:
                    return reduced
            if parent_override is not None:
                return parent_override(self, obj)
            return NotImplemented

    return _Pickler
