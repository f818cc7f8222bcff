"""A recycling pool's zygote: one small process that forks the pool's replacement workers.

A pool that recycles (``max_tasks_per_child``, ``max_memory_per_child``) starts workers
all along its life. By then the caller has threads, so it cannot fork them itself, and
through multiprocessing's forkserver each one cost ~12 ms of the machine's CPU: the
caller pickles a ``Process`` and connects to the server anew, the server forks, the
child unpickles it all back and starts a thread that watches the pool's owner. The
zygote is started once, from the forkserver (it has the server's preloaded modules),
and forks each replacement itself on a request of a few hundred bytes::

    caller (launcher thread)           zygote                          its child
    request: set-up, sys.path, cwd ──> fork ──────────────────────────> keeps only its fds,
      + fds: task pipe, result pipe,   reply: the pid                   worker_main(...)
      status memfd, exit pipe          SIGCHLD: reap the child, write
    handle: pid, sentinel (the exit      its exit code to its exit pipe
      pipe's read end), exitcode

Lifetime: the zygote exits when the pool's owner dies (its socket reaches EOF, and it
looks at the owner every ``PARENT_POLL`` seconds), and its children's death signal is
tied to the zygote (``lifetime.die_with_parent``'s guardian): they need no thread of
their own to watch the owner. Closed by the pool (the socket closes), it first waits for
its children to exit: retired workers may still run their last jobs and finalizer.

Linux only (a memfd holds the worker's status; /proc/self/fd lists what a child must
close), and only where workers would come from the forkserver; elsewhere, and if the
zygote fails, the pool starts replacements as any other worker (``spawn.start_worker``).
"""
from __future__ import annotations

import gc
import itertools
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import sys
import weakref
from multiprocessing import current_process
from multiprocessing import process as mp_process
from multiprocessing import util as mp_util
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from . import worker
from .lifetime import PARENT_POLL, pid_alive, prepare_children
from .protocol import STATUS_SLOTS
from .spawn import choose_start_method, forkserver_context, keep_from_forks, setup_bytes, \
    hand, handed, start_lock, start_process, thread_caps

__all__ = ["Zygote", "ZygoteChild", "usable", "zygote_main"]

_INT = struct.Struct("i")
#: the bytes of the status a worker shares with the pool (``protocol.STATUS_SLOTS``)
_STATUS_BYTES = STATUS_SLOTS * 8
#: exit code reported when the zygote died before it could report one (as multiprocessing)
UNKNOWN_EXIT = 255
#: seconds the caller waits for the zygote's answer (a fork takes milliseconds) before
#: it gives up on the zygote and starts workers through the forkserver
ANSWER_TIMEOUT = 30.0


def usable(start_method: str | None) -> bool:
    """Whether replacements can come from a zygote (see the module doc)."""
    return (sys.platform.startswith("linux") and hasattr(os, "memfd_create")
            and choose_start_method(start_method) == "forkserver")


