"""The process backend under real faults: crashes, signals, timeouts, pickling failures.
The pool's life (reuse, resizing, start methods, concurrency): test_pool.py."""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import re
import signal
import threading
import time
import traceback

import pytest

import parmap
from parmap import (Parallel, RemoteTaskError, SerializationError, TaskTimeoutError,
                    WorkerCrashedError, delayed)
from parmap.backends.process import ProcessBackend
from parmap.process import protocol, registry

from .conftest import child_pids, recording
from .process_helpers import exit_on, healthy, identity


def raise_value_error(x):
    if x == 4:
        raise ValueError(f"no good: {x}")
    return x


def segfault_on(x, bad=3):
    if x == bad:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return x


def kill_self_on(x, bad=2):
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(a)
        self.lock = threading.Lock()  # makes it impossible to pickle


def raise_unpicklable(x):
    raise NeedsTwoArgs("cannot travel", 2)


# --------------------------------------------------------------------------- errors

def test_exception_keeps_type_worker_frames_and_note():
    with pytest.raises(ValueError, match="no good: 4") as info:
        Parallel(n_jobs=2)(delayed(raise_value_error)(i) for i in range(10))
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].name == "raise_value_error"
    assert frames[-1].filename == __file__
    assert "task 4: raise_value_error(4)" in "".join(info.value.__notes__)
    text = "".join(traceback.format_exception(info.value))
    assert 'raise ValueError(f"no good: {x}")' in text


def test_exception_that_cannot_travel_still_reports_type_message_traceback():
    with pytest.raises(RemoteTaskError) as info:
        Parallel(n_jobs=2)(delayed(raise_unpicklable)(i) for i in range(3))
    err = info.value
    assert err.exc_type.endswith("NeedsTwoArgs")
    # every task raises; whichever batch reports first names its task
    assert "cannot travel" in str(err) and re.search(r"task [012]\b", str(err))
    assert "raise_unpicklable" in err.remote_traceback
    assert "raise_unpicklable" in str(err.__cause__)
    healthy()


def test_unpicklable_argument_is_named():
    with pytest.raises(SerializationError,
                       match=r"argument 1 of task 0 \(pow\) could not be pickled"):
        Parallel(n_jobs=2)(delayed(pow)(2, threading.Lock()) for _ in range(3))
    healthy()


def test_unpicklable_keyword_argument_is_named():
    with pytest.raises(SerializationError, match=r"keyword argument 'key' of task 0"):
        Parallel(n_jobs=2)(delayed(sorted)([1], key=threading.Lock()) for _ in range(2))


def test_unpicklable_function_is_named():
    lock = threading.Lock()

    def uses_lock(x):
        with lock:
            return x

    with pytest.raises(SerializationError, match=r"the function of task 0 \(uses_lock\)"):
        Parallel(n_jobs=2)(delayed(uses_lock)(i) for i in range(3))


def test_unpicklable_result_is_named():
    def make_lock(x):
        return threading.Lock() if x == 3 else x

    with pytest.raises(SerializationError, match=r"result \(lock\) of task 3"):
        Parallel(n_jobs=2, batch_size=2)(delayed(make_lock)(i) for i in range(6))
    # caught where code written for loky (TypeError for a result) or pickle expects it
    with pytest.raises(TypeError, match=r"result \(lock\) of task 3"):
        Parallel(n_jobs=2)(delayed(make_lock)(i) for i in range(6))
    healthy()


def load_only_in(pid):
    """Unpickles in process ``pid`` only: elsewhere, as a module the worker lacks."""
    if os.getpid() != pid:
        raise ModuleNotFoundError("No module named 'only_here'")
    return LoadsOnlyHere(pid)


class LoadsOnlyHere:
    def __init__(self, pid):
        self.pid = pid

    def __reduce__(self):
        return load_only_in, (self.pid,)

    def __repr__(self):
        return "LoadsOnlyHere()"


def test_a_batch_the_worker_cannot_unpickle_is_named():
    with pytest.raises(SerializationError, match="could not be unpickled in the worker: "
                       "ModuleNotFoundError") as info:
        Parallel(n_jobs=2, batch_size=1)(
            delayed(identity)(x) for x in [1, LoadsOnlyHere(os.getpid()), 3])
    assert "parmap: raised for task 1 (identity(LoadsOnlyHere()))" in info.value.__notes__
    healthy()


