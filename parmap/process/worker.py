"""The worker process: receive a batch, run it through the safe-call wrapper, reply.

::

    start:  SIGINT ignored (Ctrl-C is the parent's) ─ die with the parent ─ faulthandler
            ─ thread caps in the environment ─ worker id and state ─ the initializer, once
    loop:   request = protocol.decode_request(pipe)        (read here, between batches:
            batch = Batch(start, tasks, func, nested)       the pool queues only what
            reply = OK results | ERR CapturedError          fits in the pipe)
            status[RSS] = resident set size (see ``recycling``); status[READ]
            counts the messages taken from the pipe (see ``protocol``)
            pipe <- protocol.encode_reply(...)
    exit:   on STOP, the finalizer (if any), once

Everything the worker needs arrives as data: its set-up (environment, initializer) at
start, and with each request the settings that ``Parallel`` calls made by the tasks see
(``Batch.nested``). It imports nothing from parmap's front end.

This module is imported in every worker (and preloaded by the forkserver), so it keeps
third-party imports lazy: no numpy, no cloudpickle until a message needs them.
"""
from __future__ import annotations

import faulthandler
import os
import pickle
import select
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

from .._delayed import Batch
from .._record import BatchRecord
from .._worker_state import enter_process
from . import arg_maps, protocol, shm, shm_results
from .lifetime import die_with_parent
from .recycling import RSS, RssProbe, run_finalizer

__all__ = ["worker_main", "WorkerSetup"]

#: results may travel through /dev/shm only when this worker shares the parent's resource
#: tracker, which cleans up if the parent is killed (set at start)
_shm_results = False

#: (environment: dict[str, str], initializer: cloudpickle bytes | None,
#:  (worker id, finalizer: cloudpickle bytes | None))
WorkerSetup = tuple

#: when this worker was ready to run tasks (epoch seconds), for insights' start-up cost
_ready_since: float | None = None


def _enable_faulthandler() -> None:
    """A segfault leaves a Python traceback on stderr. A caller's ``sys.stderr`` may have
    no file descriptor (``None`` under pythonw, a ``StringIO`` in some IDEs and services,
    inherited through fork): then standard error's descriptor is used, and a worker
    never fails to start over it."""
    try:
        faulthandler.enable()
    except (AttributeError, RuntimeError, ValueError, OSError):
        try:
            faulthandler.enable(file=2)
        except (ValueError, OSError):
            pass