class ZygoteChild:
    """A worker the zygote forked, as the pool handles a process: ``pid``, ``sentinel``
    (readable once it exited), ``exitcode``, ``join``, ``kill``."""

    def __init__(self, pid: int, sentinel: int):
        self.pid = pid
        self.sentinel = sentinel
        self._exitcode: int | None = None
        # not at exit: the manager still waits on it then (a worker in its finalizer that
        # it must end, or the zygote's exit, which multiprocessing joins, waits for it)
        weakref.finalize(self, os.close, sentinel).atexit = False

    @property
    def exitcode(self) -> int | None:
        if self._exitcode is None and wait([self.sentinel], 0):
            self._read()
        return self._exitcode

    def _read(self) -> None:
        try:
            data = os.read(self.sentinel, _INT.size)
        except OSError:
            data = b""
        self._exitcode = _INT.unpack(data)[0] if len(data) == _INT.size else UNKNOWN_EXIT

    def join(self, timeout: float | None = None) -> None:
        if self._exitcode is None and wait([self.sentinel], timeout):
            self._read()

    def kill(self) -> None:
        if self.exitcode is None:  # not reaped: the pid is still the worker's
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Zygote:
    """The caller's side: starts the zygote, asks it for workers, closes it."""

    def __init__(self, cloudpickle: bool):
        with start_lock:  # (see spawn.start_worker)
            ours, theirs = socket.socketpair()
            keep_from_forks(ours)  # a zygote exits when its socket's last copy closes
            hand(theirs)
        try:
            self.process: BaseProcess = start_process(
                forkserver_context(cloudpickle), zygote_main, "parmap-zygote",
                (theirs, os.getpid()))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            handed()
        ours.settimeout(ANSWER_TIMEOUT)  # a zygote that does not answer counts as gone
        self.sock = ours

    def start_worker(self, pool_size: int, cpus: int, inner_max_num_threads: int | None,
                     initializer: bytes | None, wid: int, finalizer: bytes | None
                     ) -> tuple[ZygoteChild, Connection, Connection, Any]:
        """Like ``spawn.start_worker`` (same return); OSError if the zygote is gone."""
        environ = {**os.environ, **thread_caps(pool_size, cpus, inner_max_num_threads)}
        try:
            cwd: str | None = os.getcwd()
        except OSError:  # the caller's directory was removed: the worker keeps its own
            cwd = None
        request = pickle.dumps((setup_bytes(environ, initializer, False, wid, finalizer, True),
                                sys.path, cwd, current_process().name))
        with start_lock:  # (see spawn.start_worker)
            task_r, task_w = os.pipe()
            result_r, result_w = os.pipe()
            exit_r, exit_w = os.pipe()
            status_fd = os.memfd_create("parmap-worker-status", os.MFD_CLOEXEC)
            theirs = [task_r, result_w, status_fd, exit_w]
            task_conn, result_conn = Connection(task_w, readable=False), \
                Connection(result_r, writable=False)
            keep_from_forks(task_conn, result_conn)
            hand(*theirs)
        try:
            os.ftruncate(status_fd, _STATUS_BYTES)
            status = _status_view(status_fd)
            socket.send_fds(self.sock, [_INT.pack(len(request))], theirs)
            self.sock.sendall(request)
            pid = _INT.unpack(_receive_exactly(self.sock, _INT.size))[0]
            if pid <= 0:
                raise OSError(-pid, f"parmap's zygote could not fork a worker: "
                                    f"{os.strerror(-pid)}")
        except BaseException:
            task_conn.close()
            result_conn.close()
            os.close(exit_r)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
            handed()
        return ZygoteChild(pid, exit_r), task_conn, result_conn, status

    def close(self) -> None:
        """No more workers: the zygote exits once its children have."""
        self.sock.close()

    def join(self, timeout: float) -> None:
        """Wait for the zygote to exit (after :meth:`close`); kill it after ``timeout``."""
        self.process.join(timeout)
        if self.process.exitcode is None:  # its children die with it
            self.process.kill()
            self.process.join(timeout)


def _status_view(fd: int) -> Any:
    """The worker's status as three doubles, in shared memory (``fd``: its memfd)."""
    return memoryview(mmap.mmap(fd, _STATUS_BYTES)).cast("d")