# --------------------------------------------------------------------------- crashes

@pytest.mark.parametrize("func, expect", [
    (exit_on, r"exit code 7 while running tasks? 3"),
    (segfault_on, r"signal SIGSEGV \(exit code -11\)"),
    (kill_self_on, r"signal SIGKILL \(exit code -9\)"),
])
def test_worker_death_raises_promptly_and_pool_recovers(func, expect):
    t0 = time.monotonic()
    with pytest.raises(WorkerCrashedError, match=expect) as info:
        Parallel(n_jobs=2, batch_size=1)(delayed(func)(i) for i in range(8))
    assert time.monotonic() - t0 < 3.0
    assert info.value.task_indices and isinstance(info.value, parmap.TerminatedWorkerError)
    healthy()


def segfault_after_a_while(x, bad=100):
    time.sleep(0.003)  # measured: later batches hold ~15 tasks
    return segfault_on(x, bad)


def test_a_crash_in_a_batch_of_several_tasks_names_the_task():
    with pytest.raises(WorkerCrashedError) as info:
        Parallel(n_jobs=2)(delayed(segfault_after_a_while)(i) for i in range(400))
    indices = info.value.task_indices
    assert len(indices) > 1 and 100 in indices  # the batch's tasks: their results are lost
    assert (f"while running task 100 (segfault_after_a_while(100)) of the batch of tasks "
            f"{indices[0]}..{indices[-1]}") in str(info.value)
    healthy()


def test_worker_killed_from_outside():
    gen = Parallel(n_jobs=2, batch_size=1, return_as="generator")(
        delayed(sleep_for)(s) for s in [0.01] + [30] * 4)
    assert next(gen) == 0.01
    victims = child_pids()
    assert victims
    os.kill(min(victims), signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerCrashedError, match="SIGKILL"):
        next(gen)
    assert time.monotonic() - t0 < 1.5
    healthy()


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_workers_that_died_idle_cost_the_next_call_nothing(method):
    """Workers killed between two calls, before the pool noticed: the next call's
    batches went to them. The workers never took them, so they run elsewhere, rather
    than fail the call as a crash of a task that never started."""
    for _ in range(5):
        pids = set(Parallel(n_jobs=2, start_method=method)(
            delayed(os.getpid)() for _ in range(8)))
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert Parallel(n_jobs=2, start_method=method)(
            delayed(abs)(-x) for x in range(8)) == list(range(8))
    healthy()


def exit_at_start():
    os._exit(3)


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_workers_that_die_before_reading_anything_fail_the_call(method):
    """A worker that dies before it takes its first batch (here its initializer exits)
    leaves the batch unread: it goes to another worker, a few times at most, and then
    the call fails with the crash, rather than starting workers forever."""
    t0 = time.monotonic()
    with pytest.raises(WorkerCrashedError, match=r"died before they took a task, 3 in a row "
                       r"\(the last, pid \d+, with exit code 3\), so tasks? \d.* never ran\. "
                       r"Most likely they die as they start: in the initializer"):
        Parallel(n_jobs=2, initializer=exit_at_start, start_method=method)(
            delayed(abs)(-x) for x in range(4))
    assert time.monotonic() - t0 < 10
    healthy()


def limit_memory_and_count(path):
    """Initializer: note this worker's start, and leave it ~150 MB of address space more."""
    import resource

    with open(path, "a") as f:
        f.write("x")
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[0])
    room = pages * os.sysconf("SC_PAGE_SIZE") + 150 * 1024 ** 2
    resource.setrlimit(resource.RLIMIT_AS, (room, resource.RLIM_INFINITY))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc")
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_worker_that_dies_taking_a_request_is_blamed_at_once(tmp_path, method):
    """A request larger than the pipe is counted as taken when it starts to arrive: the
    worker that cannot hold it (MemoryError while reading) is blamed, and no other
    worker is started to try it again."""
    starts = tmp_path / "starts"
    blob = b"x" * (300 * 1024 ** 2)
    with pytest.raises(WorkerCrashedError, match="while running task"):
        Parallel(n_jobs=2, start_method=method, initializer=limit_memory_and_count,
                 initargs=(str(starts),))(delayed(len)(b) for b in [blob, b"y"])
    assert starts.read_text() == "xx"  # the two first workers only
    healthy()


