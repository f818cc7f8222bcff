"""The pool's manager thread: one wait on every result pipe, every worker's sentinel and
a wake-up pipe, so a result and a dying worker are noticed equally fast.

Each round::

    wait(result pipes + sentinels + wake pipe, timeout)
    result   -> decode it (outside the lock) and call the job's callback
    sentinel -> the worker died: WorkerCrashedError for the job it ran; jobs queued
                behind it that never started go back to the scheduler
    deadline -> kill the worker, TaskTimeoutError for its job
    then     -> send pending jobs to idle workers; shut an idle shared pool down after
                idle_timeout

Callbacks run outside the pool lock, since the dispatcher submits from inside them. A
bug in this loop fails every job of the pool with a ``PoolError`` rather than hanging.
"""
from __future__ import annotations

import math
import select
import signal
import threading
import warnings
from multiprocessing.connection import Connection, wait
from time import monotonic
from typing import Any, Callable, Protocol

from .._errors import (PoolError, WorkerCrashedError, initializer_timeout_error,
                       timeout_error)
from . import protocol, shm_results
from .options import PoolOptions
from .recycling import RSS, Recycler, format_bytes
from .scheduler import PoolJob, Scheduler, Worker
from .spawn import exit_description
from .zygote import Zygote

__all__ = ["Manager", "PoolView", "STOP_GRACE", "DEADLINE_POLL", "MAX_RESENDS",
           "FINISH_LIMIT"]

#: seconds a worker gets to exit after a polite stop before it is killed
STOP_GRACE = 1.0
#: how often the manager checks task deadlines while a timeout is in force
DEADLINE_POLL = 0.05
#: seconds a worker told to stop, with no job left, may take to exit (its finalizer, or a
#: non-daemon thread a task started) before it is killed, with a warning: a finalizer
#: that hung kept the interpreter from exiting, or piled up retired workers
FINISH_LIMIT = 10.0
#: a job first in line when its worker died before taking it goes to another worker;
#: after this many such deaths it is blamed for the crash (see ``Manager._reap``)
MAX_RESENDS = 2

#: what a round hands to callbacks: (job, reply bytes or exception); job None for the
#: reply of a cancelled batch, whose result files only need unlinking
_Finished = list[tuple[PoolJob | None, Any]]


class PoolView(Protocol):
    """What the manager and launcher threads use of their ``pool.WorkerPool`` (which
    imports both modules: they name it through this protocol, not by import)."""

    lock: threading.Lock
    closed: bool
    private: bool
    active_calls: int
    last_active: float
    rounds: int
    round_done: threading.Condition
    options: PoolOptions
    recycler: Recycler
    scheduler: Scheduler
    workers: list[Worker]
    wake_r: Connection
    wake_w: Connection
    wake_lock: Any
    on_close: Callable[[Any], None] | None

    def assign_pending(self) -> None: ...

    def launch(self, wid: int, zygote: Zygote | None = None) -> Worker: ...

    def retire(self, worker: Worker) -> None: ...

    def kill(self, worker: Worker) -> None: ...

    def wake(self) -> None: ...

    def close_locked(self) -> None: ...