def _receive_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes, read into one buffer (adding chunks to a bytes object made a 50 MB
    request, a large initializer argument, take 4 s)."""
    data = bytearray(n)
    view, got = memoryview(data), 0
    while got < n:
        count = sock.recv_into(view[got:])
        if not count:
            raise EOFError("parmap's zygote closed its socket")
        got += count
    return bytes(data)


# ---------------------------------------------------------------------- the zygote itself
def zygote_main(sock: socket.socket, owner: int) -> None:
    """Entry point of the zygote process (see the module doc)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the owner's to handle
    me = os.getpid()
    prepare_children()
    gc.freeze()  # what is here now stays out of the children's collections: fewer
    # pages written, so fewer copied, in each child
    sig_r, sig_w = os.pipe()
    os.set_blocking(sig_r, False)
    os.set_blocking(sig_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the select below
    signal.set_wakeup_fd(sig_w)
    exits: dict[int, int] = {}  # child pid -> the write end of its exit pipe
    listening = True
    while listening or exits:
        waiting: list[Any] = [sock, sig_r] if listening else [sig_r]
        ready = select.select(waiting, [], [], PARENT_POLL)[0]
        if sig_r in ready:
            try:
                while len(os.read(sig_r, 512)) == 512:
                    pass
            except BlockingIOError:  # exactly 512 bytes were there
                pass
            _reap(exits)
        if not ready and not pid_alive(owner):
            os._exit(0)  # the owner is gone: the children's death signal fires now
        if listening and sock in ready and not _serve(sock, owner, me, exits):
            listening = False  # the pool closed us, or its owner died
            sock.close()
            if not pid_alive(owner):
                os._exit(0)


def _serve(sock: socket.socket, owner: int, me: int, exits: dict[int, int]) -> bool:
    """Answer one request: fork the worker, reply with its pid (or -errno). False when
    the socket is closed (or broken: the pool stopped listening)."""
    try:
        request = _request(sock)
    except (OSError, EOFError, ValueError):
        return False
    if request is None:
        return False
    fds, payload = request
    number = next(mp_process._process_counter)  # type: ignore[attr-defined]
    try:
        pid = os.fork()
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        pid = -(exc.errno or 1)
    else:
        if pid == 0:
            _child(fds, payload, owner, me, number)  # never returns
        for fd in fds[:3]:
            os.close(fd)
        exits[pid] = fds[3]
    try:
        sock.sendall(_INT.pack(pid))
    except OSError:
        return False
    return True


def _request(sock: socket.socket) -> tuple[list[int], bytes] | None:
    header, fds, _flags, _address = socket.recv_fds(sock, _INT.size, 4)
    if not header:
        return None
    if len(fds) != 4:
        for fd in fds:
            os.close(fd)
        raise ValueError("a zygote request without its four descriptors")
    header += _receive_exactly(sock, _INT.size - len(header))
    return fds, _receive_exactly(sock, _INT.unpack(header)[0])


def _reap(exits: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = exits.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, _INT.pack(os.waitstatus_to_exitcode(status)))
            except OSError:
                pass
            os.close(fd)


def _child(fds: list[int], payload: bytes, owner: int, zygote: int, number: int) -> None:
    """In the forked child: become a worker, then exit. Its death signal is tied to
    ``zygote`` (the pid it had before the fork: should the zygote die before the signal is
    set, the worker sees another parent and exits); ``number``: the zygote's count of
    its children."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        task_r, result_w, status_fd, exit_w = fds
        os.close(exit_w)
        _close_all_but({task_r, result_w, status_fd})
        setup, path, cwd, owner_name = pickle.loads(payload)
        if sys.path != path:
            sys.path[:] = path
        if cwd is not None:
            os.chdir(cwd)
        status = _status_view(status_fd)
        os.close(status_fd)
        current_process().name = "parmap-worker"
        _as_multiprocessing_child(owner, owner_name, number)
        try:
            worker.worker_main(Connection(task_r, writable=False),
                               Connection(result_w, readable=False), status, owner, setup,
                               guardian=zygote)
        finally:
            # as multiprocessing's children do on the way out: run its finalizers,
            # end the daemonic processes a task started and join the others
            mp_util._exit_function()  # type: ignore[attr-defined]
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback  # stdlib; only on a failure

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _as_multiprocessing_child(owner: int, owner_name: str, number: int) -> None:
    """What multiprocessing does at the start of a child it forks (``_bootstrap``): the
    child has an identity of its own (a child's of the zygote), no processes of its own
    yet, none of the zygote's finalizers, and its after-fork hooks run (locks of
    ``multiprocessing`` objects are renewed). Its ``parent_process()`` is the pool's
    owner, watched through a pidfd (none before Linux 5.3)."""
    me: Any = current_process()
    me._identity = me._identity + (number,)
    mp_process._process_counter = itertools.count(1)  # type: ignore[attr-defined]
    mp_process._children = set()  # type: ignore[attr-defined]
    try:
        sentinel = os.pidfd_open(owner)
    except (AttributeError, OSError):
        mp_process._parent_process = None  # type: ignore[attr-defined]
    else:
        mp_process._parent_process = mp_process._ParentProcess(  # type: ignore[attr-defined]
            owner_name, owner, sentinel)
    mp_util._finalizer_registry.clear()  # type: ignore[attr-defined]
    mp_util._run_after_forkers()  # type: ignore[attr-defined]


def _close_all_but(keep: set[int]) -> None:
    """Close the zygote's descriptors a worker must not hold (the zygote's socket, its
    other children's exit pipes, the forkserver's alive pipe), keeping the standard
    streams and the resource tracker's pipe (the worker's result files use it)."""
    keep = keep | {0, 1, 2}
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        try:
            keep.add(stream.fileno())
        except (AttributeError, ValueError, OSError):
            pass
    tracker = getattr(sys.modules.get("multiprocessing.resource_tracker"),
                      "_resource_tracker", None)
    tracker_fd = getattr(tracker, "_fd", None)
    if tracker_fd is not None:
        keep.add(tracker_fd)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:  # the listing's own descriptor, already closed
                pass
