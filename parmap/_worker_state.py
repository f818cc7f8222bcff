"""Per-worker state: ``worker_state()`` and ``worker_id()``, wherever a task runs.

A leaf module (it imports nothing from parmap): the worker processes set their identity
through it without importing the front end, and ``parmap`` exports its two functions.

Where a task runs decides what it sees:

* in a worker process: a dict created when the worker started, kept until it exits,
  and the worker's id (0 … n_jobs-1; a replacement worker takes the id of the one it
  replaces);
* in a thread of the threading backend: a dict per thread, kept for the life of the
  thread pool, and the thread's index in the pool;
* anywhere else (the caller, ``n_jobs=1``, the sequential backend): the calling
  process's own dict and id 0.
"""
from __future__ import annotations

import threading
from typing import Any

from ._public import public

__all__ = ["worker_state", "worker_id", "enter_process", "enter_thread", "process_slot"]

#: this process's state and id (a worker process resets both when it starts)
_state: dict[str, Any] = {}
_id = 0
_in_worker = False  # a process worker of a parmap pool (enter_process)
#: the same, per thread, for the threads of a thread pool
_local = threading.local()


@public
def worker_state() -> dict[str, Any]:
    """A dict that lives as long as the worker running the current task.

    Tasks that run in the same worker see the same dict, so it can hold what is
    expensive to build (a connection, a model, a cache) for the next tasks; workers do
    not share it (``cache = parmap.worker_state().setdefault("cache", {})`` in a task).
    Outside a worker it is the calling process's own dict. See :doc:`long_runs`.

    In a process worker it survives until the worker exits (its idle timeout, pool
    shutdown, or recycling with ``max_tasks_per_child``/``max_memory_per_child``); with
    the threading backend there is one dict per thread.
    """
    state = getattr(_local, "state", None)
    return _state if state is None else state


@public
def worker_id() -> int:
    """The id of the worker running the current task: 0 … n_jobs-1.

    Stable for the worker's life; a worker that replaces another (recycling, a crash)
    takes the id of the one it replaces. In a thread of the threading backend, the
    thread's index in its pool; outside a worker (``n_jobs=1``, the caller), 0.
    See :doc:`long_runs`.
    """
    wid = getattr(_local, "wid", None)
    return _id if wid is None else wid


def enter_process(wid: int) -> None:
    """In a worker process, once, at start: a fresh state (a forked worker must not
    share the caller's) and its id."""
    global _state, _id, _in_worker
    _state, _id, _in_worker = {}, wid, True


def process_slot() -> int | None:
    """In a process worker of a pool, its id: the slot that the processes replacing it
    (recycling, a crash) take in turn; elsewhere None."""
    return _id if _in_worker else None


def enter_thread(wid: int) -> None:
    """In a pool thread, once, at start: its own state and id."""
    _local.state, _local.wid = {}, wid
