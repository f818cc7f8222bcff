"""The scheduler's rules, without processes: fake worker slots and jobs."""
from __future__ import annotations

from parmap._delayed import Batch
from parmap.process.scheduler import PREFETCH_MAX, CallOwner, PoolJob, Scheduler, WorkerSlot


def job(owner, start=0, expected=None, timeout=None, n=1):
    batch = Batch(start, [(abs, (i,), {}) for i in range(n)])
    batch.expected = expected
    return PoolJob(owner, batch, b"payload", lambda outcome: None, timeout)


def slot(*jobs, dead=False, status=(-1.0, 0.0)):
    worker = WorkerSlot(list(status))
    worker.jobs.extend(jobs)
    worker.dead = dead
    return worker


def drain(scheduler, workers, size):
    placed = []
    while (found := scheduler.next_assignment(workers, size)) is not None:
        worker, queued = found
        if worker is None:
            worker = slot()
            workers.append(worker)
        worker.jobs.append(queued)
        placed.append((workers.index(worker), queued))
    return placed


def test_idle_workers_first_then_new_ones_up_to_the_size():
    scheduler, a, b, c = Scheduler(), job("A"), job("A", 1), job("A", 2)
    for j in (a, b, c):
        scheduler.add(j)
    workers = [slot(), slot(dead=True)]
    placed = drain(scheduler, workers, size=2)
    assert placed[0] == (0, a)  # the idle live worker
    assert placed[1] == (2, b)  # a new worker: only one live worker for a size of 2
    assert len(placed) == 2 and list(scheduler.pending) == [c]  # a and b: length unknown
    a.known_short = b.known_short = True  # measured: c (no estimate) may wait behind one
    assert drain(scheduler, workers, size=2)[0][1] is c
    assert not scheduler.pending


def test_nothing_waits_behind_a_job_of_unknown_length():
    # joblib's test_parallel_unordered_generator_returns_fastest_first: the first task
    # of a call may be the slow one; a quick task queued behind it would wait for it
    scheduler = Scheduler()
    scheduler.add(job("A", 1))
    workers = [slot(job("A", 0)), slot(job("A", 2, expected=PREFETCH_MAX / 10))]
    placed = drain(scheduler, workers, size=2)
    assert [(index, queued.batch.start) for index, queued in placed] == [(1, 1)]


def test_long_jobs_wait_for_a_free_worker_and_calls_never_share_a_worker():
    scheduler = Scheduler()
    long_job = job("A", expected=10 * PREFETCH_MAX)
    other_call = job("B")
    scheduler.add(long_job)
    scheduler.add(other_call)
    workers = [slot(job("A"))]
    assert drain(scheduler, workers, size=1) == []
    assert list(scheduler.pending) == [long_job, other_call]


def test_no_job_is_queued_ahead_of_a_call_that_holds_no_worker():
    # the workers of a call fed this way never fall idle: the other call would wait for
    # this one to end
    scheduler = Scheduler()
    other, ours = job("B", 0), job("A", 5, expected=PREFETCH_MAX / 10)
    scheduler.add(other)
    scheduler.add(ours)
    workers = [slot(job("A", 0, expected=PREFETCH_MAX / 10))]
    assert drain(scheduler, workers, size=1) == []
    workers[0].jobs.clear()  # its batch done: the worker takes the older job first
    assert scheduler.next_assignment(workers, 1) == (workers[0], other)


def test_calls_that_each_hold_a_worker_keep_queueing_behind_their_own_jobs():
    # two concurrent calls of short batches: without queueing, every batch of both
    # would wait a round trip (6 % of their time here)
    scheduler = Scheduler()
    other, ours = job("B", 1), job("A", 1, expected=PREFETCH_MAX / 10)
    scheduler.add(other)
    scheduler.add(ours)
    workers = [slot(job("A", 0, expected=PREFETCH_MAX / 10)),
               slot(job("B", 0, expected=PREFETCH_MAX / 10))]
    placed = drain(scheduler, workers, size=2)
    assert [(index, queued.owner) for index, queued in placed] == [(0, "A"), (1, "B")]


def test_a_worker_holds_at_most_two_jobs():
    scheduler = Scheduler()
    for i in range(3):
        scheduler.add(job("A", i))
    workers = [slot(job("A", 9, expected=PREFETCH_MAX / 10))]
    assert len(drain(scheduler, workers, size=1)) == 1
    assert len(scheduler.pending) == 2


