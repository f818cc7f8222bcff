"""A pool of threads: for tasks that release the GIL (numpy, I/O) or need shared memory.

Worker threads take ``(generation, batch, callback, context)`` items from one queue. A
cancelled call bumps ``generation``, so items queued before the abort are dropped without
running. Each batch runs in a copy of the caller's :mod:`contextvars` context, so
``parallel_config`` settings reach nested calls made by the tasks (the batch then layers
the nested backend's settings over them: see ``ParallelBackendBase.get_nested_backend``).
Its callback runs in another copy: it may read the call's input (``dispatch``), and an
input generator must see the caller's settings there as in the caller's thread.
"""
from __future__ import annotations

import contextvars
import threading
from queue import SimpleQueue

from .._delayed import Batch
from .._worker_state import enter_thread
from ._base import Callback, CallOptions, Outcome, ParallelBackendBase

__all__ = ["ThreadingBackend"]


class _ThreadPool:
    def __init__(self, size: int):
        self.size = size
        self.generation = 0
        self._queue: SimpleQueue[tuple | None] = SimpleQueue()
        self._running: dict[int, int] = {}  # thread index -> the generation of its batch
        self._threads = [threading.Thread(target=self._work, args=(i,),
                                          name=f"parmap-thread-{i}", daemon=True)
                         for i in range(size)]
        for thread in self._threads:
            thread.start()

    def submit(self, batch: Batch, callback: Callback, context: contextvars.Context) -> None:
        self._queue.put((self.generation, batch, callback, context))

    def cancel_pending(self) -> None:
        self.generation += 1

    def shutdown(self, wait: bool) -> None:
        """Stop the threads; with ``wait``, join those not running a cancelled call's
        batch (abandoned, as a stuck thread is: they end when their task returns)."""
        live = self.generation
        self.generation += 1
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for index, thread in enumerate(self._threads):
                if thread is not threading.current_thread() and \
                        self._running.get(index, live) == live:
                    thread.join()

    def _work(self, index: int) -> None:
        enter_thread(index)  # parmap.worker_state() / worker_id() in this thread
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            generation, batch, callback, context = item
            item = None
            self._running[index] = generation  # (before the check: see shutdown)
            if generation == self.generation:  # else cancelled before it started
                self._run(batch, callback, context, generation)
            del self._running[index]
            batch = callback = context = None  # don't keep the last batch alive

    def _run(self, batch: Batch, callback: Callback, context: contextvars.Context,
             generation: int) -> None:
        try:
            outcome: Outcome = context.copy().run(batch)
        except BaseException as exc:
            outcome = exc
        if generation == self.generation:
            context.copy().run(callback, outcome)


class ThreadingBackend(ParallelBackendBase):
    """Runs batches on a pool of threads owned by this backend instance."""

    supports_sharedmem = True
    target_batch_duration = 0.005

    def __init__(self, nesting_level: int = 0):
        super().__init__(nesting_level)
        self._pool: _ThreadPool | None = None
        self._context = contextvars.copy_context()

    def configure(self, n_jobs: int, options: CallOptions) -> int:
        n_jobs = super().configure(n_jobs, options)
        if self._pool is not None and self._pool.size != n_jobs:
            self._pool.shutdown(wait=False)
            self._pool = None
        if self._pool is None:
            self._pool = _ThreadPool(n_jobs)
        return n_jobs

    def start_call(self) -> None:
        self._context = contextvars.copy_context()

    def submit(self, batch: Batch, callback: Callback) -> None:
        if self._pool is None:
            raise RuntimeError("ThreadingBackend.submit called before configure")
        self._pool.submit(batch, callback, self._context)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        if self._pool is None:
            return
        if ensure_ready:  # a block's next call waits for threads still running the
            # cancelled tasks (n_jobs threads at most, each with its worker_state)
            self._pool.cancel_pending()
        else:
            self.terminate(wait=False)

    def terminate(self, wait: bool = True) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait)