def worker_main(task_conn: Connection, result_conn: Connection, status: Any, parent_pid: int,
                setup: bytes, guardian: int | None = None, death_signal: bool = True) -> None:
    """Entry point of a worker process (``guardian``, ``death_signal``: see
    ``lifetime.die_with_parent``). Forked, it has closed the pools' pipe ends already
    (``spawn.keep_from_forks``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    die_with_parent(parent_pid, guardian, death_signal)
    _enable_faulthandler()
    env, init, cap_openmp, (wid, finalizer), whole, caller = pickle.loads(setup)
    if whole:  # the caller's whole environment now, not the forkserver's at its start
        for key in set(os.environ) - set(env):
            del os.environ[key]
    for key, value in env.items():  # thread caps: the caller's values already in them
        if os.environ.get(key) != value:  # each write is a putenv: only what differs
            os.environ[key] = value
    if cap_openmp:
        _cap_gnu_openmp()
    if "numpy" in sys.modules:  # its OpenBLAS was loaded before the caps were set
        _cap_openblas(env.get("OPENBLAS_NUM_THREADS", ""))
    enter_process(wid)  # parmap.worker_state() / worker_id(), before the initializer
    shown = _SharedTracker(status)
    if init is not None:  # under a timeout, it is timed from here like a task
        shown.mark(protocol.INITIALIZER, time.monotonic())
    init_error = _run_initializer(init)
    shown.mark(-1, 0.0)
    rss = RssProbe()
    status[RSS] = rss()
    global _shm_results, _ready_since
    _ready_since = time.time()
    if sys.platform.startswith("linux"):
        # a tracker we share is one the parent started before forking us, or the one the
        # forkserver hands its children: either way its module is imported here already
        # (importing it now would only build an idle tracker object, at ~7 ms a worker)
        tracker_module = sys.modules.get("multiprocessing.resource_tracker")
        tracker = getattr(tracker_module, "_resource_tracker", None)
        _shm_results = getattr(tracker, "_fd", None) is not None
    try:
        _serve(task_conn, result_conn, status, init_error, caller, rss)
    except (EOFError, OSError):
        pass  # the parent closed our pipes: it is gone or shutting down
    if init_error is None:
        run_finalizer(finalizer)  # a normal exit: STOP (recycling, idle, shutdown)


def _cap_gnu_openmp() -> None:
    """Forked from a caller whose GNU OpenMP has a thread pool: keep OpenMP to one thread
    here, or the first parallel region waits forever for threads this process lacks."""
    for lib in _loaded_libraries("libgomp"):
        try:
            lib.omp_set_num_threads(1)
        except AttributeError:
            pass


#: ``openblas_set_num_threads`` as OpenBLAS builds name it (numpy's and scipy's wheels
#: ship ``scipy_openblas64_``, with a prefix and a suffix)
_OPENBLAS_SETTERS = tuple(f"{prefix}openblas_set_num_threads{suffix}"
                          for prefix in ("", "scipy_") for suffix in ("", "64_", "_64"))


def _cap_openblas(value: str) -> None:
    """OpenBLAS reads ``OPENBLAS_NUM_THREADS`` once, as it loads. Loaded before this
    worker got its caps (by the caller, for a forked worker; by the forkserver, which
    preloads numpy), it would run as many threads as there are CPUs in each worker: set
    its thread count by a call instead (Linux; ~0.3 ms, only where numpy is loaded)."""
    if not value.isdigit() or int(value) < 1:
        return
    for lib in _loaded_libraries("openblas"):
        for name in _OPENBLAS_SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(int(value))
                break


def _loaded_libraries(marker: str) -> list[Any]:
    """The shared libraries loaded in this process whose file name contains ``marker``,
    opened with ctypes (Linux: read from /proc/self/maps; elsewhere none)."""
    try:
        with open("/proc/self/maps") as maps:  # the 6th field, the path, may have spaces
            paths = {fields[5].rstrip("\n") for fields in (line.split(None, 5) for line in maps)
                     if len(fields) == 6 and marker in fields[5].rpartition("/")[2]}
    except OSError:
        return []
    if not paths:
        return []
    import ctypes  # stdlib, but a few ms: only where such a library is loaded

    found = []
    for path in sorted(paths):
        try:
            found.append(ctypes.CDLL(path))
        except OSError:
            pass
    return found


def _run_initializer(init: bytes | None) -> BaseException | None:
    if init is None:
        return None
    import cloudpickle

    try:
        initializer, initargs = cloudpickle.loads(init)
        initializer(*initargs)
        return None
    except BaseException as exc:
        return exc


def _serve(task_conn: Connection, result_conn: Connection, status: Any,
           init_error: BaseException | None, caller: str, rss: RssProbe) -> None:
    tracker = _SharedTracker(status)
    send = result_conn.send_bytes
    readable = _readable(task_conn)
    sends_arrays = False  # have results of this worker gone through /dev/shm yet?
    while True:
        message = _next_message(task_conn, status, readable)
        if message == protocol.STOP:
            arg_maps.release()
            return
        t0 = time.monotonic()
        try:
            request = protocol.decode_request(message)
        except shm.NotInherited:
            send(protocol.retry_reply())
            continue
        except BaseException as exc:
            send(protocol.unloadable_request(exc))
            continue
        finally:
            arg_maps.keep_only_used()
        message = b""
        if init_error is not None:
            send(protocol.error_reply(_init_failed(init_error), request.start))
            continue
        reply, placed = _run(request, tracker, caller, sends_arrays, t0)
        request = None  # type: ignore[assignment]
        sends_arrays = sends_arrays or placed
        status[RSS] = rss()  # the pool reads it with the reply (memory limit, crashes)
        send(reply)


def _run(request: protocol.Request, tracker: _SharedTracker, caller: str,
         sends_arrays: bool, t0: float) -> tuple[bytes, bool]:
    """Run one batch: the reply's bytes, and whether result arrays went through /dev/shm.

    Once a worker's results went through /dev/shm, it places each large result as its
    task returns, so it never holds a batch of them twice (array and file) at once."""
    batch = Batch(request.start, request.tasks, request.func, request.nested)
    batch.unary = request.unary
    if request.insights:
        batch.record = _observed(t0)
    if request.track:
        batch.tracker = tracker
    limit = request.result_nbytes
    placer = None
    if sends_arrays and limit is not None:
        placer = shm_results.ResultPlacer(limit, caller)
        batch.transform = shm_results.early_placement(placer, limit)
    try:
        payload = batch()
    except BaseException as exc:
        if placer is not None:
            shm_results.discard_results(placer.created)  # a failed batch's results stay
        return protocol.error_reply(exc, request.start + batch.failed, batch.duration), False
    finally:
        tracker.mark(-1, 0.0)
    if placer is None and limit is not None and _shm_results and "numpy" in sys.modules:
        placer = shm_results.ResultPlacer(limit, caller)  # numpy came with the tasks
    reply = protocol.encode_reply(protocol.OK, payload, batch.duration, request.start, t0,
                                  placer, batch.record)
    return reply, bool(placer is not None and placer.created)


def _observed(t0: float) -> BatchRecord:
    """Insights (``Parallel(insights=True)``): the record the batch fills as it runs,
    started with what the worker knows (the request arrived at ``t0``, monotonic, and
    has been unpickled since)."""
    record = BatchRecord(cpu_clock="process")
    record.worker_unpickle_s = unpickled = time.monotonic() - t0
    record.received = time.time() - unpickled
    record.worker_since = _ready_since
    return record


def _readable(conn: Connection) -> Callable[[], Any]:
    """Waits until ``conn`` has data (or its end); one ``select.poll`` kept for it
    (``Connection.poll`` builds a selector at every call)."""
    if not hasattr(select, "poll"):  # Windows
        return lambda: conn.poll(None)
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return poller.poll


def _next_message(task_conn: Connection, status: Any, readable: Callable[[], Any]
                  ) -> bytes:
    """The next message, read here, between batches: the pool queues a request behind a
    running batch only if it fits in the pipe (``scheduler``, rule 2), so its writes
    never wait for us. While argument files stay mapped (``arg_maps``), they are dropped
    if it takes longer than ``arg_maps.IDLE_RELEASE`` seconds to come. STOP when the
    parent closed the pipe (it is gone or stopping).

    A message is counted as taken (``status[READ]``) once it starts to arrive, before it
    is read: a worker that dies reading it (a request too large for its memory) is
    blamed for it, not handed it again (see ``protocol.STATUS_SLOTS``)."""
    try:
        if arg_maps.holding() and not task_conn.poll(arg_maps.IDLE_RELEASE):
            arg_maps.release()
        readable()
        status[protocol.READ] += 1
        return task_conn.recv_bytes()
    except (EOFError, OSError):
        return protocol.STOP


class _SharedTracker:
    """Publishes (task index, start time) in shared memory: the pool's timeout check
    reads it, and a crash's error names the task it shows."""

    __slots__ = ("status",)

    def __init__(self, status: Any):
        self.status = status

    def mark(self, index: int, started: float) -> None:
        self.status[1] = 0.0  # never show a new index with an old start time
        self.status[0] = index
        self.status[1] = started


def _init_failed(exc: BaseException) -> BaseException:
    add_note = getattr(exc, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note("parmap: raised by the pool's initializer, before this task ran")
    return exc
