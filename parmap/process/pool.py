"""A reusable pool of worker processes that notices every way a worker can fail.

Data flow::

    caller threads                    manager thread (one per pool)         workers
    ──────────────                    ─────────────────────────────         ───────
    submit(job) ──> idle worker? ──────── send_bytes(batch) ──────────────> run batch
                    else: pending deque                                        │
                                      wait() on: every result pipe  <──────────┘
                                                 every worker's sentinel
                                                 a wake-up pipe
                                      result   -> callback(results | exception),
                                                  next pending job -> that worker
                                      sentinel -> WorkerCrashedError for its job
                                      deadline -> kill worker, TaskTimeoutError
                                      idle for idle_timeout -> shut the pool down

1. Which job goes to which worker is the scheduler's decision (``scheduler.py``): an
   idle worker, a new one, or (short jobs only) the pipe of a busy worker of the same
   call, so that it starts the next batch without a round trip through the manager.
   A job waits in a busy worker's pipe only if it fits there, so the pool's writes never
   wait on a worker that runs a batch (no deadlock on full pipes); the worker reads its
   pipe itself between batches, with no thread to hand a batch over (~35 µs of a
   call of 4 tiny tasks).
2. The manager thread (``manager.py``) waits on results and on process sentinels
   *together*, so a worker that dies (segfault, os._exit, SIGKILL, OOM killer) is
   noticed as fast as a result.
3. Callbacks run outside the pool lock: the dispatcher may submit from inside them.
4. Cancelling a call drops its pending jobs and kills the workers running its batches;
   replacements are started when work needs them.
5. Recycling (``max_tasks_per_child``, ``max_memory_per_child``): a worker is *retired*
   (told to stop after the jobs it holds) and the pool's launcher thread starts its
   replacement at once, outside the lock; see ``recycling.py`` and ``launcher.py``. Each worker has an id, 0 … size-1
   (``parmap.worker_id()``); a replacement takes the id of the worker it replaces.

Messages: ``protocol.py``. How workers are started: ``spawn.py``. The shared pool every
call reuses: ``registry.py``.
"""
from __future__ import annotations

import os
import sys
import threading
from contextlib import suppress
from multiprocessing.connection import wait
from time import monotonic
from typing import Callable

from .._cpu import cpu_count
from . import protocol, shm_results
from .manager import STOP_GRACE, Manager
from .launcher import Launcher
from .options import PoolOptions
from .recycling import Recycler
from .scheduler import PoolJob, ProcessHandle, Scheduler, Worker
from .spawn import choose_start_method, pool_pipe, prestart, start_failed, start_worker
from .zygote import Zygote

__all__ = ["PoolOptions", "PoolJob", "WorkerPool"]


