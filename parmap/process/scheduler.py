"""Which job goes to which worker, and which task is past its deadline: pure decisions.

The scheduler sees workers only as :class:`WorkerSlot` records (the jobs each holds, in
the order it runs them; whether it is dead; the task index and start time it publishes)
and never touches a process or a pipe, so every rule here is testable without processes
(``tests/test_scheduler.py``). The pool (``pool.py``) carries its decisions out.

Rules:

1. A pending job goes to an idle live worker; if there is none and fewer live workers
   than the pool's size exist, to a new worker (the pool starts it). Not while its
   call's jobs are on as many workers as the call's ``n_jobs`` (its owner's ``limit``):
   the shared pool is as large as the largest call running, and a call of 2 running
   beside one of 6 must still run at most 2 tasks at once. The next job that may go,
   goes.
2. If every worker is busy, a *short* job (expected to run under ``PREFETCH_MAX``) may
   wait in the pipe of a worker that runs a job of the same call and holds fewer than
   ``PREFETCH`` jobs, when the jobs that worker holds are *known* to be short (measured,
   not merely unmeasured): the worker starts it without a round trip through the manager.
   Behind a job of unknown length (the first batches of a call) nothing waits: one slow
   first task must not hold a quick one back (joblib's "fastest first" test).
   A queued job cannot move to a worker that falls idle, so long jobs are never
   queued (they would hold the end of a call back), and a worker never holds two
   calls' jobs (cancelling one call never kills another call's work), and no job is
   queued ahead of a pending job of a call that holds no worker (workers kept fed that
   way would not fall idle for it until this call ends; calls that each hold a worker
   keep queueing, or every batch of two concurrent calls would pay a round trip). Only
   a job whose request fits in the ``room`` of the worker's pipe is queued: writing it
   never waits for the worker, which reads its pipe only between batches (the pool
   writes under its lock, which the manager needs to read the reply the worker may be
   blocked sending).
3. A job with a timeout whose running task started more than ``timeout`` seconds ago
   has expired; its worker is killed by the pool.
4. A worker takes only jobs that fit its task budget (``max_tasks_per_child``; infinite
   otherwise); a live worker whose budget cannot take the next job (rule 1) is *spent*:
   the pool retires it and starts a replacement (see ``recycling``). The replacement
   takes work once the worker it replaces has finished its last jobs.
"""
from __future__ import annotations

from collections import deque
from itertools import takewhile
from math import inf
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterable, Protocol, Sequence

from .._delayed import Batch
from .._errors import call_repr
from .protocol import INITIALIZER, READ

__all__ = ["CallOwner", "PoolJob", "WorkerSlot", "Worker", "ProcessHandle", "Scheduler",
           "PREFETCH", "PREFETCH_MAX"]

#: jobs a worker may hold: the running one and the next, queued in its pipe
PREFETCH = 2
#: only a job expected to run shorter than this (seconds) is queued behind another: its
#: round trip (~0.3 ms) matters, and it cannot hold the end of a call back for long
PREFETCH_MAX = 0.01


def _ignore(outcome: Any) -> None:
    """The callback of a cancelled job."""


class CallOwner:
    """What a call's jobs have as their ``owner``: ``limit`` is the most workers that may
    hold its jobs at once, its ``n_jobs`` (rule 1)."""

    __slots__ = ("limit",)

    def __init__(self, limit: float = inf):
        self.limit = limit


