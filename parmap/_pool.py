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

1. A worker holds at most ``PREFETCH`` batches: the one it runs and the next, queued in
   its pipe, so it starts the next batch without waiting for the round trip through the
   manager (only short batches are queued so; see ``PREFETCH_MAX``). The worker drains
   its task pipe in a reader thread, so the parent's writes never wait on the worker's
   (no deadlock on full pipes), and a queued batch always belongs to the same call as
   the running one, so cancelling a call never kills another call's work.
2. The manager waits on results and on process sentinels *together*, so a worker that
   dies (segfault, os._exit, SIGKILL, OOM killer) is noticed as fast as a result.
3. Callbacks run outside the pool lock: the dispatcher may submit from inside them.
4. Cancelling a call drops its pending jobs and kills the workers running its batches;
   replacements are started when work needs them.

How workers are started: ``parmap._spawn``. The shared pool every call reuses:
``parmap._registry``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sys
import threading
from collections import deque
from multiprocessing.connection import wait
from time import monotonic
from typing import Any, Callable, NamedTuple

from . import _worker
from ._spawn import choose_start_method, exit_description, start_worker
from ._errors import (PoolError, SerializationError, TaskTimeoutError, WorkerCrashedError,
                      call_repr)

__all__ = ["PoolOptions", "PoolJob", "WorkerPool", "RETRY"]

#: seconds a worker gets to exit after a polite stop before it is killed
STOP_GRACE = 1.0
#: how often the manager checks task deadlines while a timeout is in force
DEADLINE_POLL = 0.05
#: batches a worker may hold: the running one and the next (see the module doc)
PREFETCH = 2
#: only a batch expected to run shorter than this is queued behind another: a queued
#: batch cannot move to a worker that falls idle, so at the end of a call a long one
#: would keep the others waiting, while its round trip (~0.3 ms) would not matter
PREFETCH_MAX = 0.01


#: the outcome of a batch whose worker asks for it again with its arrays placed
RETRY = type("Retry", (), {"__repr__": lambda self: "RETRY"})()


class PoolOptions(NamedTuple):
    """What makes two pools interchangeable (n_jobs is not: a pool resizes)."""

    start_method: str | None = None
    initializer: bytes | None = None  # cloudpickle of (initializer, initargs)
    inner_max_num_threads: int | None = None
    idle_timeout: float = 300.0


class PoolJob:
    """One batch travelling through the pool."""

    __slots__ = ("owner", "batch", "payload", "callback", "timeout", "cancelled", "short")

    def __init__(self, owner: object, batch: Any, payload: bytes,
                 callback: Callable[[Any], None], timeout: float | None):
        self.owner = owner
        self.batch = batch
        self.payload: bytes | None = payload
        self.callback = callback
        self.timeout = timeout
        self.cancelled = False
        #: may wait in a busy worker's pipe (see PREFETCH_MAX): the round trip it saves
        #: matters, and it cannot hold the call's end back for long
        expected = getattr(batch, "expected", None)
        self.short = expected is None or expected < PREFETCH_MAX

    def describe(self) -> str:
        start, n = self.batch.start, len(self.batch)
        first = call_repr(*self.batch.task(0))
        if n == 1:
            return f"task {start} ({first})"
        return f"tasks {start}..{start + n - 1} (the first: {first})"


class _Worker:
    __slots__ = ("process", "task_conn", "result_conn", "status", "jobs", "dead")

    def __init__(self, process: Any, task_conn: Any, result_conn: Any, status: Any):
        self.process = process
        self.task_conn = task_conn
        self.result_conn = result_conn
        self.status = status
        self.jobs: deque[PoolJob] = deque()  # sent, in the order the worker runs them
        self.dead = False

    def running(self) -> PoolJob | None:
        """The batch the worker is running (or about to): the oldest it holds."""
        return self.jobs[0] if self.jobs else None


