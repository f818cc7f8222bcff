"""The shared pool: one reusable ``WorkerPool`` for every call and ``Parallel`` instance.

A call acquires it (resizing it to its ``n_jobs``) and releases it when done; a call
whose options differ while the shared pool is busy gets a private pool of its own, shut
down with the call. The thread-cap variables of the environment (``OMP_NUM_THREADS``,
...) count as options: workers read them when they start. The shared pool closes itself
after ``idle_timeout`` without calls. At interpreter exit every pool is shut down, private
ones included (a call still running on a daemon thread, or a result generator left open,
keeps its pool in use; its workers are not daemonic, and multiprocessing's exit handler
would wait for them forever).
"""
from __future__ import annotations

import atexit
import multiprocessing.process as mp_process
import os
import sys
import threading
import weakref
from time import monotonic

from .pool import PoolOptions, WorkerPool
from .spawn import THREAD_CAP_VARS

__all__ = ["acquire_pool", "release_pool", "shutdown_all"]

_registry_lock = threading.Lock()
_shared: list[WorkerPool] = []  # the reusable pool (at most one), shared by every call
#: private pools of calls still running (see acquire_pool), for shutdown_all
_private: weakref.WeakSet[WorkerPool] = weakref.WeakSet()
#: the thread-cap variables (OMP_NUM_THREADS, ...) of this process when the shared pool's
#: workers started: they read them at start, so a change needs new workers
_shared_env: list[tuple] = []


def _thread_env() -> tuple:
    return tuple(os.environ.get(var) for var in THREAD_CAP_VARS)


def acquire_pool(size: int, options: PoolOptions) -> WorkerPool:
    """The shared pool, resized or replaced to fit; a private one if it is busy elsewhere."""
    env = _thread_env()
    with _registry_lock:
        pool = _shared[0] if _shared else None
        if pool is not None and (pool.closed or pool.options != options or
                                 _shared_env != [env]):
            if pool.active_calls and not pool.closed:
                private = WorkerPool(size, options, private=True)
                private.active_calls += 1
                _private.add(private)
                return private
            _shared.clear()
            pool.shutdown()
            pool = None
        if pool is not None:
            with pool.lock:  # the manager idles a pool out under this lock
                if not pool.closed:
                    pool.active_calls += 1
                    reused = True
                else:
                    reused = False
            if reused:
                if size > pool.size or (size < pool.size and pool.active_calls == 1):
                    pool.resize(size)
                return pool
            _shared.clear()
        pool = WorkerPool(size, options)
        pool.on_close = _forget
        pool.active_calls += 1
        _shared.append(pool)
        _shared_env[:] = [env]
        return pool


def release_pool(pool: WorkerPool) -> None:
    """A call (or a ``with Parallel`` block) is done with ``pool``."""
    with pool.lock:
        pool.active_calls -= 1
        pool.last_active = monotonic()
    if pool.private and pool.active_calls <= 0:
        with _registry_lock:  # shutdown_all may be going through the set
            _private.discard(pool)
        pool.shutdown()
    # a shared pool's manager needs no wake: it already waits no longer than the idle
    # timeout that starts now (see Manager._wait_timeout)


def _forget(pool: WorkerPool) -> None:
    # The pool's on_close hook: called by its manager with the pool lock held. Taking
    # _registry_lock here could deadlock with acquire_pool, which re-checks ``closed``.
    if _shared and _shared[0] is pool:
        _shared.clear()


def shutdown_all() -> None:
    """Stop the shared pool and the private pools still in use (tests, interpreter exit)."""
    with _registry_lock:
        pools = list(_shared) + list(_private)
        _shared.clear()
        _private.clear()
    for pool in pools:
        pool.shutdown()


def _after_fork_in_child() -> None:
    # A process forked by the user must not drive the parent's workers, and may start
    # its own: the lock may have been held by another thread of the parent (copied held)
    global _registry_lock
    _registry_lock = threading.Lock()
    _shared.clear()
    _private.clear()
    # multiprocessing would join the parent's workers at this process's exit, and fail
    # (an AssertionError: they are not its children)
    for process in [p for p in mp_process._children  # type: ignore[attr-defined]
                    if p.name in ("parmap-worker", "parmap-zygote")]:
        mp_process._children.discard(process)  # type: ignore[attr-defined]
    _forget_forkserver()


_RLOCK = type(threading.RLock())


def _forget_forkserver() -> None:
    """In a forked child: start a forkserver of its own when it needs one. The parent's
    is not its child, and multiprocessing asks after it with ``waitpid``, which fails
    (ChildProcessError) here: every call that used the forkserver failed. The child's
    copy of the server's "alive" pipe end is closed, or the parent's server would live
    as long as this process does."""
    # their locks may have been copied held: another thread was starting them
    tracker = getattr(sys.modules.get("multiprocessing.resource_tracker"),
                      "_resource_tracker", None)
    if tracker is not None:  # (a Lock, an RLock since Python 3.11)
        tracker._lock = threading.RLock() if isinstance(tracker._lock, _RLOCK) \
            else threading.Lock()
    server = getattr(sys.modules.get("multiprocessing.forkserver"), "_forkserver", None)
    if server is None:
        return
    server._lock = threading.Lock()
    alive = getattr(server, "_forkserver_alive_fd", None)
    if getattr(server, "_forkserver_pid", None) is None:
        return
    server._forkserver_pid = server._forkserver_address = None
    server._forkserver_alive_fd = None
    if alive is not None:
        try:
            os.close(alive)
        except OSError:
            pass


atexit.register(shutdown_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
