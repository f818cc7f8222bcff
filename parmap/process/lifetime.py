"""Workers die with their parent: Linux's parent-death signal, and a portable watch thread.

The death signal (``prctl(PR_SET_PDEATHSIG)``) kills a worker the moment its parent
dies, even mid-task; it is not inherited across fork and is not sent if the parent died
before it was set, so the worker checks its parent right after setting it. Elsewhere
a daemon thread polls the parent every ``PARENT_POLL`` seconds.

With the signal set, no thread is started (its start is ~1 ms of every worker's start, which
recycling pays again and again). A forkserver's child gets the signal when the forkserver
exits, and the forkserver exits when the process that owns the pool dies (it watches a pipe
whose write end that process holds). An idle worker also leaves when its task pipe reaches EOF.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

__all__ = ["pid_alive", "die_with_parent", "PARENT_POLL"]

#: how often a worker checks that its parent is still alive (the portable fallback)
PARENT_POLL = 0.5


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (ours to signal or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        return True
    return True


def die_with_parent(parent_pid: int) -> None:
    """Exit when ``parent_pid`` dies, even in the middle of a task.

    ``parent_pid`` is the process that owns the pool. Our direct parent is either that
    process (fork) or the forkserver, which exits as soon as the owner is gone.
    """
    signalled = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes  # stdlib, but ~2 ms: only where the death signal exists

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            signalled = libc.prctl(pr_set_pdeathsig, signal.SIGKILL) == 0
        except Exception:
            pass
    direct_parent = os.getppid()  # read after prctl: a parent that died before is seen
    if not pid_alive(parent_pid) or (direct_parent == 1 != parent_pid):
        os._exit(1)
    if signalled:  # the signal comes when our direct parent dies: no thread to start
        return
    threading.Thread(target=_watch_parent, args=(parent_pid, direct_parent), daemon=True,
                     name="parmap-parent-watch").start()


def _watch_parent(parent_pid: int, direct_parent: int) -> None:
    while True:
        time.sleep(PARENT_POLL)
        if os.getppid() != direct_parent or not pid_alive(parent_pid):
            os._exit(1)