class WorkerPool:
    """Workers, the jobs they hold, and the queue of jobs waiting for one."""

    def __init__(self, size: int, options: PoolOptions, private: bool = False):
        self.size = size
        self.options = options
        self.private = private
        self.closed = False
        self.active_calls = 0
        self.lock = threading.Lock()
        self.workers: list[Worker] = []
        self.scheduler = Scheduler()
        self.recycler = Recycler(options.max_tasks_per_child, options.max_memory_per_child)
        self.cpus = cpu_count()  # once: the thread caps of every worker it starts
        self._launcher: Launcher | None = None  # started with the first retirement
        self.wake_r, self.wake_w = pool_pipe()
        #: held to write to the wake pipe and to close it: a write racing the close
        #: could land in a pipe made meanwhile on the same descriptor (a worker's)
        self.wake_lock = threading.Lock()
        self.last_active = monotonic()
        self.rounds = 0  # manager loop iterations completed, callbacks included
        self.round_done = threading.Condition(self.lock)
        self._manager: Manager | None = None  # started with the workers
        #: called (pool lock held) when the pool closes itself: failure or idle timeout
        self.on_close: Callable[[WorkerPool], None] | None = None

    def _start(self) -> None:
        """Start the workers, then the manager thread. Lock held.

        Deferred to the first batch, which is serialised by then: large arrays of that
        batch are already in shared memory and remapped, so forked workers inherit the
        shared pages rather than a private copy of the caller's array. The manager
        thread starts last, so that the caller is still single-threaded (fork-safe)
        while the workers fork.
        """
        for _ in range(self.size - sum(not w.dead for w in self.workers)):
            self.spawn()  # (a start interrupted by Ctrl-C kept those started before it)
        self._manager = Manager(self)
        self._manager.start()

    # ------------------------------------------------------------------ workers
    def spawn(self, wid: int | None = None) -> Worker:
        """Start one worker (with the lowest free id by default). Lock held."""
        try:
            worker = self.launch(self._free_id() if wid is None else wid)
        except OSError as exc:  # out of processes or descriptors: the calls fail
            raise start_failed(exc) from exc
        self.workers.append(worker)
        return worker

    def launch(self, wid: int, zygote: Zygote | None = None) -> Worker:
        """Start a worker process (forked by ``zygote`` if given: a replacement, see
        ``zygote.py``); the caller adds it to ``workers`` (lock held then). The start
        itself needs no pool lock (``spawn.start_lock`` orders the starts)."""
        options = self.options
        process: ProcessHandle
        if zygote is not None:
            process, task_w, result_r, status = zygote.start_worker(
                self.size, self.cpus, options.inner_max_num_threads, options.initializer,
                wid, options.finalizer)
        else:
            process, task_w, result_r, status = start_worker(
                options.start_method, self.size, self.cpus, options.inner_max_num_threads,
                options.initializer, wid, options.finalizer,
                options.warm_cloudpickle,
                # the manager outlives every worker (it reaps them); the launcher
                # thread ends at close, before retired workers finish their finalizer
                threading.current_thread() is self._manager)
        return Worker(process, task_w, result_r, status, wid, self.recycler.budget,
                      protocol.task_pipe_room(task_w.fileno()))

    def _free_id(self) -> int:
        taken = {w.wid for w in self.workers if not w.dead} | set(self.recycler.replacing)
        return next(i for i in range(len(taken) + 1) if i not in taken)

    def retire(self, worker: Worker) -> None:
        """Recycle ``worker``: it stops after the jobs it holds, and the launcher thread
        starts its replacement now (see ``recycling``). Lock held."""
        self.stop(worker)
        if worker.wid < self.size and not self.closed:
            self.recycler.replacing.append(worker.wid)
            if self._launcher is None or not self._launcher.is_alive():
                self._launcher = Launcher(self)
                self._launcher.start()
            self._launcher.due.notify()

    def kill(self, worker: Worker) -> None:
        worker.dead = True
        with suppress(Exception):  # already gone
            worker.process.kill()

    def stop(self, worker: Worker) -> None:
        """Ask an idle worker to exit; the manager reaps it. Lock held."""
        worker.dead = True
        with suppress(OSError):
            worker.task_conn.send_bytes(protocol.STOP)

    def resize(self, size: int) -> None:
        """Grow at once, or stop idle workers beyond ``size``."""
        with self.lock:
            self.size = size
            if self._manager is None:
                return  # not started yet: it will start with the new size
            replacing = self.recycler.replacing
            replacing[:] = [wid for wid in replacing if wid < size]
            alive = [w for w in self.workers if not w.dead]
            for _ in range(size - len(alive) - len(replacing)):
                self.spawn()
            idle = sorted((w for w in alive if not w.jobs), key=lambda w: -w.wid)
            for worker in idle[:max(len(alive) - size, 0)]:
                self.stop(worker)
        self.wake()

    def prestart(self) -> None:
        """Before the first batch: start what the workers will come from (a forkserver)."""
        if self._manager is None and not self.closed:
            prestart(self.options.start_method, self.options.warm_cloudpickle)

    def will_fork(self) -> bool:
        """The workers are not started yet and will be forked from this thread."""
        return self._manager is None and not self.closed and \
            choose_start_method(self.options.start_method) == "fork"

    # ------------------------------------------------------------------ jobs
    def submit(self, job: PoolJob) -> None:
        with self.lock:
            if self.closed:
                raise RuntimeError("parmap: the worker pool was shut down")
            self.scheduler.add(job)
            self.last_active = monotonic()
            if self._manager is None:
                self._start()
            self.assign_pending()

    def assign_pending(self) -> None:
        """Send what the scheduler places, starting workers it asks for. Lock held."""
        wake = False
        scheduler, recycler = self.scheduler, self.recycler
        while True:
            if recycler.max_tasks is not None:
                for spent in scheduler.spent(self.workers, recycler.budget):
                    self.retire(spent)  # type: ignore[arg-type]
            placed = scheduler.next_assignment(self.workers,
                                               self.size - len(recycler.replacing))
            if placed is None:
                break
            slot, job = placed
            if slot is None:
                worker = self.spawn()
                wake = True  # the manager must wait on the new worker too
            else:
                worker = slot  # type: ignore[assignment]
            worker.jobs.append(job)
            # counted before it is written: a worker may die while taking it (the write
            # then fails), and status[READ] alone says whether it did
            worker.sent += 1
            try:
                worker.task_conn.send_bytes(job.payload)  # type: ignore[arg-type]
            except OSError:
                pass  # the worker died: the manager reaps it (see manager._reap)
            after = scheduler.next_job(self.workers)
            if recycler.assigned(worker, len(job.batch), len(after.batch) if after else 0):
                self.retire(worker)  # its last job: the replacement starts ahead
            if job.timeout is not None:
                wake = True  # the manager must start polling for the deadline
        if wake:
            self.wake()

    def cancel(self, owner: object) -> None:
        """Drop ``owner``'s pending jobs and kill the workers running its batches."""
        killed = []
        with self.lock:
            self.scheduler.drop(owner)
            for worker in self.workers:
                if worker.jobs and worker.jobs[0].owner is owner:  # all its jobs are owner's
                    for job in worker.jobs:
                        job.cancel()
                    self.kill(worker)
                    killed.append(worker.process)
            rounds = self.rounds
        self.wake()
        if "numpy" not in sys.modules:
            return  # no result arrays can have been placed
        # Result files of the call must be gone when it returns, not whenever the
        # manager gets to them: wait for the killed workers' deaths (SIGKILL takes
        # milliseconds) and sweep their files; then for the manager to finish the round
        # it may be in, which unlinks the files of replies it has already read.
        deadline = monotonic() + STOP_GRACE
        for process in killed:
            wait([process.sentinel], timeout=max(deadline - monotonic(), 0))
            shm_results.sweep_worker_results(process.pid)  # type: ignore[arg-type]
        manager = self._manager
        if manager is not None and threading.current_thread() is not manager:
            with self.lock:
                self.round_done.wait_for(
                    lambda: self.rounds > rounds or self.closed or not manager.is_alive(),
                    timeout=max(deadline - monotonic(), 0))

    def wake(self) -> None:
        """Make the manager look again (new workers, deadlines, closing)."""
        if self._manager is None:
            return  # nothing to wake (and nobody would drain the pipe)
        with self.wake_lock, suppress(OSError):  # closed: the manager has ended
            self.wake_w.send_bytes(b"!")

    # ------------------------------------------------------------------ shutdown
    def close_locked(self) -> None:
        """Stop idle workers, kill busy ones, forget pending jobs. Lock held.

        A worker already told to stop, with no job left (retired by recycling), is left
        to exit on its own, running its finalizer; the manager reaps it."""
        self.closed = True
        self.scheduler.clear()
        if self._launcher is not None:
            self._launcher.due.notify()  # it exits
        for worker in self.workers:
            if worker.jobs:
                for job in worker.jobs:
                    job.cancel()
                self.kill(worker)
            elif not worker.dead:
                self.stop(worker)

    def shutdown(self, wait_for_workers: bool = True) -> None:
        """Stop every worker (killing busy ones) and the manager thread."""
        with self.lock:
            if not self.closed:
                self.close_locked()
            manager = self._manager
            if manager is None:  # never started: no workers, no manager
                if not self.wake_r.closed:
                    self.wake_r.close()
                    self.wake_w.close()
                return
        self.wake()
        launcher = self._launcher
        if launcher is not None and threading.current_thread() is not launcher:
            launcher.join(timeout=2 * STOP_GRACE)  # it starts no worker after this
        if wait_for_workers and threading.current_thread() is not manager:
            manager.join(timeout=2 * STOP_GRACE)
            with self.lock:
                for worker in self.workers:
                    self.kill(worker)
                    worker.process.join(timeout=STOP_GRACE)
            manager.join(timeout=STOP_GRACE)
            if launcher is not None and threading.current_thread() is not launcher:
                launcher.join_zygote(STOP_GRACE)  # it exits once its children have