def test_only_a_request_that_fits_in_the_pipe_waits_behind_a_running_job():
    # the worker reads its pipe only between batches: a queued request larger than its
    # pipe's room would make the pool's write (under its lock) wait for the worker
    scheduler = Scheduler()
    big = job("A", 1)
    big.payload = b"x" * 5000
    small = job("A", 2)
    scheduler.add(big)
    scheduler.add(small)
    busy = slot(job("A", 0, expected=PREFETCH_MAX / 10))
    busy.room = 4096
    placed = drain(scheduler, [busy], size=1)
    assert [queued for _, queued in placed] == [small]  # big waits for a free worker
    assert list(scheduler.pending) == [big]
    busy.jobs.clear()  # idle now: the worker is reading, so any size may go
    assert scheduler.next_assignment([busy], 1) == (busy, big)


def test_drop_forgets_one_calls_jobs_and_requeue_puts_jobs_first():
    scheduler = Scheduler()
    a, b = job("A"), job("B")
    scheduler.add(a)
    scheduler.add(b)
    scheduler.drop("A")
    assert list(scheduler.pending) == [b]
    again = [job("C", 0), job("C", 1)]
    scheduler.requeue(again)
    assert list(scheduler.pending) == again + [b]


def test_expired_names_the_running_task_past_its_timeout():
    late = job("A", start=10, n=3, timeout=1.0)
    on_time = job("A", start=20, n=1, timeout=5.0)
    untimed = job("A", start=30)
    workers = [slot(late, status=(11.0, 100.0)), slot(on_time, status=(20.0, 100.0)),
               slot(untimed, status=(30.0, 1.0)), slot(status=(0.0, 1.0))]
    assert Scheduler.expired(workers, now=102.0) == [(workers[0], late, 11)]
    assert Scheduler.tracks_deadlines(workers)
    assert not Scheduler.tracks_deadlines(workers[2:])



def test_a_spent_worker_is_one_whose_budget_cannot_take_the_next_job():
    scheduler = Scheduler()
    scheduler.add(job("A", n=5))
    fresh, spent, dead = WorkerSlot([0.0, 0.0], 10), WorkerSlot([0.0, 0.0], 4), \
        WorkerSlot([0.0, 0.0], 0)
    dead.dead = True
    assert scheduler.spent([fresh, spent, dead], fresh=10) == [spent]
    big = Scheduler()
    big.add(job("A", n=20))  # larger than a fresh budget: a fresh worker still takes it
    assert big.spent([fresh], fresh=10) == []
    assert big.next_assignment([fresh], 1)[0] is fresh


def test_a_replacement_waits_for_the_worker_it_replaces():
    scheduler, old, new = Scheduler(), slot(job("A"), dead=True), slot()
    new.after = old
    scheduler.add(job("A", 1))
    assert scheduler.next_assignment([old, new], 1) is None  # old still runs its last job
    old.jobs.clear()
    assert scheduler.next_assignment([old, new], 1)[0] is new and new.after is None


def test_a_call_holds_no_more_workers_than_its_n_jobs_in_a_larger_pool():
    # the shared pool is as large as the largest call running: a call of 2 beside one of
    # 6 ran 4 tasks at once on idle workers
    small, large = CallOwner(2), CallOwner(6)
    scheduler = Scheduler()
    for start in range(4):
        scheduler.add(job(small, start))
    scheduler.add(job(large, 10))
    workers = [slot(job(large, 0))] + [slot() for _ in range(3)]
    placed = drain(scheduler, workers, size=6)
    assert [(index, queued.batch.start) for index, queued in placed] == [
        (1, 0), (2, 1), (3, 10)]  # the next job that may go, goes
    assert [queued.batch.start for queued in scheduler.pending] == [2, 3]
    workers[1].jobs.clear()  # one of the small call's tasks ended
    assert [queued.batch.start for _, queued in drain(scheduler, workers, size=6)] == [2]


def test_a_retired_worker_running_its_last_job_counts_against_its_calls_limit():
    # told to stop (recycling), a worker is dead while it still runs its last job: not
    # counting it let a call of 2 run 4 tasks at once
    small = CallOwner(2)
    scheduler = Scheduler()
    scheduler.add(job(small, 2))
    workers = [slot(job(small, 0), dead=True), slot(job(small, 1)), slot()]
    assert scheduler.next_assignment(workers, size=4) is None


def test_a_worker_is_spent_by_the_job_it_would_get_not_by_the_first_pending_one():
    # the first pending job's call is at its limit: the next job is another call's
    # batch of 3, which a worker with 2 tasks left must not take (max_tasks_per_child)
    small, other = CallOwner(1), CallOwner(2)
    scheduler = Scheduler()
    scheduler.add(job(small, 5))
    scheduler.add(job(other, 0, n=3))
    low = WorkerSlot([0.0, 0.0], 2)
    workers = [slot(job(small, 4)), low]
    assert scheduler.spent(workers, fresh=3) == [low]
