"""The worker process: receive a batch, run it safely, send back results or the error.

This module is imported in every worker (and preloaded by the forkserver), so it keeps
its imports light: no numpy, no cloudpickle until a message needs it.

Messages, one per pipe direction and worker::

    parent -> worker   cloudpickle bytes of (start, func, tasks, track_timeout,
                       result_nbytes): ``func`` None and ``tasks`` (function, args, kwargs)
                       tuples, or the compact form of ``_delayed.compact``: the one
                       function, and ``tasks`` its argument tuples; b"" means stop
    worker -> parent   pickle bytes of (status, payload, duration, shm_files):
                           OK   payload = list of results
                           ERR  payload = CapturedError (the task's exception, or a
                                SerializationError naming the task whose result failed)
                           RETRY  this worker lacks an array pinned for forked
                                workers: send the batch again, arrays placed
                       shm_files is None, or the list of /dev/shm files holding large
                       result arrays; then payload is itself pickle bytes, which the
                       parent loads before unlinking whatever files are left

A worker runs its batches one at a time, in the order received, and replies to each, so
no message needs an id: the parent knows which batches each worker holds, in order.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time
from typing import Any

OK, ERR, RETRY = 0, 1, 2
#: set in worker processes: parallel calls made by tasks use threads, never processes
IN_WORKER = False
#: how often a worker checks that its parent is still alive (the portable fallback to
#: Linux's parent-death signal)
PARENT_POLL = 0.5
#: large result arrays may travel through /dev/shm: only when this worker shares the
#: parent's resource tracker, which cleans up if the parent is killed
SHM_RESULTS = False


def worker_main(task_conn: Any, result_conn: Any, status: Any, parent_pid: int,
                setup: bytes, close_conns: list) -> None:
    """Entry point of a worker process."""
    global IN_WORKER
    IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for conn in close_conns:  # other workers' pipe ends inherited through fork
        conn.close()
    _die_with_parent(parent_pid)
    import faulthandler

    faulthandler.enable()  # a segfault leaves a Python traceback on stderr
    env, init = pickle.loads(setup)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    from ._config import parallel_config

    parallel_config(backend="threading")  # nested Parallel() calls use threads
    init_error = _run_initializer(init)
    global SHM_RESULTS
    if sys.platform.startswith("linux"):
        from multiprocessing import resource_tracker

        SHM_RESULTS = getattr(resource_tracker._resource_tracker, "_fd", None) is not None
    try:
        _serve(task_conn, result_conn, status, init_error, parent_pid)
    except (EOFError, OSError):
        pass  # the parent closed our pipes: it is gone or shutting down


def _run_initializer(init: bytes | None) -> Any:
    if init is None:
        return None
    import cloudpickle

    try:
        initializer, initargs = cloudpickle.loads(init)
        initializer(*initargs)
        return None
    except BaseException as exc:
        return exc


def _serve(task_conn: Any, result_conn: Any, status: Any, init_error: Any,
           parent_pid: int) -> None:
    from ._delayed import Batch
    from ._errors import CapturedError

    tracker = _SharedTracker(status)
    recv, send = _start_reader(task_conn), result_conn.send_bytes
    sends_arrays = False  # have results of this worker gone through /dev/shm yet?
    while True:
        message = recv()
        if not message:
            return
        t0 = time.monotonic()
        try:
            start, func, tasks, track, result_nbytes = pickle.loads(message)
        except BaseException as exc:
            shm = sys.modules.get("parmap._shm")  # loaded if the batch pinned arrays
            if shm is not None and isinstance(exc, shm.NotInherited):
                send(_dumps((RETRY, None, 0.0, None)))
            else:
                send(_unloadable_batch(exc, message))
            continue
        message = None
        if init_error is not None:
            send(_dumps((ERR, CapturedError.capture(_init_failed(init_error), start, _dumps),
                         0.0, None)))
            continue
        batch = Batch(start, tasks, func)
        if track:
            batch.tracker = tracker
        placer = None
        if sends_arrays and result_nbytes is not None:
            from ._shm import ResultPlacer, early_placement

            placer = ResultPlacer(result_nbytes, parent_pid)
            batch.transform = early_placement(placer, result_nbytes)
        try:
            reply = (OK, batch(), batch.duration)
        except BaseException as exc:
            reply = (ERR, CapturedError.capture(exc, start + batch.failed, _dumps),
                     batch.duration)
            if placer is not None:
                _discard(placer.created)  # results of a failed batch never travel
        finally:
            tracker.mark(-1, 0.0)
        batch = tasks = func = None
        data, placer = _reply_bytes(reply, start, t0, result_nbytes, parent_pid, placer)
        # once results went through /dev/shm, place them as each task returns
        sends_arrays = sends_arrays or bool(placer is not None and placer.created)
        placer = reply = None
        send(data)


def _start_reader(task_conn: Any) -> Any:
    """Drain the task pipe in a thread; return the function that gets the next message.

    The parent queues the next batch while this one runs; reading it at once means the
    parent's write never waits for us, whatever the pipe's size (see ``_pool``).
    """
    from queue import SimpleQueue

    inbox: SimpleQueue = SimpleQueue()

    def read() -> None:
        try:
            while True:
                message = task_conn.recv_bytes()
                inbox.put(message)
                if not message:
                    return
        except (EOFError, OSError):  # the parent closed the pipe: it is gone or stopping
            inbox.put(b"")

    threading.Thread(target=read, name="parmap-task-reader", daemon=True).start()
    return inbox.get


class _SharedTracker:
    """Publishes (task index, start time) in shared memory for the parent's timeout check."""

    __slots__ = ("status",)

    def __init__(self, status: Any):
        self.status = status

    def mark(self, index: int, started: float) -> None:
        self.status[1] = 0.0  # never show a new index with an old start time
        self.status[0] = index
        self.status[1] = started


