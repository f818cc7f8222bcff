"""Long runs: worker recycling (max_tasks_per_child, max_memory_per_child), per-worker
state and ids, the finalizer, and how a SIGKILLed worker is reported."""
from __future__ import annotations

import errno
import functools
import multiprocessing
import os
import re
import signal
import threading
import time
import warnings
from collections import Counter, defaultdict

import psutil
import pytest

import parmap
from parmap import Parallel, TaskTimeoutError, WorkerCrashedError, delayed, parallel_config
from parmap._batching import fit_to_limit
from parmap.process import pool as pool_module
from parmap.process import registry
from parmap.process import zygote as zygote_module
from parmap.process.recycling import RssProbe

from .conftest import child_pids, run_script


def counted(i, marks):
    """Leaves a file per task (creating it twice fails: a repeated task shows) and says
    where it ran and how many tasks its worker has run."""
    os.close(os.open(os.path.join(marks, str(i)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    state = parmap.worker_state()
    state["n"] = state.get("n", 0) + 1
    state.setdefault("pid", os.getpid())
    return i, os.getpid(), parmap.worker_id(), state["n"], state["pid"], "caller" in state


def check_recycled(results, n_tasks, limit, marks):
    assert [r[0] for r in results] == list(range(n_tasks))  # order kept, none lost
    assert sorted(map(int, os.listdir(marks))) == list(range(n_tasks))  # each ran once
    per_pid = Counter(r[1] for r in results)
    assert max(per_pid.values()) <= limit
    assert len(per_pid) >= n_tasks / limit
    assert all(r[3] <= limit for r in results)  # the worker's own count
    assert all(r[4] == r[1] and not r[5] for r in results)  # its state is its own
    ids = defaultdict(set)
    for r in results:
        ids[r[1]].add(r[2])
    assert all(len(found) == 1 for found in ids.values())  # an id for a worker's life
    assert set().union(*ids.values()) <= {0, 1}
    counts = defaultdict(list)
    for r in results:
        counts[r[1]].append(r[3])
    assert all(c == list(range(1, len(c) + 1)) for c in counts.values())  # state persists


@pytest.mark.parametrize("batch_size", ["auto", 3, 8])
def test_max_tasks_per_child_replaces_workers_without_losing_or_repeating_a_task(
        tmp_path, batch_size):
    parmap.worker_state()["caller"] = True  # a forked worker must not see the caller's
    try:
        results = Parallel(n_jobs=2, max_tasks_per_child=5, batch_size=batch_size)(
            delayed(counted)(i, str(tmp_path)) for i in range(60))
    finally:
        del parmap.worker_state()["caller"]
    check_recycled(results, 60, 5, str(tmp_path))


def test_max_tasks_per_child_through_parallel_config(tmp_path):
    with parallel_config(max_tasks_per_child=3):
        results = Parallel(n_jobs=2, return_as="generator")(
            delayed(counted)(i, str(tmp_path)) for i in range(30))
        results = list(results)
    check_recycled(results, 30, 3, str(tmp_path))


def test_batches_fit_the_task_limit():
    assert [fit_to_limit(s, 100) for s in (1, 30, 40, 49, 50, 51, 100, 500)] == \
        [1, 33, 50, 50, 50, 50, 100, 100]
    assert [fit_to_limit(s, 100, 50) for s in (20, 25, 33, 70, 100, 101)] == \
        [20, 50, 50, 50, 50, 100]


@pytest.mark.parametrize("kwargs, error, name", [
    ({"max_tasks_per_child": 0}, ValueError, "max_tasks_per_child"),
    ({"max_tasks_per_child": 2.5}, ValueError, "max_tasks_per_child"),
    ({"max_memory_per_child": "lots"}, ValueError, "max_memory_per_child"),
    ({"max_memory_per_child": 0}, ValueError, "max_memory_per_child"),
    ({"finalizer": "print"}, TypeError, "finalizer"),
])
def test_bad_recycling_arguments_are_named(kwargs, error, name):
    with pytest.raises(error, match=name):
        Parallel(n_jobs=2, **kwargs)


def test_the_threading_backend_does_not_take_recycling_arguments():
    with pytest.raises(TypeError, match="max_tasks_per_child"):
        Parallel(n_jobs=2, backend="threading", max_tasks_per_child=3)


def recycling_inside(i):
    # what library code run as a task may do: nested calls run on threads, which take
    # no recycling argument, and must still run
    with parallel_config(max_tasks_per_child=2):
        first = Parallel(n_jobs=2)(delayed(abs)(-j) for j in range(4))
    return first + Parallel(n_jobs=2, max_tasks_per_child=2)(delayed(abs)(-j) for j in range(4))


def test_recycling_arguments_of_a_nested_call_are_dropped_on_its_threads():
    assert Parallel(n_jobs=2)(delayed(recycling_inside)(i) for i in range(2)) == \
        [[0, 1, 2, 3] * 2] * 2


# ---------------------------------------------------------------------- state and ids

def where(i):
    state = parmap.worker_state()
    state.setdefault("tasks", []).append(i)
    return os.getpid(), parmap.worker_id(), len(state["tasks"])


def test_worker_state_persists_per_worker_across_calls():
    with Parallel(n_jobs=2, batch_size=1) as parallel:
        first = parallel(delayed(where)(i) for i in range(10))
        second = parallel(delayed(where)(i) for i in range(10))
    seen: dict[int, list[int]] = defaultdict(list)
    for pid, wid, n in first + second:
        seen[pid].append(n)
    assert all(n == list(range(1, len(n) + 1)) for n in seen.values())
    by_pid = {pid: wid for pid, wid, _ in first + second}
    assert len(set(by_pid.values())) == len(by_pid)  # workers have distinct ids
    assert set(by_pid.values()) <= {0, 1}


def test_outside_a_worker_state_and_id_are_the_callers():
    state = parmap.worker_state()
    assert parmap.worker_state() is state and parmap.worker_id() == 0
    state.pop("tasks", None)
    assert Parallel(n_jobs=1)(delayed(where)(i) for i in range(3)) == \
        [(os.getpid(), 0, 1), (os.getpid(), 0, 2), (os.getpid(), 0, 3)]
    assert state.pop("tasks") == [0, 1, 2]


def met(barrier, i):
    barrier.wait(timeout=10)  # both threads hold a task: each runs one
    state = parmap.worker_state()
    state["n"] = state.get("n", 0) + 1
    return threading.get_ident(), parmap.worker_id(), id(state), state["n"]


def test_threads_have_their_own_state_and_ids():
    barrier = threading.Barrier(2)
    with Parallel(n_jobs=2, backend="threading", batch_size=1) as parallel:
        first = parallel(delayed(met)(barrier, i) for i in range(2))
        second = parallel(delayed(met)(barrier, i) for i in range(2))
    assert {r[1] for r in first} == {0, 1}
    assert len({r[2] for r in first}) == 2  # a dict per thread
    assert {r[3] for r in second} == {2}  # kept between calls of the block
    assert {(r[0], r[1], r[2]) for r in first} == {(r[0], r[1], r[2]) for r in second}


# ---------------------------------------------------------------------- finalizer

def note_exit(path):
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {parmap.worker_id()} {parmap.worker_state().get('n', 0)}\n")


def count_task(i):
    state = parmap.worker_state()
    state["n"] = state.get("n", 0) + 1
    return os.getpid()


def test_finalizer_runs_as_each_worker_exits(tmp_path):
    path = str(tmp_path / "exits.txt")
    pids = Parallel(n_jobs=2, max_tasks_per_child=2, batch_size=1,
                    finalizer=functools.partial(note_exit, path))(
        delayed(count_task)(i) for i in range(10))
    parmap._shutdown_pools()  # the last workers stop (normally) here
    with open(path) as f:
        lines = [line.split() for line in f]
    assert sorted(int(pid) for pid, _, _ in lines) == sorted(set(pids) | {
        int(pid) for pid, _, n in lines if n == "0"})  # replacements that got no task
    ran = Counter(pids)
    assert all(ran[int(pid)] == int(n) for pid, _, n in lines)  # saw the worker's state
    assert {wid for _, wid, _ in lines} <= {"0", "1"}


def slow_note_exit(path):
    time.sleep(0.3)  # still in its finalizer when the pool shuts down
    note_exit(path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", [None, "spawn", "fork"])
def test_shutdown_lets_retired_workers_finish_their_finalizer(tmp_path, start_method):
    # the last tasks run on replacements, which the pool's launcher thread started; it
    # ends at close, and a worker must not get its death signal (with spawn and fork)
    path = str(tmp_path / "exits.txt")
    pids = Parallel(n_jobs=2, max_tasks_per_child=1, batch_size=1, start_method=start_method,
                    finalizer=functools.partial(slow_note_exit, path))(
        delayed(count_task)(i) for i in range(4))
    parmap._shutdown_pools()  # the last workers are retired and in their finalizers now
    with open(path) as f:
        noted = {int(line.split()[0]) for line in f}
    assert set(pids) <= noted  # none was killed on its way out


# ---------------------------------------------------------------------- memory

_hoard: list = []


def leak(i, mb=50):
    _hoard.append(b"x" * (mb << 20))  # bytes, written: resident at once
    return os.getpid()


LARGE_RESULTS_OF_SHORT_LIVED_WORKERS = """
import os
import numpy as np
from parmap import Parallel, delayed

def full(i):
    return np.full(300_000, i, dtype=float)  # 2.4 MB: through /dev/shm above max_nbytes

def ours():  # other programs on the machine come and go in /dev/shm too
    return {name for name in os.listdir("/dev/shm") if "parmap" in name}

before = ours()
results = Parallel(n_jobs=2, batch_size=1, max_tasks_per_child=1, max_nbytes="1M")(
    delayed(full)(i) for i in range(20))
print([float(r[0]) for r in results] == list(map(float, range(20))))
import parmap; parmap._shutdown_pools()
print(sorted(ours() - before))
"""


@pytest.mark.timeout(60)
def test_large_results_of_a_worker_that_exits_right_after_arrive():
    # each worker runs one task, replies with its result in a /dev/shm file, and exits:
    # the sweep of a dead worker's files must not take a file it handed over (in a fresh
    # interpreter, where the first workers are forked and quick to exit)
    arrived, left = run_script(LARGE_RESULTS_OF_SHORT_LIVED_WORKERS, timeout=50).splitlines()
    assert arrived == "True"
    assert left == "[]"


def sleep_long_on(i, slow):
    time.sleep(20 if i == slow else 0.01)
    return i


def test_a_timeout_applies_to_the_last_batch_of_a_retiring_worker():
    # with one task per worker, every batch is its worker's last: the worker is retired
    # (told to stop) as it gets the batch, and its task's deadline must still count
    t0 = time.monotonic()
    with pytest.raises(TaskTimeoutError):
        Parallel(n_jobs=2, batch_size=1, max_tasks_per_child=1, timeout=1)(
            delayed(sleep_long_on)(i, 5) for i in range(10))
    assert time.monotonic() - t0 < 15


def tree_pss() -> int:
    total = 0
    for pid in {os.getpid()} | child_pids():
        try:
            total += psutil.Process(pid).memory_full_info().pss
        except (psutil.Error, OSError):
            pass  # exited meanwhile
    return total


def test_max_memory_per_child_keeps_a_leaking_loop_bounded():
    peak = [tree_pss()]
    done = threading.Event()

    def sample():
        while not done.wait(0.02):  # a sampling period, not synchronisation
            peak.append(tree_pss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pids = Parallel(n_jobs=2, batch_size=1, max_memory_per_child="300M")(
                delayed(leak)(i) for i in range(100))  # 5 GB leaked in all
    finally:
        done.set()
        sampler.join()
    grew = max(peak) - peak[0]  # over the caller alone (large in a full test session)
    assert grew < 1024 ** 3, f"the tree grew by up to {grew / 1024 ** 2:.0f} MB"
    replaced = len(set(pids)) - 2
    assert replaced >= 100 * 50 // 300 - 2  # a worker holds at most ~6-7 leaks
    memory_warnings = [w for w in caught if "max_memory_per_child" in str(w.message)]
    assert len(memory_warnings) == 1
    message = str(memory_warnings[0].message)
    match = re.search(r"replaced (once|(\d+) times)", message)
    assert match and int(match.group(2) or 1) >= replaced, message
    assert "300.0 MB" in message and "leak" in message


def test_the_rss_probe_falls_back_to_the_peak_where_statm_is_not_read():
    probe = RssProbe()
    now = probe()
    assert now > 0
    os.close(probe.fd)
    probe.fd = None  # as on a system without /proc/self/statm (or after it failed)
    # getrusage's peak: about what was resident then at least (the kernel's RSS counts
    # lag a little: 34.6 MB of peak against 34.98 MB resident was seen)
    assert probe() >= now / 2


# ---------------------------------------------------------------------- SIGKILL

def hog_then_die(i):
    state = parmap.worker_state()
    if "hog" not in state:
        state["hog"] = b"x" * (120 << 20)
        return i
    os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does


def test_a_sigkilled_worker_is_reported_as_a_likely_oom_kill_with_its_last_rss():
    with pytest.raises(WorkerCrashedError) as info:
        Parallel(n_jobs=2, batch_size=1)(delayed(hog_then_die)(i) for i in range(8))
    message = str(info.value)
    assert "killed by SIGKILL" in message and "out-of-memory killer" in message
    rss = re.search(r"RSS\) when it last reported, after its previous batch, was "
                    r"([\d.]+) ([MG])B", message)  # GB: forked from a large test process
    assert rss and float(rss.group(1)) * (1024 if rss.group(2) == "G" else 1) >= 120, message
    assert "max_memory_per_child" in message
    assert info.value.exitcode == -signal.SIGKILL


# ---------------------------------------------------------------------- start cost

RECYCLED_WORKERS_FIND_CLOUDPICKLE = """
import os, sys, tempfile
from parmap import Parallel, delayed

with tempfile.TemporaryDirectory() as folder:
    with open(os.path.join(folder, "probe.py"), "w") as f:  # a function sent by reference
        f.write("import os, sys\\ndef probe(i):\\n"
                "    return 'cloudpickle' in sys.modules, os.getpid()\\n")
    sys.path.insert(0, folder)
    from probe import probe

    seen = Parallel(n_jobs=2, batch_size=1, max_tasks_per_child=2, start_method="forkserver")(
        delayed(probe)(i) for i in range(8))
print(all(loaded for loaded, _ in seen), len({pid for _, pid in seen}))
"""


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(),
                    reason="needs forkserver")
@pytest.mark.timeout(60)
def test_recycled_workers_come_with_cloudpickle_imported():
    # a replacement must not import cloudpickle itself (~25 ms each): the forkserver of a
    # recycling pool preloads it. The probe travels by reference, so nothing else would
    # import cloudpickle in the worker before it runs.
    loaded, workers = run_script(RECYCLED_WORKERS_FIND_CLOUDPICKLE, timeout=50).split()
    assert loaded == "True"
    assert int(workers) >= 4  # workers were replaced


def short(i):
    time.sleep(0.005)
    return i


def test_a_replacement_that_cannot_start_does_not_stop_the_pool(monkeypatch):
    # out of processes or descriptors for a moment (a pids limit: EAGAIN): the launcher
    # thread died, and every later retirement waited for it, so the next call hung
    left = {"zygote": 1, "fallback": 1}

    def failing_once(kind, start):
        def start_or_fail(*args, **kwargs):
            if threading.current_thread().name == "parmap-pool-launcher" and left[kind]:
                left[kind] -= 1
                raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
            return start(*args, **kwargs)
        return start_or_fail

    monkeypatch.setattr(zygote_module.Zygote, "start_worker",
                        failing_once("zygote", zygote_module.Zygote.start_worker))
    monkeypatch.setattr(pool_module, "start_worker",
                        failing_once("fallback", pool_module.start_worker))
    for _ in range(2):
        assert Parallel(n_jobs=2, max_tasks_per_child=2, batch_size=1)(
            delayed(short)(i) for i in range(30)) == list(range(30))
    assert left == {"zygote": 0, "fallback": 0}  # both failures happened


def test_a_worker_the_system_will_not_start_fails_the_call_saying_so(monkeypatch):
    def no_start(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    Parallel(n_jobs=2)(delayed(abs)(i) for i in range(2))
    registry.shutdown_all()  # the next call starts new workers
    monkeypatch.setattr(pool_module, "start_worker", no_start)
    with pytest.raises(parmap.PoolError, match=r"could not start a worker process \(OSError: "
                       r"\[Errno 24\] Too many open files\).*ulimit -n"):
        Parallel(n_jobs=2)(delayed(abs)(i) for i in range(4))


def long_or_exit(kind):
    if kind == "exit":
        time.sleep(0.2)
        os._exit(1)
    time.sleep(2 if kind == "long" else 0)
    return kind


@pytest.mark.timeout(30)
def test_a_batch_still_running_gets_the_failure_of_its_pool(monkeypatch):
    # a worker dies and its replacement cannot start: the pool fails, and the batch on
    # the other worker must fail with it (it waited forever once: its callback had been
    # dropped as the pool closed)
    def no_start(*args, **kwargs):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    registry.shutdown_all()
    Parallel(n_jobs=2)(delayed(abs)(i) for i in range(4))  # two workers, warm
    monkeypatch.setattr(pool_module, "start_worker", no_start)
    with pytest.raises(parmap.PoolError, match="could not start a worker process"):
        Parallel(n_jobs=2, batch_size=1)(delayed(long_or_exit)(kind)
                                         for kind in ["long", "exit", "quick"])


HUNG_FINALIZER = """
import re, time, warnings
import parmap.process.manager as manager
from parmap import Parallel, delayed
manager.FINISH_LIMIT = 0.5
def hang():
    time.sleep(600)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    # {how}: the workers are told to stop, and their finalizer never returns
    print(Parallel(n_jobs=2, finalizer=hang, idle_timeout=0.3, {extra})(
        delayed(abs)(-i) for i in range(4)))
    deadline = time.monotonic() + 15
    while len(caught) < 2 and time.monotonic() < deadline:  # both workers killed
        time.sleep(0.05)
print(len(caught))
print(sorted({{re.sub(r"pid [0-9]+", "pid N", str(w.message)) for w in caught}}))
"""


@pytest.mark.parametrize("how, extra", [("the pool idles out", "start_method='fork'"),
                                        ("they are recycled", "max_tasks_per_child=1")])
def test_a_finalizer_that_hangs_is_ended_with_a_warning(how, extra):
    # an idled-out pool's workers kept the interpreter from exiting (it waited for them);
    # recycled ones piled up, each stuck in its finalizer
    t0 = time.monotonic()
    results, count, messages = run_script(HUNG_FINALIZER.format(how=how, extra=extra),
                                           timeout=40).splitlines()
    assert results == "[0, 1, 2, 3]" and int(count) >= 2
    assert messages == str([
        "parmap: a worker process (pid N) had not exited 0.5 s after it was told to stop, "
        "so it was killed: its finalizer, or a non-daemon thread one of its tasks started, "
        "did not end. A finalizer must return within 0.5 s."])
    assert time.monotonic() - t0 < 20  # and the interpreter exited


def leak_then_fail(i):
    if i == 8:
        raise ValueError("task 8 fails")
    return leak(i)


def test_the_memory_warning_of_a_failing_call_is_not_lost():
    # the failing call let go of the pool before its end read the warning: it was lost,
    # and its record stayed in the pool for good
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="task 8 fails"):
            Parallel(n_jobs=2, batch_size=1, max_memory_per_child="80M")(
                delayed(leak_then_fail)(i) for i in range(12))
    assert [w for w in caught if "max_memory_per_child=80.0 MB" in str(w.message)]
    assert all(not pool.recycler.memory for pool in registry._shared)
