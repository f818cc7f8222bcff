"""The worker side of the ``dask`` backend: what one Dask task runs for one parmap batch.

Data flow (one batch)::

    caller  DaskBackend.submit ── client.submit(run_batch, start, func, tasks, options,
                                                *scattered) ──> scheduler ──> a worker
    worker  run_batch: put the scattered objects back where the caller left ``Scattered(i)``
            placeholders (Dask resolved those futures because they were top-level arguments
            of the Dask task), run the tasks as a parmap ``Batch`` inside
            ``parallel_config(backend="dask")`` so that a ``Parallel`` call made by a task runs
            on the cluster too, and return ``(results, seconds)``, or the ``CapturedError`` of
            the task that raised (parmap's own error transport: original type, worker
            traceback, task note), so that Dask never sees a failed task of ours.
    timeout one watchdog thread per worker process watches the batches that run under a
            ``timeout``; when a task runs past it, it logs an event on the call's topic, to
            which the caller is subscribed, and the caller fails the call at once. Dask cannot
            stop a running task: the task goes on until it returns.

This module is imported by the Dask workers (``run_batch`` is pickled by reference), so it
imports nothing from Dask at module level that the caller does not already have.
"""
from __future__ import annotations

import threading
from time import monotonic
from typing import Any, Callable

from .._delayed import Batch
from .._errors import CapturedError

__all__ = ["Scattered", "run_batch", "secede_if_in_task", "rejoin"]


class Scattered:
    """Placeholder for the ``slot``-th scattered object passed to :func:`run_batch`."""

    __slots__ = ("slot",)

    def __init__(self, slot: int):
        self.slot = slot

    def __reduce__(self) -> tuple:
        return Scattered, (self.slot,)

    def __repr__(self) -> str:
        return f"<scattered object {self.slot}>"


def run_batch(start: int, func: Callable | None, tasks: list, options: tuple | None,
              *scattered: Any) -> Any:
    """Run one batch in a Dask worker; ``options`` is ``(timeout, topic)`` or None."""
    if scattered:
        tasks = _put_back(func, tasks, scattered)
    # a Parallel call made by a task runs on dask too (Batch applies these settings)
    batch = Batch(start, tasks, func, {"backend": "dask", "backend_params": {}})
    running = None
    if options is not None:
        from distributed import get_worker

        timeout, topic = options
        running = _Running(start, timeout, topic, get_worker())
        batch.tracker = running
        _watchdog.track(running)
    try:
        results = batch()
    except BaseException as exc:  # noqa: B036 - every failure goes back to the caller
        return CapturedError.capture(exc, start + max(batch.failed, 0), _dumps)
    finally:
        if running is not None:
            _watchdog.untrack(running)
    return results, batch.duration


def _put_back(func: Callable | None, tasks: list, values: tuple) -> list:
    def swap(value: Any) -> Any:
        return values[value.slot] if type(value) is Scattered else value

    if func is not None:  # compact form: tasks are argument tuples
        return [tuple(map(swap, args)) for args in tasks]
    return [(f, tuple(map(swap, args)), {k: swap(v) for k, v in kwargs.items()})
            for f, args, kwargs in tasks]


def _dumps(obj: Any) -> bytes:
    import cloudpickle  # what Dask falls back to for the result: check with the same

    data: bytes = cloudpickle.dumps(obj)
    return data


# ---------------------------------------------------------------------- timeouts

class _Running:
    """A batch running under a timeout; ``Batch`` calls :meth:`mark` before each task."""

    __slots__ = ("start", "timeout", "topic", "worker", "current", "reported")

    def __init__(self, start: int, timeout: float, topic: str, worker: Any):
        self.start = start
        self.timeout = timeout
        self.topic = topic
        self.worker = worker
        # (task index, started), one store; the batch's first task starts right away:
        # a deadline from now on, which the watchdog sees as it is told of the batch
        self.current: tuple[int, float] | None = (start, monotonic())
        self.reported = False

    def mark(self, index: int, started: float) -> None:  # Batch.tracker protocol
        self.current = (index, started)


#: seconds a watchdog with nothing to watch waits for more before its thread ends
WATCHDOG_IDLE = 2.0


class _Watchdog:
    """One daemon thread per worker process; it sleeps until the earliest deadline.

    ``mark`` only stores a tuple (no lock, no wake-up): when a batch moves on to its next
    task, the watchdog wakes at the old deadline, sees the newer start and sleeps again.
    The thread ends after ``WATCHDOG_IDLE`` seconds with nothing to watch (a worker in
    the caller's process, with ``LocalCluster(processes=False)``, would keep it for the
    caller's life), and the next batch with a timeout starts another.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running: set[_Running] = set()
        self._thread: threading.Thread | None = None

    def track(self, running: _Running) -> None:
        with self._cond:
            self._running.add(running)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._watch, daemon=True,
                                                name="parmap-dask-timeout-watchdog")
                self._thread.start()
            self._cond.notify()

    def untrack(self, running: _Running) -> None:
        with self._cond:
            self._running.discard(running)
            self._cond.notify()  # its deadline no longer counts

    def _watch(self) -> None:
        while True:
            with self._cond:
                now = monotonic()
                expired, wake = [], None
                for running in self._running:
                    current = running.current
                    if current is None or running.reported:
                        continue
                    due = current[1] + running.timeout
                    if due <= now:
                        running.reported = True
                        expired.append((running, current))
                    elif wake is None or due < wake:
                        wake = due
                if not expired:
                    if not self._running:
                        if not self._cond.wait(WATCHDOG_IDLE) and not self._running:
                            self._thread = None  # under the lock: track starts another
                            return
                        continue
                    self._cond.wait(None if wake is None else wake - now)
                    continue
            for running, (index, started) in expired:
                worker = running.worker
                try:  # thread-safe: log_event hands the message to the worker's loop
                    worker.log_event(running.topic, {
                        "start": running.start, "index": index,
                        "elapsed": round(now - started, 3), "worker": str(worker.address)})
                except Exception:  # the worker is closing: the call fails another way
                    pass


_watchdog = _Watchdog()


# ---------------------------------------------------------------------- nested calls

_local = threading.local()


def secede_if_in_task() -> bool:
    """Leave the worker's thread pool if this thread runs a Dask task (so that a
    ``Parallel`` call made by a task, waiting for its own tasks, does not hold a worker
    thread they need); True if it did. ``rejoin`` undoes it."""
    if getattr(_local, "seceded", False):
        return False  # an enclosing call of this thread already left the pool
    try:
        from distributed import secede
        from distributed.threadpoolexecutor import thread_state as pool_state
        from distributed.utils import thread_state
    except ImportError:
        return False
    if getattr(thread_state, "key", None) is None:
        return False  # not running a task (a thread the task started, or the caller)
    if not getattr(pool_state, "proceed", False) or getattr(pool_state, "executor", None) \
            is None:
        return False  # not a pool thread, or the task seceded by itself
    secede()
    _local.seceded = True
    return True


def rejoin() -> None:
    """Take a worker thread again (blocks until one is free)."""
    from distributed import rejoin as dask_rejoin

    _local.seceded = False
    dask_rejoin()