class Manager(threading.Thread):
    def __init__(self, pool: PoolView):
        super().__init__(name="parmap-pool-manager", daemon=True)
        self.pool = pool
        self._waiter = _Waiter()

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug here must fail the calls, never hang them
            self._fail_everything(exc)
            if not isinstance(exc, PoolError):  # (a worker that could not start: said)
                raise

    def _loop(self) -> None:
        pool = self.pool
        while True:
            with pool.lock:
                if pool.closed and not pool.workers:
                    with pool.wake_lock:  # (see WorkerPool.wake)
                        pool.wake_r.close()
                        pool.wake_w.close()
                    return
                workers = list(pool.workers)
                timeout = self._wait_timeout()
            waitables: list[Any] = [pool.wake_r]
            waitables += [w.result_conn for w in workers if not w.result_conn.closed]
            waitables += [w.process.sentinel for w in workers]
            ready = set(self._waiter.wait(waitables, timeout))
            finished: _Finished = []
            reaped: list[int | None] = []  # workers that exited: their files to sweep
            with pool.lock:
                if pool.wake_r in ready:
                    while pool.wake_r.poll():
                        pool.wake_r.recv_bytes()
                for worker in workers:
                    if worker.result_conn in ready:
                        self._collect(worker, finished)
                for worker in workers:
                    if worker.process.sentinel in ready:
                        reaped.append(self._reap(worker, finished))
                self._check_deadlines(finished)
                self._end_overdue(monotonic())
                _drop_taken_requests(pool.workers)
                if not pool.closed:
                    pool.assign_pending()
                    self._maybe_idle_out()
            try:
                for job, outcome in finished:
                    if job is None:
                        protocol.discard_reply(outcome)
                        continue
                    if not isinstance(outcome, BaseException):
                        outcome = protocol.decode_reply(outcome, job.batch, job.describe)
                    # The caller may return as soon as it has the outcome: from then on
                    # nothing here may hold the batch's arguments (large arrays; a shared
                    # array's file goes when the caller drops the array)
                    callback, job.batch = job.callback, None  # type: ignore[assignment]
                    callback(outcome)
            finally:  # (a failing callback ends this thread: the files go all the same)
                # result files the reaped workers made and did not hand over; those they
                # did hand over were taken above (mapped and unlinked): the sweep comes after
                for pid in reaped:
                    if pid is not None:
                        shm_results.sweep_worker_results(pid)
            # the last batch's tasks (their arguments: large arrays) must not stay alive
            # in this frame until the next round, which may come minutes later
            finished = job = outcome = callback = None  # type: ignore[assignment]
            with pool.lock:
                pool.rounds += 1
                pool.round_done.notify_all()

    def _wait_timeout(self) -> float | None:
        timeout, now = self._pool_timeout(), monotonic()
        finishing = []
        for worker in self.pool.workers:  # stopped, with no job left: see _end_overdue
            if worker.dead and not worker.jobs and worker.finishing >= 0:
                worker.finishing = worker.finishing or now
                finishing.append(worker.finishing)
        if finishing:
            due = max(0.0, min(finishing) + FINISH_LIMIT - now)
            timeout = due if timeout is None else min(timeout, due)
        return timeout

    def _pool_timeout(self) -> float | None:
        pool = self.pool
        if Scheduler.tracks_deadlines(pool.workers):
            return DEADLINE_POLL
        if pool.closed or pool.private:
            return STOP_GRACE if pool.closed else None
        idle = pool.options.idle_timeout
        if not math.isfinite(idle):
            return None  # never idles out
        if pool.active_calls == 0 and not pool.scheduler.pending:
            return max(0.0, pool.last_active + idle - monotonic())
        # in use: it can idle out no sooner than idle_timeout after a call ends, which is
        # later than this wait ends; so the end of a call need not wake this thread (a
        # pipe write and a round of this loop: ~15 % of a call of 4 tiny tasks)
        return idle

    def _collect(self, worker: Worker, finished: _Finished) -> None:
        try:
            data = worker.result_conn.recv_bytes()
        except (EOFError, OSError):
            worker.result_conn.close()  # the sentinel tells why
            return
        job = worker.jobs.popleft() if worker.jobs else None
        self.pool.last_active = monotonic()
        if self.pool.recycler.over_memory(worker, job.owner if job is not None else None):
            self.pool.retire(worker)
        if job is not None and not job.cancelled:
            finished.append((job, data))
        else:  # a cancelled batch: only its shared-memory files need handling
            finished.append((None, data))

    def _reap(self, worker: Worker, finished: _Finished) -> int | None:
        """A worker exited: its last replies and its crash error go to ``finished``;
        returns its pid (the caller sweeps its result files once the replies are read).

        Only a job the worker took from its pipe is blamed. The others never ran (a
        worker that died idle, killed or by the OOM killer, may have been given a job
        before this thread noticed): they go back to the queue. A job that was first in
        line at more than ``MAX_RESENDS`` such deaths is blamed all the same, so that a
        worker dying before it reads anything (its initializer exits) fails the call,
        rather than starting workers forever."""
        pool = self.pool
        if worker.jobs and not worker.result_conn.closed:
            try:  # a result sent just before the worker died still counts
                while worker.jobs and worker.result_conn.poll():
                    self._collect(worker, finished)
            except (EOFError, OSError):
                pass
        worker.process.join(timeout=STOP_GRACE)
        job = worker.running()
        if job is not None and not worker.took_running() and job.resent < MAX_RESENDS:
            job.resent += 1
            job = None
        if job is not None and not job.cancelled and not pool.closed:
            finished.append((job, _crash_error(worker, job)))
        again = [j for j in worker.jobs if j is not job and not j.cancelled]
        worker.jobs.clear()
        if again and not pool.closed:  # never taken, so their bytes are all kept
            pool.scheduler.requeue(again)
        for conn in (worker.task_conn, worker.result_conn):
            conn.close()
        pool.workers.remove(worker)
        return worker.process.pid

    def _end_overdue(self, now: float) -> None:
        """Kill a worker told to stop that has not exited ``FINISH_LIMIT`` seconds after
        its last job (its finalizer hangs), with a warning."""
        for worker in self.pool.workers:
            if worker.dead and not worker.jobs and worker.finishing > 0 and \
                    now - worker.finishing > FINISH_LIMIT:
                worker.finishing = -1.0  # killed: warned once
                self.pool.kill(worker)
                stuck = "its initializer did not return" if \
                    worker.status[0] == protocol.INITIALIZER and worker.status[1] else \
                    "its finalizer, or a non-daemon thread one of its tasks started, did " \
                    f"not end. A finalizer must return within {FINISH_LIMIT:g} s"
                warnings.warn(
                    f"parmap: a worker process (pid {worker.process.pid}) had not exited "
                    f"{FINISH_LIMIT:g} s after it was told to stop, so it was killed: "
                    f"{stuck}.", RuntimeWarning, stacklevel=1)

    def _check_deadlines(self, finished: _Finished) -> None:
        for worker, job, index in Scheduler.expired(self.pool.workers, monotonic()):
            job.cancelled = True
            self.pool.kill(worker)  # type: ignore[arg-type]
            if index == protocol.INITIALIZER:
                error = initializer_timeout_error(
                    job.batch.start, job.batch.task(0), job.timeout,
                    worker.process.pid)  # type: ignore[attr-defined]
                # the others still in it most likely hang there too: they would hold
                # the next call's jobs (their jobs, never taken, go to other workers)
                for other in Scheduler.initializing(self.pool.workers):
                    self.pool.kill(other)  # type: ignore[arg-type]
            else:
                error = timeout_error(index, job.batch.task(index - job.batch.start),
                                      job.timeout, "its worker was stopped and the call "
                                      "cancelled")
            finished.append((job, error))

    def _maybe_idle_out(self) -> None:
        pool = self.pool
        if (pool.active_calls == 0 and not pool.scheduler.pending and not pool.private
                and all(not w.jobs for w in pool.workers)
                and monotonic() - pool.last_active >= pool.options.idle_timeout):
            self._notify_closed()
            pool.close_locked()

    def _notify_closed(self) -> None:
        if self.pool.on_close is not None:
            self.pool.on_close(self.pool)

    def _fail_everything(self, exc: BaseException) -> None:
        pool = self.pool
        with pool.lock:
            # their callbacks before closing, which drops them (PoolJob.cancel); those of
            # calls cancelled before are dropped already: nobody is listening there
            callbacks = [j.callback for j in pool.scheduler.clear()] + \
                [j.callback for w in pool.workers for j in w.jobs]
            workers = list(pool.workers)
            pool.close_locked()
            self._notify_closed()
        error = exc if isinstance(exc, PoolError) else PoolError(
            f"parmap's pool manager failed ({type(exc).__name__}: {exc}); the pool was "
            f"shut down and the next call starts a new one. Please report this as a bug.")
        for callback in callbacks:
            try:
                callback(error)
            except Exception:
                pass
        deadline = monotonic() + STOP_GRACE
        for worker in workers:  # the loop that reaped them ends here: no zombie left
            worker.process.join(timeout=max(deadline - monotonic(), 0))
            if worker.process.exitcode is not None:
                shm_results.sweep_worker_results(worker.process.pid)  # type: ignore[arg-type]