class PoolJob:
    """One batch travelling through the pool."""

    __slots__ = ("owner", "batch", "payload", "callback", "timeout", "cancelled", "short",
                 "known_short", "resent")

    def __init__(self, owner: object, batch: Batch, payload: bytes,
                 callback: Callable[[Any], None], timeout: float | None):
        self.owner = owner
        self.batch = batch
        #: the request's bytes, kept until its worker has taken them from its pipe: it
        #: may die before, and another worker then gets them (``manager._reap``)
        self.payload: bytes | None = payload
        self.callback = callback
        self.timeout = timeout
        self.cancelled = False
        #: times it was sent again, as the first job of a worker that died before taking
        #: it (``MAX_RESENDS``)
        self.resent = 0
        expected = batch.expected
        #: may wait behind another job (unmeasured counts as short)
        self.short = expected is None or expected < PREFETCH_MAX
        #: another job may wait behind this one (measured short)
        self.known_short = expected is not None and expected < PREFETCH_MAX

    def cancel(self) -> None:
        """Its call is not listening any more: drop the callback, which holds the
        call's dispatcher (and so its input generator), at once, not when the manager
        gets to the killed worker."""
        self.cancelled = True
        self.callback = _ignore

    def describe(self, running: int | None = None) -> str:
        """The batch's tasks, for an error; ``running``: the index of the task its worker
        was running, where the worker published it (``track``)."""
        start, n = self.batch.start, len(self.batch)
        if n == 1:
            return f"task {start} ({call_repr(*self.batch.task(0))})"
        if running is not None and start <= running < start + n:
            return (f"task {running} ({call_repr(*self.batch.task(running - start))}) of "
                    f"the batch of tasks {start}..{start + n - 1}")
        return f"tasks {start}..{start + n - 1} (the first: {call_repr(*self.batch.task(0))})"


class WorkerSlot:
    """What the scheduler knows of a worker; the pool's worker record extends it."""

    __slots__ = ("jobs", "dead", "status", "budget", "after", "room", "sent", "finishing")

    def __init__(self, status: Sequence[float], budget: float = inf, room: float = inf):
        self.jobs: deque[PoolJob] = deque()  # sent, in the order the worker runs them
        self.dead = False
        #: requests written to its pipe (the jobs it holds are the last of them, in
        #: order); the worker counts those it took (status[READ])
        self.sent = 0
        #: (index of the running task, its start time or 0.0), written by the worker
        self.status = status
        #: how many more tasks it may be given (``max_tasks_per_child``)
        self.budget = budget
        #: the retired worker it replaces, while that one still runs its last jobs
        self.after: WorkerSlot | None = None
        #: bytes a queued request may take in its task pipe (see rule 2)
        self.room = room
        #: when the manager first saw it stopped with no job left: from then on it runs
        #: only its finalizer and exits (``manager.FINISH_LIMIT``); 0.0: not yet
        self.finishing = 0.0

    def ready(self) -> bool:
        """Live, and not waiting for the worker it replaces to finish (a replacement
        starts ahead, but never adds a worker: the pool runs ``size`` at a time)."""
        after = self.after
        if after is not None:
            if after.jobs:
                return False
            self.after = None  # done: drop it (a chain of predecessors would pile up)
        return not self.dead


class ProcessHandle(Protocol):
    """What the pool uses of a worker's process: a ``multiprocessing`` process, or a
    ``zygote.ZygoteChild``."""

    @property
    def pid(self) -> int | None: ...

    @property
    def sentinel(self) -> int: ...

    @property
    def exitcode(self) -> int | None: ...

    def join(self, timeout: float | None = None) -> None: ...

    def kill(self) -> None: ...


class Worker(WorkerSlot):
    """A worker process and its two pipe ends, as the pool holds it."""

    __slots__ = ("process", "task_conn", "result_conn", "wid")

    def __init__(self, process: ProcessHandle, task_conn: Connection, result_conn: Connection,
                 status: Any, wid: int, budget: float, room: float):
        super().__init__(status, budget, room)
        self.process = process
        self.task_conn = task_conn
        self.result_conn = result_conn
        self.wid = wid  # parmap.worker_id() in the worker

    def running(self) -> PoolJob | None:
        """The job the worker is running (or about to): the oldest it holds."""
        return self.jobs[0] if self.jobs else None

    def took_running(self) -> bool:
        """Whether the worker took its oldest job from its pipe (a dead worker's other
        jobs never ran: they were written after its last read)."""
        return bool(self.jobs) and self.status[READ] > self.sent - len(self.jobs)