# --------------------------------------------------------------------------- timeout

def test_timeout_kills_stuck_worker_and_pool_recovers():
    t0 = time.monotonic()
    with pytest.raises(TaskTimeoutError, match=r"task 2 \(sleep_for\(30\)\).*timeout=0.3") as info:
        Parallel(n_jobs=2, timeout=0.3)(delayed(sleep_for)(s) for s in [0, 0, 30, 0])
    assert 0.3 <= time.monotonic() - t0 < 1.5
    # what joblib raises and its users catch, and the builtin, all at once
    assert isinstance(info.value, (multiprocessing.TimeoutError))
    assert isinstance(info.value, TimeoutError)
    healthy()


def test_leaving_a_managed_block_cancels_the_tasks_its_generator_started():
    t0 = time.monotonic()
    with Parallel(n_jobs=2, return_as="generator") as parallel:
        gen = parallel(delayed(sleep_for)(10) for _ in range(10))
    assert Parallel(n_jobs=2)(delayed(identity)(i) for i in range(4)) == [0, 1, 2, 3]
    assert time.monotonic() - t0 < 1.0  # the sleeps were cancelled with the block
    del gen


def test_timeout_fires_when_one_batch_goes_to_a_warm_pool():
    healthy()  # the workers exist: only the new batch itself can wake the manager
    t0 = time.monotonic()
    with pytest.raises(TaskTimeoutError, match=r"task 2 \(sleep_for\(30\)\)"):
        Parallel(n_jobs=2, timeout=0.3, batch_size=4)(
            delayed(sleep_for)(s) for s in [0, 0, 30, 0])
    assert time.monotonic() - t0 < 1.5
    healthy()


def test_a_first_batch_sized_from_history_still_shares_the_tasks():
    from parmap import _batching

    per_task = ProcessBackend.target_batch_duration / 4  # history says: 4 tasks fill a batch
    _batching.remember(sleep_for, per_task)
    backend = recording(ProcessBackend)()
    assert Parallel(n_jobs=2, backend=backend)(delayed(sleep_for)(0) for _ in range(4)) == \
        [0] * 4
    assert backend.sizes == [2, 2]


def hang_at_start():
    time.sleep(60)


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_timeout_covers_a_hung_initializer(method):
    """The initializer gets the call's timeout too, counted from its own start (not the
    process's, whose cold start is no fault of the user's): one that hangs fails the
    call, naming the task that waited on it."""
    t0 = time.monotonic()
    with pytest.raises(TaskTimeoutError, match=r"the pool's initializer has run for more than "
                       r"timeout=0.5s in a worker \(pid \d+\), so task \d \(abs\(-?\d\)\) could "
                       r"not start; its worker was stopped and the call cancelled"):
        Parallel(n_jobs=2, timeout=0.5, initializer=hang_at_start, start_method=method)(
            delayed(abs)(-x) for x in range(4))
    assert time.monotonic() - t0 < 10
    healthy()


def test_workers_still_in_their_initializer_go_with_the_call():
    """The other workers still in the initializer (holding no job of the call) are
    stopped too: kept, they would take the next call's jobs and hold them."""
    with pytest.raises(TaskTimeoutError, match="initializer"):
        Parallel(n_jobs=3, timeout=0.5, initializer=hang_at_start)(
            delayed(abs)(-x) for x in range(1))
    failed = time.monotonic()
    pool = registry._shared[0]
    # (one that starts its initializer from now on is not one of them)
    stuck = [w for w in pool.workers if not w.dead and w.status[0] == protocol.INITIALIZER
             and 0 < w.status[1] < failed]
    assert stuck == []
    healthy()


def test_a_slow_initializer_within_the_timeout_is_not_cut():
    assert Parallel(n_jobs=2, timeout=2, initializer=time.sleep, initargs=(0.3,))(
        delayed(abs)(-x) for x in range(4)) == [0, 1, 2, 3]
    healthy()


def test_timeout_allows_tasks_within_it():
    assert Parallel(n_jobs=2, timeout=5)(delayed(sleep_for)(0.01) for _ in range(6)) == \
        [0.01] * 6