class WorkerPool:
    def __init__(self, size: int, options: PoolOptions, private: bool = False):
        self.size = size
        self.options = options
        self.private = private
        self.closed = False
        self.active_calls = 0
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._pending: deque[PoolJob] = deque()
        self._wake_r, self._wake_w = mp.Pipe(duplex=False)
        self._last_active = monotonic()
        self._manager: threading.Thread | None = None  # started with the workers
        self._rounds = 0  # manager loop iterations completed, callbacks included
        self._round_done = threading.Condition(self._lock)
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
        for _ in range(self.size):
            self._spawn()
        self._manager = threading.Thread(target=self._manage, name="parmap-pool-manager",
                                         daemon=True)
        self._manager.start()

    # ------------------------------------------------------------------ workers
    def _spawn(self) -> _Worker:
        """Start one worker. Called with the lock held."""
        inherited = [self._wake_r, self._wake_w] + [
            conn for w in self._workers for conn in (w.task_conn, w.result_conn)]
        process, task_w, result_r, status = start_worker(
            self.options.start_method, self.size, self.options.inner_max_num_threads,
            self.options.initializer, inherited)
        worker = _Worker(process, task_w, result_r, status)
        self._workers.append(worker)
        return worker

    def _kill(self, worker: _Worker) -> None:
        worker.dead = True
        try:
            worker.process.kill()
        except Exception:  # already gone
            pass

    def resize(self, size: int) -> None:
        """Grow at once, or stop idle workers beyond ``size``."""
        with self._lock:
            self.size = size
            if self._manager is None:
                return  # not started yet: it will start with the new size
            alive = [w for w in self._workers if not w.dead]
            for _ in range(size - len(alive)):
                self._spawn()
            idle = [w for w in alive if not w.jobs]
            for worker in idle[:max(len(alive) - size, 0)]:
                self._stop(worker)
        self._wake()

    def _stop(self, worker: _Worker) -> None:
        """Ask an idle worker to exit; the manager reaps it. Lock held."""
        worker.dead = True
        try:
            worker.task_conn.send_bytes(b"")
        except OSError:
            pass

    def will_fork(self) -> bool:
        """The workers are not started yet and will be forked from this thread."""
        return self._manager is None and not self.closed and \
            choose_start_method(self.options.start_method) == "fork"

    # ------------------------------------------------------------------ jobs
    def submit(self, job: PoolJob) -> None:
        with self._lock:
            if self.closed:
                raise RuntimeError("parmap: the worker pool was shut down")
            self._pending.append(job)
            self._last_active = monotonic()
            if self._manager is None:
                self._start()
            self._assign_pending()

    def _assign_pending(self) -> None:
        """Send pending jobs to idle workers, starting replacements. Lock held."""
        wake = False
        pending = self._pending
        while pending:
            job = None
            worker = next((w for w in self._workers if not w.jobs and not w.dead), None)
            if worker is None and sum(not w.dead for w in self._workers) < self.size:
                worker = self._spawn()
                wake = True
            if worker is None:  # every worker busy: queue a batch behind one of its own call
                for candidate in self._workers:
                    if candidate.dead or len(candidate.jobs) >= PREFETCH:
                        continue
                    owner = candidate.jobs[0].owner
                    job = next((j for j in pending if j.owner is owner and j.short), None)
                    if job is not None:
                        pending.remove(job)
                        worker = candidate
                        break
                if worker is None:
                    break
            else:
                job = pending.popleft()
            worker.jobs.append(job)
            payload = job.payload
            if len(worker.jobs) == 1:  # runs at once: never sent again, the bytes can go
                job.payload = None
            try:
                worker.task_conn.send_bytes(payload)
            except OSError:
                pass  # the worker died: the manager reports it through its sentinel
            if job.timeout is not None:
                wake = True  # the manager must start polling for the deadline
        if wake:
            self._wake()

    def cancel(self, owner: object) -> None:
        """Drop ``owner``'s pending jobs and kill the workers running its batches."""
        killed = []
        with self._lock:
            self._pending = deque(j for j in self._pending if j.owner is not owner)
            for worker in self._workers:
                if worker.jobs and worker.jobs[0].owner is owner:  # all its jobs are owner's
                    for job in worker.jobs:
                        job.cancelled = True
                    self._kill(worker)
                    killed.append(worker.process)
            rounds = self._rounds
        self._wake()
        if "parmap._shm" not in sys.modules:
            return
        # Result files of the call must be gone when it returns, not whenever the
        # manager gets to them: wait for the killed workers' deaths (SIGKILL takes
        # milliseconds) and sweep their files; then for the manager to finish the round
        # it may be in, which unlinks the files of replies it has already read.
        deadline = monotonic() + STOP_GRACE
        for process in killed:
            wait([process.sentinel], timeout=max(deadline - monotonic(), 0))
            sys.modules["parmap._shm"].sweep_worker_results(os.getpid(), process.pid)
        manager = self._manager
        if manager is not None and threading.current_thread() is not manager:
            with self._lock:
                self._round_done.wait_for(
                    lambda: self._rounds > rounds or self.closed or not manager.is_alive(),
                    timeout=max(deadline - monotonic(), 0))

    # ------------------------------------------------------------------ manager
    def _wake(self) -> None:
        if self._manager is None:
            return  # nothing to wake (and nobody would drain the pipe)
        try:
            self._wake_w.send_bytes(b"!")
        except OSError:
            pass

    def _manage(self) -> None:
        try:
            self._manage_loop()
        except BaseException as exc:  # a bug here must fail the calls, never hang them
            self._fail_everything(exc)
            raise

    def _fail_everything(self, exc: BaseException) -> None:
        with self._lock:
            jobs = list(self._pending) + [j for w in self._workers for j in w.jobs]
            self._close_locked()
        self._notify_closed()
        error = PoolError(f"parmap's pool manager failed ({type(exc).__name__}: {exc}); "
                          f"the pool was shut down and the next call starts a new one. "
                          f"Please report this as a bug.")
        for job in jobs:
            try:
                job.callback(error)
            except Exception:
                pass

    def _manage_loop(self) -> None:
        while True:
            with self._lock:
                if self.closed and not self._workers:
                    self._wake_r.close()
                    self._wake_w.close()
                    return
                workers = list(self._workers)
                timeout = self._wait_timeout()
            waitables = [self._wake_r]
            waitables += [w.result_conn for w in workers if not w.result_conn.closed]
            waitables += [w.process.sentinel for w in workers]
            ready = set(wait(waitables, timeout))
            finished: list = []
            with self._lock:
                if self._wake_r in ready:
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
                for worker in workers:
                    if worker.result_conn in ready:
                        self._collect(worker, finished)
                for worker in workers:
                    if worker.process.sentinel in ready:
                        self._reap(worker, finished)
                self._check_deadlines(finished)
                if not self.closed:
                    self._assign_pending()
                    self._maybe_idle_out()
            for job, outcome in finished:
                if job is None:
                    _discard_reply(outcome)
                else:
                    job.callback(self._decode(job, outcome))
            with self._lock:
                self._rounds += 1
                self._round_done.notify_all()

    def _wait_timeout(self) -> float | None:
        if any(j.timeout is not None for w in self._workers for j in w.jobs):
            return DEADLINE_POLL
        if self.closed or self.private:
            return STOP_GRACE if self.closed else None
        if self.active_calls == 0 and not self._pending:
            return max(0.0, self._last_active + self.options.idle_timeout - monotonic())
        return None

    def _collect(self, worker: _Worker, finished: list) -> None:
        try:
            data = worker.result_conn.recv_bytes()
        except (EOFError, OSError):
            worker.result_conn.close()  # the sentinel tells why
            return
        job = worker.jobs.popleft() if worker.jobs else None
        if worker.jobs:
            worker.jobs[0].payload = None  # running now: it will not be re-sent
        self._last_active = monotonic()
        if job is not None and not job.cancelled:
            finished.append((job, data))
        else:  # a cancelled batch: only its shared-memory files need handling
            finished.append((None, data))

    def _reap(self, worker: _Worker, finished: list) -> None:
        if worker.jobs and not worker.result_conn.closed:
            try:  # a result sent just before the worker died still counts
                while worker.jobs and worker.result_conn.poll():
                    self._collect(worker, finished)
            except (EOFError, OSError):
                pass
        worker.process.join(timeout=STOP_GRACE)
        if "parmap._shm" in sys.modules:
            sys.modules["parmap._shm"].sweep_worker_results(os.getpid(), worker.process.pid)
        job = worker.running()
        if job is not None and not job.cancelled and not self.closed:
            code = worker.process.exitcode
            finished.append((job, WorkerCrashedError(
                f"a worker process (pid {worker.process.pid}) died with "
                f"{exit_description(code)} while running {job.describe()}. The call was "
                f"cancelled. Common causes: a crash in C code (segfault), os._exit(), the "
                f"out-of-memory killer (check `dmesg`), or a signal sent to the worker. "
                f"Run with n_jobs=1 to reproduce it in the calling process.",
                code, tuple(range(job.batch.start, job.batch.start + len(job.batch))))))
        self._requeue(worker, job)
        for conn in (worker.task_conn, worker.result_conn):
            conn.close()
        self._workers.remove(worker)

    def _requeue(self, worker: _Worker, failed: PoolJob | None) -> None:
        """A dead worker's batches other than ``failed`` never started: queue them again."""
        again = [j for j in worker.jobs
                 if j is not failed and not j.cancelled and j.payload is not None]
        worker.jobs.clear()
        if again and not self.closed:
            self._pending.extendleft(reversed(again))

    def _check_deadlines(self, finished: list) -> None:
        now = monotonic()
        for worker in self._workers:
            started = worker.status[1]
            if worker.dead or not worker.jobs or not started:
                continue
            index = int(worker.status[0])
            job = next((j for j in worker.jobs
                        if j.batch.start <= index < j.batch.start + len(j.batch)), None)
            if job is None or job.timeout is None or job.cancelled:
                continue
            if now - started > job.timeout:
                batch = job.batch
                func, args, kwargs = batch.task(index - batch.start)
                job.cancelled = True
                self._kill(worker)
                finished.append((job, TaskTimeoutError(
                    f"task {index} ({call_repr(func, args, kwargs)}) has run for more than "
                    f"timeout={job.timeout}s; its worker was stopped and the call cancelled. "
                    f"Raise the timeout, or split the task into smaller ones.")))

    def _notify_closed(self) -> None:
        if self.on_close is not None:
            self.on_close(self)

    def _maybe_idle_out(self) -> None:
        if (self.active_calls == 0 and not self._pending and not self.private
                and all(not w.jobs for w in self._workers)
                and monotonic() - self._last_active >= self.options.idle_timeout):
            self._notify_closed()
            self._close_locked()

    @staticmethod
    def _decode(job: PoolJob, outcome: Any) -> Any:
        if isinstance(outcome, BaseException):
            return outcome
        try:
            status, payload, duration, shm_files = pickle.loads(outcome)
            if shm_files is not None:
                from ._shm import discard_results

                try:
                    payload = pickle.loads(payload)
                finally:
                    discard_results(shm_files)
        except Exception as exc:
            return SerializationError(
                f"the results of {job.describe()} could not be unpickled in the caller: "
                f"{type(exc).__name__}: {exc}")
        job.batch.duration = duration
        if status == _worker.RETRY:
            return RETRY
        return payload if status == _worker.OK else payload.rebuild()

    # ------------------------------------------------------------------ shutdown
    def _close_locked(self) -> None:
        self.closed = True
        self._pending.clear()
        for worker in self._workers:
            if not worker.jobs and not worker.dead:
                self._stop(worker)
            else:
                for job in worker.jobs:
                    job.cancelled = True
                self._kill(worker)

    def shutdown(self, wait_for_workers: bool = True) -> None:
        """Stop every worker (killing busy ones) and the manager thread."""
        with self._lock:
            if not self.closed:
                self._close_locked()
            if self._manager is None:  # never started: no workers, no manager
                if not self._wake_r.closed:
                    self._wake_r.close()
                    self._wake_w.close()
                return
        self._wake()
        if wait_for_workers and threading.current_thread() is not self._manager:
            self._manager.join(timeout=2 * STOP_GRACE)
            with self._lock:
                for worker in self._workers:
                    self._kill(worker)
                    worker.process.join(timeout=STOP_GRACE)
            self._manager.join(timeout=STOP_GRACE)


def _discard_reply(data: bytes) -> None:
    """Unlink the shared-memory result files of a reply nobody will read."""
    try:
        shm_files = pickle.loads(data)[3]
    except Exception:
        return
    if shm_files:
        from ._shm import discard_results

        discard_results(shm_files)