class Scheduler:
    """The queue of jobs waiting for a worker, and the rules that place them."""

    def __init__(self) -> None:
        self.pending: deque[PoolJob] = deque()

    def add(self, job: PoolJob) -> None:
        self.pending.append(job)

    def requeue(self, jobs: Iterable[PoolJob]) -> None:
        """Jobs a dead worker held but never started go first."""
        self.pending.extendleft(reversed(list(jobs)))

    def drop(self, owner: object) -> None:
        """Forget the pending jobs of a cancelled call."""
        self.pending = deque(j for j in self.pending if j.owner is not owner)

    def clear(self) -> list[PoolJob]:
        jobs, self.pending = list(self.pending), deque()
        return jobs

    def next_assignment(self, workers: Sequence[WorkerSlot], size: int
                        ) -> tuple[WorkerSlot | None, PoolJob] | None:
        """The next ``(worker, job)`` to send, removed from the queue; ``worker`` is None
        when a new worker must be started for it; None when nothing can go now."""
        pending = self.pending
        if not pending:
            return None
        idle = next((w for w in workers if not w.jobs and w.ready()), None)
        if idle is not None or sum(not w.dead for w in workers) < size:
            job = self.next_job(workers)
            if job is not None:  # (a worker whose budget it exceeds is spent: rule 4)
                pending.remove(job)
                return idle, job
        # rule 2: queue a short job behind one of its own call, never ahead of a pending
        # job of a call that holds no worker: it waits for one to fall idle, and workers
        # fed this way would not until this call ends
        served = {id(w.jobs[0].owner) for w in workers if w.jobs and not w.dead}
        ahead = list(takewhile(lambda j: id(j.owner) in served, pending))
        for worker in workers if ahead else ():
            if worker.dead or not worker.jobs or len(worker.jobs) >= PREFETCH or \
                    not all(held.known_short for held in worker.jobs):
                continue
            owner, budget, room = worker.jobs[0].owner, worker.budget, worker.room
            job = next((j for j in ahead if j.owner is owner and j.short and len(
                j.batch) <= budget and len(j.payload or b"") <= room), None)
            if job is not None:
                pending.remove(job)
                return worker, job
        return None

    def next_job(self, workers: Sequence[WorkerSlot]) -> PoolJob | None:
        """The job that goes next: the first pending one whose call holds fewer workers
        than its limit (rule 1). A worker told to stop counts while it runs its last
        job (it is ``dead`` then), and a crashed one until its jobs are requeued."""
        holding: dict[int, int] = {}  # id(owner) -> workers holding its jobs
        for worker in workers:
            if worker.jobs:  # a worker holds one call's jobs only
                key = id(worker.jobs[0].owner)
                holding[key] = holding.get(key, 0) + 1
        return next((job for job in self.pending if holding.get(id(job.owner), 0)
                     < getattr(job.owner, "limit", inf)), None)

    def spent(self, workers: Iterable[WorkerSlot], fresh: float) -> list[WorkerSlot]:
        """Live workers whose budget cannot take the next job (rule 4). A
        worker with a ``fresh`` budget is never spent: a job larger than any budget
        (which the dispatcher does not make) goes to it rather than to endless
        replacements."""
        workers = list(workers)
        job = self.next_job(workers)
        if job is None:
            return []
        size = len(job.batch)
        return [w for w in workers if not w.dead and w.budget < min(size, fresh)]

    @staticmethod
    def tracks_deadlines(workers: Iterable[WorkerSlot]) -> bool:
        """Whether any job held by a worker has a timeout (the manager must poll)."""
        return any(j.timeout is not None for w in workers for j in w.jobs)

    @staticmethod
    def initializing(workers: Iterable[WorkerSlot]) -> list[WorkerSlot]:
        """The live workers still running the pool's initializer."""
        return [w for w in workers if not w.dead and w.status[0] == INITIALIZER
                and w.status[1]]

    @staticmethod
    def expired(workers: Iterable[WorkerSlot], now: float
                ) -> list[tuple[WorkerSlot, PoolJob, int]]:
        """``(worker, job, task index)`` for each running task past its job's timeout;
        for a worker whose initializer ran past the timeout of a job it holds, the index
        is ``protocol.INITIALIZER``.

        A worker told to stop still runs the jobs it holds (a retired worker's last ones)
        and is checked too; one that was killed holds only cancelled jobs."""
        found = []
        for worker in workers:
            started = worker.status[1]
            if not worker.jobs or not started:
                continue
            index = int(worker.status[0])
            job = next((j for j in worker.jobs if not j.cancelled and (  # (may be gone)
                j.batch.start <= index < j.batch.start + len(j.batch)
                or index == INITIALIZER and j.timeout is not None)), None)
            if job is None or job.timeout is None:
                continue
            if now - started > job.timeout:
                found.append((worker, job, index))
        return found
