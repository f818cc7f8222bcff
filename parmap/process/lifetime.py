"""Workers die with their parent: Linux's parent-death signal, and a portable watch thread.
And Ctrl-C is their parent's: they ignore SIGINT, and one that comes while a worker
starts is held and handed to the parent's handler (``hand_over_ctrl_c``).

The death signal (``prctl(PR_SET_PDEATHSIG)``) kills a worker the moment its parent
dies, even mid-task; it is not inherited across fork and is not sent if the parent died
before it was set, so the worker checks its parent right after setting it. It is sent
when the *thread* that started the worker exits, so a worker forked or spawned by a
thread that may end first (not the main thread, nor a pool's own) goes without it.
Elsewhere a daemon thread polls the parent every ``PARENT_POLL`` seconds.

A worker whose direct parent is the pool's owner (fork, spawn) starts no thread once the
signal is set (its start is ~0.6 ms of a worker's start). A forkserver's child gets the
signal only when the forkserver exits, and the forkserver outlives its owner for as long
as any of its children lives (multiprocessing hands each child the pipe that tells the
server its owner is alive): those workers keep the thread.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

__all__ = ["pid_alive", "die_with_parent", "prepare_children", "PARENT_POLL",
           "hand_over_ctrl_c"]

#: how often a worker checks that its parent is still alive (the portable fallback)
PARENT_POLL = 0.5


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (ours to signal or not) and has not exited.

    A killed process stays a zombie until its own parent reaps it, and a zombie can
    still be signalled: on Linux its state in /proc tells it apart (a forkserver's
    children would otherwise outlive a killed owner until someone reaped it). /proc is
    read only when it is this process's own (not another PID namespace's), and a pid it
    does not show (hidden, or gone meanwhile) is asked about again with a signal."""
    if not _signals_pid(pid):
        return False
    if not _own_proc():
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except FileNotFoundError:  # gone meanwhile, or hidden from us (hidepid)
        return _signals_pid(pid)
    except (OSError, IndexError):  # unreadable: the signal's answer stands
        return True


def _signals_pid(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        pass
    return True


_proc_is_ours: list[bool] = []  # computed once; the same for forked children


def _own_proc() -> bool:
    """Whether /proc shows this process's PID namespace."""
    if not _proc_is_ours:
        try:
            _proc_is_ours.append(os.readlink("/proc/self") == str(os.getpid()))
        except OSError:
            _proc_is_ours.append(False)
    return _proc_is_ours[0]


_libc: list = []  # [prctl or None], looked up once (a zygote does it for its children)


def _prctl() -> Any:
    """libc's ``prctl`` (Linux), or None."""
    if not _libc:
        _libc.append(None)
        if sys.platform.startswith("linux"):
            try:
                import ctypes  # stdlib, but ~2 ms: only where the death signal exists

                _libc[0] = ctypes.CDLL(None, use_errno=True).prctl
            except Exception:
                pass
    return _libc[0]


def prepare_children() -> None:
    """In a process that will fork workers (a zygote): what ``die_with_parent`` needs,
    done once here instead of in each child (~2 ms: ctypes and libc)."""
    _prctl()
    _own_proc()


def die_with_parent(parent_pid: int, guardian: int | None = None,
                    death_signal: bool = True) -> None:
    """Exit when ``parent_pid`` dies, even in the middle of a task.

    ``parent_pid`` is the process that owns the pool. Our direct parent is either that
    process (fork, spawn), the forkserver, which may outlive it (see the module doc), or
    ``guardian``: a pool's zygote (``zygote.py``), which exits as the owner dies, so that
    its death signal reaches us then. ``death_signal=False``: the thread that started us
    may end before the pool does (the signal comes when that *thread* exits, not its
    process), so only the watch thread may end us.
    """
    signalled = False
    prctl = _prctl() if death_signal else None
    if prctl is not None:
        try:
            pr_set_pdeathsig = 1
            signalled = prctl(pr_set_pdeathsig, signal.SIGKILL) == 0
        except Exception:
            pass
    direct_parent = os.getppid()  # read after prctl: a parent that died before is seen
    if not pid_alive(parent_pid) or (direct_parent == 1 != parent_pid) or (
            guardian is not None and direct_parent != guardian):
        os._exit(1)
    if signalled and direct_parent in (parent_pid, guardian):  # comes as the owner dies
        return
    threading.Thread(target=_watch_parent, args=(parent_pid, direct_parent), daemon=True,
                     name="parmap-parent-watch").start()


def _watch_parent(parent_pid: int, direct_parent: int) -> None:
    while True:
        time.sleep(PARENT_POLL)
        if os.getppid() != direct_parent or not pid_alive(parent_pid):
            os._exit(1)


def hand_over_ctrl_c(handler: Any, frames: list[Any], process: Any) -> None:
    """Call the program's SIGINT ``handler`` for each Ctrl-C held (not the signal again:
    asyncio's wakeup fd has it); if it raises, first stop the process just started."""
    try:
        for frame in frames:
            if handler == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)  # the default: the program ends
            elif handler != signal.SIG_IGN:
                handler(int(signal.SIGINT), frame)  # (as Python calls it: an int)
    except BaseException:
        if process is not None:
            process.kill()
            process.join()
        raise