def _drop_taken_requests(workers: list[Worker]) -> None:
    """A request its worker has taken is never sent again (``Manager._reap``): its bytes
    (large arguments that are not arrays) need not wait for the reply."""
    for worker in workers:
        job = worker.running()
        if job is not None and job.payload is not None and worker.took_running():
            job.payload = None


_MAX_MS = 2 ** 31 - 1


class _Waiter:
    """``multiprocessing.connection.wait``, keeping one ``select.poll`` for as long as
    the objects waited on stay the same ones (POSIX): a new selector with every
    descriptor registered took ~12 µs of each round, and a call of a few tiny tasks
    takes two or three rounds. Any event counts (a closed pipe, an error), as there."""

    def __init__(self) -> None:
        self._poll: Any = None
        self._by_fd: dict[int, Any] = {}  # the objects waited on, in their order

    def wait(self, objects: list[Any], timeout: float | None) -> list[Any]:
        if not hasattr(select, "poll"):  # Windows
            return wait(objects, None if timeout is None else min(timeout, _MAX_MS / 1000))
        if self._poll is None or len(objects) != len(self._by_fd) or any(
                a is not b for a, b in zip(objects, self._by_fd.values())):
            poll = select.poll()
            by_fd = {}
            for obj in objects:
                fd = obj if isinstance(obj, int) else obj.fileno()
                poll.register(fd, select.POLLIN)
                by_fd[fd] = obj
            self._poll, self._by_fd = poll, by_fd
        # poll() takes a C int of milliseconds: a longer wait (an idle_timeout of a month)
        # ends early, and the manager waits again
        ms = None if timeout is None else min(max(0, math.ceil(timeout * 1000)), _MAX_MS)
        return [self._by_fd[fd] for fd, _ in self._poll.poll(ms)]