def _dumps(obj: Any) -> bytes:
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        import cloudpickle  # results holding lambdas or locally defined classes

        return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _discard(paths: list) -> None:
    from ._shm import discard_results

    discard_results(paths)


def _reply_bytes(reply: tuple, start: int, t0: float, result_nbytes: int | None,
                 parent_pid: int, placer: Any = None) -> tuple[bytes, Any]:
    """The reply's bytes, and the ResultPlacer that wrote its arrays (or None)."""
    if reply[0] == OK and result_nbytes is not None and SHM_RESULTS \
            and "numpy" in sys.modules:
        from ._shm import ResultPlacer, dumps_with

        if placer is None:
            placer = ResultPlacer(result_nbytes, parent_pid)
        early = len(placer.created)  # files written as tasks returned: still referenced
        try:
            inner = dumps_with(pickle.Pickler, reply[1], placer)
            return _dumps((OK, inner, reply[2], placer.created)), placer
        except Exception:
            _discard(placer.created[early:])  # pickled the ordinary way below
            del placer.created[early:]
    return _plain_reply_bytes(reply, start, t0, placer.created if placer else []), placer


def _plain_reply_bytes(reply: tuple, start: int, t0: float, placed: list) -> bytes:
    """Pickle the reply as is (arrays placed early travel as their files' references);
    if it cannot be, reply with a SerializationError naming the culprit."""
    try:
        return _dumps((*reply, None))
    except Exception as exc:
        from ._errors import CapturedError, SerializationError

        if placed:
            _discard(placed)  # nobody will map them now
        status, payload, duration = reply
        index, culprit = start, "result"
        if status == OK:
            for offset, result in enumerate(payload):
                try:
                    _dumps(result)
                except Exception:
                    index, culprit = start + offset, f"result ({type(result).__name__})"
                    break
        else:
            culprit = "exception"
        error = SerializationError(
            f"the {culprit} of task {index} could not be pickled to send it back from the "
            f"worker: {type(exc).__name__}: {exc}. Return plain data (numbers, strings, "
            f"lists, dicts, numpy arrays) or make the object picklable.")
        return _dumps((ERR, CapturedError.capture(error, index, _dumps),
                       time.monotonic() - t0, None))


def _unloadable_batch(exc: BaseException, message: bytes) -> bytes:
    from ._errors import CapturedError, SerializationError

    error = SerializationError(
        f"a batch of tasks could not be unpickled in the worker: {type(exc).__name__}: "
        f"{exc}. The function or an argument refers to something the worker cannot import "
        f"(a module not on its sys.path, or an object defined after the pool started).")
    return _dumps((ERR, CapturedError.capture(error, -1, _dumps), 0.0, None))


def _init_failed(exc: BaseException) -> BaseException:
    try:
        exc.add_note("parmap: raised by the pool's initializer, before this task ran")
    except AttributeError:  # Python 3.10
        pass
    return exc


# ---------------------------------------------------------------------- parent death

def _die_with_parent(parent_pid: int) -> None:
    """Exit when the parent dies, even in the middle of a task.

    ``parent_pid`` is the process that owns the pool. Our direct parent is either that
    process (fork) or the forkserver, which exits as soon as the owner is gone.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except Exception:
            pass
    direct_parent = os.getppid()  # read after prctl: a parent that died before is seen
    if not _alive(parent_pid) or (direct_parent == 1 != parent_pid):
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid, direct_parent), daemon=True,
                     name="parmap-parent-watch").start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        return True
    return True


def _watch_parent(parent_pid: int, direct_parent: int) -> None:
    while True:
        time.sleep(PARENT_POLL)
        if os.getppid() != direct_parent or not _alive(parent_pid):
            os._exit(1)