def _crash_error(worker: Worker, job: PoolJob) -> WorkerCrashedError:
    code = worker.process.exitcode
    rss = worker.status[RSS]
    running = int(worker.status[0]) if worker.status[1] else None  # (a tracked batch)
    memory = f"; its memory use (RSS) when it last reported, after its previous batch, " \
             f"was {format_bytes(rss)}" if rss else ""
    if code == -signal.SIGKILL:
        causes = (f"It was killed by SIGKILL, most often the kernel's out-of-memory killer "
                  f"(check `dmesg` or `journalctl -k` for 'Out of memory'){memory}. If the "
                  f"tasks need that much memory, use fewer workers (n_jobs) or smaller "
                  f"pieces of work; if memory grows from task to task, "
                  f"max_memory_per_child='2G' (say) replaces a worker before it gets there.")
    else:
        causes = (f"Common causes: a crash in C code (segfault), os._exit(), the "
                  f"out-of-memory killer (check `dmesg`), or a signal sent to the worker"
                  f"{memory}.")
    indices = tuple(range(job.batch.start, job.batch.start + len(job.batch)))
    if not worker.took_running():  # MAX_RESENDS workers in a row died at their start
        return WorkerCrashedError(
            f"worker processes died before they took a task, {MAX_RESENDS + 1} in a row "
            f"(the last, pid {worker.process.pid}, with {exit_description(code)}), so "
            f"{job.describe()} never ran. Most likely they die as they start: in the "
            f"initializer, or in what they import. The call was cancelled.", code, indices)
    return WorkerCrashedError(
        f"a worker process (pid {worker.process.pid}) died with {exit_description(code)} "
        f"while running {job.describe(running)}. The call was cancelled. {causes} Run with "
        f"n_jobs=1 to reproduce it in the calling process.", code, indices)
