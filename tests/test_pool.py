"""The process backend's pool: reuse across calls, resizing, idle exit, initializers,
start methods, concurrent calls, and what travels to the workers."""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from parmap import Parallel, WorkerCrashedError, delayed
from parmap.process import registry
from parmap.process.manager import _Waiter
from parmap.process.protocol import task_pipe_room

from .conftest import child_pids, run_script, shm_entries
from .process_helpers import exit_on, healthy, identity, pid_of


# --------------------------------------------------------------------------- pool

def test_workers_are_reused_across_calls_and_instances():
    first = set(Parallel(n_jobs=2, batch_size=1)(delayed(pid_of)(i) for i in range(20)))
    second = set(Parallel(n_jobs=2, batch_size=1)(delayed(pid_of)(i) for i in range(20)))
    assert first | second <= child_pids()
    assert len(child_pids()) == 2


def test_pool_resizes_with_n_jobs():
    Parallel(n_jobs=2)(delayed(identity)(i) for i in range(4))
    assert len(child_pids()) == 2
    Parallel(n_jobs=3)(delayed(identity)(i) for i in range(4))
    assert len(child_pids()) == 3
    Parallel(n_jobs=1, backend="processes")  # one worker means inline: no change
    Parallel(n_jobs=2)(delayed(identity)(i) for i in range(4))
    deadline = time.monotonic() + 5
    while len(child_pids()) != 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # the stopped worker is reaped by the manager thread
    assert len(child_pids()) == 2


def test_idle_workers_exit_after_idle_timeout():
    Parallel(n_jobs=2, idle_timeout=0.3)(delayed(identity)(i) for i in range(4))
    assert child_pids()
    deadline = time.monotonic() + 5
    while child_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not child_pids()
    healthy()  # and a new pool starts on demand


@pytest.mark.parametrize("idle", [float("inf"), 1e7])
def test_a_pool_with_an_endless_idle_timeout_stays(monkeypatch, idle):
    # the manager's wait had no end to compute (inf), or one longer than poll() takes
    # (1e7 s, ~4 months): it crashed (OverflowError in select)
    errors = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    Parallel(n_jobs=2, idle_timeout=idle)(delayed(pid_of)(i) for i in range(4))
    workers = set(child_pids())
    time.sleep(0.3)  # the manager waits, idle, now
    second = Parallel(n_jobs=2, idle_timeout=idle)(delayed(pid_of)(i) for i in range(4))
    # the same workers, reused (which of them ran which batch is a race)
    assert len(workers) == 2 and set(second) <= workers and set(child_pids()) == workers
    assert not errors


@pytest.mark.timeout(60)
def test_large_requests_and_replies_of_quick_tasks_never_deadlock():
    # quick tasks (their batches may wait in a busy worker's pipe) whose requests and
    # replies are larger than a pipe holds: a request queued behind a running batch
    # would make the pool's write, under its lock, wait for a worker that reads its pipe
    # only between batches, while that worker waits for the pool to read its reply
    blob = b"x" * 400_000  # a pipe holds 64 KB (Linux's default)
    out = Parallel(n_jobs=2, batch_size=1)(
        delayed(identity)(blob) for _ in range(80))
    assert len(out) == 80 and all(item == blob for item in out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="F_GETPIPE_SZ is Linux's")
def test_a_task_pipes_room_leaves_a_page_for_a_stop():
    import fcntl

    r, w = os.pipe()
    conn = multiprocessing.connection.Connection(w, readable=False)  # closes w
    try:
        capacity = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        room = task_pipe_room(w)
        assert room == capacity - os.sysconf("SC_PAGE_SIZE") - 8
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == capacity  # its size is left alone
        os.set_blocking(w, False)  # a request that fills the room, then a STOP: no wait
        conn.send_bytes(b"x" * room)
        conn.send_bytes(b"")
    finally:
        os.close(r)
        conn.close()


def test_elsewhere_a_task_pipes_room_is_what_posix_guarantees(monkeypatch):
    # macOS and FreeBSD count bytes but may give a new pipe a page or less; a request
    # and a STOP behind it must fit in PIPE_BUF (512), header included
    monkeypatch.setattr(sys, "platform", "darwin")
    r, w = os.pipe()
    try:
        assert task_pipe_room(w) + 4 + 4 <= 512
    finally:
        os.close(r)
        os.close(w)


def doubled(data):
    return data + data


@pytest.mark.timeout(60)
def test_a_stop_behind_a_queued_request_never_deadlocks():
    # max_tasks_per_child=2: a worker's second job may wait in its pipe, and the STOP
    # that retires the worker goes right behind it, while the worker may be blocked
    # sending a reply larger than a pipe; requests around the room's size
    r, w = os.pipe()
    room = task_pipe_room(w)
    os.close(r)
    os.close(w)
    for size in range(room - 6000, room + 1, 1500):
        blobs = [bytes([i]) * size for i in range(24)]
        out = Parallel(n_jobs=2, batch_size=1, max_tasks_per_child=2)(
            delayed(doubled)(blob) for blob in blobs)
        assert out == [blob + blob for blob in blobs]


def test_the_managers_wait_sees_a_new_pipe_on_a_reused_descriptor():
    # the manager keeps one poll object while it waits on the same objects; a worker's
    # replacement may get the very descriptor numbers its predecessor's pipe had
    waiter = _Waiter()
    old_r, old_w = multiprocessing.Pipe(duplex=False)
    old_w.send_bytes(b"x")
    assert waiter.wait([old_r], 1.0) == [old_r]
    old_r.close()
    old_w.close()
    new_r, new_w = multiprocessing.Pipe(duplex=False)  # the lowest free numbers: the same
    new_w.send_bytes(b"y")
    assert waiter.wait([new_r], 1.0) == [new_r]
    assert new_r.recv_bytes() == b"y"
    started = time.monotonic()
    assert waiter.wait([new_r], 0.05) == []  # nothing to read: the timeout ends it
    assert time.monotonic() - started >= 0.04
    new_w.close()  # a closed end counts as ready, as with multiprocessing's wait
    assert waiter.wait([new_r], 1.0) == [new_r]
    # a wait longer than poll()'s int of milliseconds (idle_timeout=1e7) was an
    # OverflowError, which ended the manager
    assert waiter.wait([new_r], 1e7) == [new_r]
    new_r.close()


def initialize(value):
    os.environ["PARMAP_TEST_INIT"] = str(int(os.environ.get("PARMAP_TEST_INIT", "0")) + value)


def read_init(_):
    return os.getpid(), os.environ.get("PARMAP_TEST_INIT")


def test_initializer_runs_once_per_worker():
    out = Parallel(n_jobs=2, batch_size=1, initializer=initialize, initargs=(1,))(
        delayed(read_init)(i) for i in range(20))
    assert {value for _, value in out} == {"1"}


def failing_initializer():
    raise RuntimeError("initializer broke")


def test_initializer_error_reaches_caller():
    with pytest.raises(RuntimeError, match="initializer broke"):
        Parallel(n_jobs=2, initializer=failing_initializer)(
            delayed(identity)(i) for i in range(4))


def nested(x):
    inner = Parallel(n_jobs=2)(delayed(pid_of)(i) for i in range(4))
    explicit = Parallel(n_jobs=2, backend="loky")(delayed(pid_of)(i) for i in range(4))
    return set(inner) | set(explicit) == {os.getpid()}


def test_nested_calls_use_threads_not_processes():
    assert Parallel(n_jobs=2)(delayed(nested)(i) for i in range(4)) == [True] * 4


def nested_from_a_thread(x):
    # a thread starts with an empty context: the nesting level of the task's own thread
    # does not reach it, yet this is a worker process
    with ThreadPoolExecutor(1) as pool:
        inner = pool.submit(lambda: Parallel(n_jobs=2)(delayed(pid_of)(i) for i in range(4)))
        return set(inner.result()) == {os.getpid()}


def test_nested_calls_from_a_thread_a_task_started_use_threads_too():
    assert Parallel(n_jobs=2)(delayed(nested_from_a_thread)(i) for i in range(4)) == [True] * 4


def test_concurrent_calls_from_eight_threads():
    results = {}

    def run(k):
        results[k] = Parallel(n_jobs=2)(delayed(identity)(k * 100 + i) for i in range(50))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == {k: [k * 100 + i for i in range(50)] for k in range(8)}


def timed_sleep(seconds):
    started = time.monotonic()
    time.sleep(seconds)
    return started, time.monotonic()


@pytest.mark.timeout(60)
def test_n_jobs_bounds_a_call_on_a_pool_another_call_made_larger():
    # the other call keeps the shared pool at 4 workers, 3 of them idle
    other = threading.Thread(target=Parallel(n_jobs=4, batch_size=1),
                             args=([delayed(time.sleep)(3)],))
    other.start()
    try:
        deadline = time.monotonic() + 10  # until its call holds the shared pool of 4
        while not any(pool.size == 4 and pool.active_calls for pool in registry._shared):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        spans = Parallel(n_jobs=2, batch_size=1)(delayed(timed_sleep)(0.3) for _ in range(8))
    finally:
        other.join(30)
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = [sum(step for _, step in edges[:i + 1]) for i in range(len(edges))]
    assert max(running) == 2


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_start_methods(method):
    out = Parallel(n_jobs=2, start_method=method)(delayed(lambda x: x * 3)(i)
                                                  for i in range(10))
    assert out == [3 * i for i in range(10)]


EXIT_WITH_PRIVATE_POOLS_IN_USE = """
import threading, time
from parmap import Parallel, delayed

def slow(i):
    time.sleep(0.05 if i < 2 else 30)
    return i

started = threading.Event()

def run(**options):
    results = Parallel(n_jobs=2, return_as="generator", **options)(
        delayed(slow)(i) for i in range(6))
    next(results)
    started.set()
    threading.Event().wait()  # the call, and its pool, stay in use until exit

shared = Parallel(n_jobs=2, return_as="generator")(delayed(slow)(i) for i in range(6))
print(next(shared))
# other options while the shared pool is busy: a private pool, left open at exit
private = Parallel(n_jobs=2, max_tasks_per_child=2, return_as="generator")(
    delayed(slow)(i) for i in range(6))
print(next(private))
threading.Thread(target=run, kwargs={"max_tasks_per_child": 3}, daemon=True).start()
assert started.wait(30)  # the daemon thread's call holds a third pool
print("end", flush=True)
"""


def test_interpreter_exit_stops_private_pools_still_in_use():
    """A private pool in use at exit (a result generator left open, a call on a daemon
    thread) is shut down with the shared one: its workers are not daemonic, and
    multiprocessing's exit handler would otherwise wait for them forever."""
    t0 = time.monotonic()
    assert run_script(EXIT_WITH_PRIVATE_POOLS_IN_USE, timeout=60).split() == ["0", "0", "end"]
    assert time.monotonic() - t0 < 20


def test_bad_backend_arguments():
    with pytest.raises(ValueError, match="start_method"):
        Parallel(n_jobs=2, start_method="teleport")
    with pytest.raises(ValueError, match="idle_timeout"):
        Parallel(n_jobs=2, idle_timeout=0)
    with pytest.raises(TypeError, match="initializer"):
        Parallel(n_jobs=2, initializer=3)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(120)
def test_thousand_calls_do_not_leak():
    healthy()
    fds, threads, children = open_fds(), threading.active_count(), child_pids()
    shm = shm_entries()  # parmap's only: other programs on the machine may come and go
    for i in range(1000):
        Parallel(n_jobs=2)(delayed(identity)(j) for j in range(3))
    assert open_fds() <= fds
    assert threading.active_count() <= threads
    assert child_pids() == children
    assert shm_entries() <= shm


UNGUARDED = """
import sys
from parmap import Parallel, delayed
print("top-level ran", flush=True)
out = Parallel(n_jobs=2, start_method=sys.argv[1])(delayed(lambda x: x + 1)(i) for i in range(4))
print(out, flush=True)
"""


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_do_not_rerun_an_unguarded_main_script(tmp_path, method):
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, str(script), method], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["top-level ran", "[1, 2, 3, 4]"]


def test_the_resource_tracker_parmap_launches_goes_without_site_and_no_other(monkeypatch):
    from multiprocessing import util

    from parmap.process import mp_patches

    execs = []
    monkeypatch.setattr(util, "spawnv_passfds", lambda path, args, fds: execs.append(args))
    mp_patches.patch_exec()
    tracker = [sys.executable, "-B", "-c",
               "from multiprocessing.resource_tracker import main;main(5)"]
    worker = [sys.executable, "-B", "-c", "from multiprocessing.spawn import spawn_main"]
    monkeypatch.setattr(mp_patches.spawning, "active", True, raising=False)
    util.spawnv_passfds(sys.executable, tracker, ())
    util.spawnv_passfds(sys.executable, worker, ())  # a worker needs site-packages
    util.spawnv_passfds("/opt/other/python", tracker, ())  # multiprocessing.set_executable
    util.spawnv_passfds(sys.executable, [sys.executable, "-S", *tracker[1:]], ())
    monkeypatch.setattr(sys, "frozen", True, raising=False)  # an app reads its own argv
    util.spawnv_passfds(sys.executable, tracker, ())
    monkeypatch.delattr(sys, "frozen")
    monkeypatch.setattr(mp_patches.spawning, "active", False)  # other code's start
    util.spawnv_passfds(sys.executable, tracker, ())
    bare = [sys.executable, "-P", "-S", *tracker[1:]] if sys.version_info >= (3, 11) \
        else tracker  # (-P, needed with -S: 3.11)
    assert execs == [bare, worker, tracker, [sys.executable, "-S", *tracker[1:]], tracker,
                     tracker]


TRACKER_IN_A_FOLDER = """
import threading
from parmap import Parallel, delayed
threading.Thread(target=threading.Event().wait, daemon=True).start()  # the forkserver
print(Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(4)))
"""


def test_the_resource_tracker_runs_no_file_of_the_callers_folder(tmp_path):
    # started without site, the tracker imported stat, posixpath... after the current
    # folder joined its sys.path: a user's stat.py there ran in it (Python 3.10), and
    # the tracker died of it; it now goes with -P, and without -S before 3.11
    # (the caller imported stat before the folder joined its path: only the tracker can)
    (tmp_path / "stat.py").write_text("open('ran-as-stat', 'w').close()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", TRACKER_IN_A_FOLDER], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0, 1, 2, 3]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stat.py"]


def test_batches_travel_compactly_and_errors_still_name_the_task():
    from parmap._delayed import Batch, compact

    tasks = [delayed(identity)(i) for i in range(3)]
    assert compact(tasks) == (identity, [(0,), (1,), (2,)])
    mixed = tasks + [delayed(identity)(x=3)]
    assert compact(mixed) == (None, mixed)
    batch = Batch(10, [(1,), (0,)], func=lambda x: 1 / x)
    with pytest.raises(ZeroDivisionError) as info:
        batch()
    assert "task 11" in "\n".join(getattr(info.value, "__notes__", [])) or \
        "task 11" in str(getattr(info.value, "__cause__", ""))
    with pytest.raises(ZeroDivisionError):
        Parallel(n_jobs=2)(delayed(lambda x: 1 / x)(i - 5) for i in range(10))


def test_functions_of_main_travel_by_value(tmp_path):
    """Plain pickle is used for importable functions; __main__ ones go by value."""
    import pickle

    from parmap._delayed import Batch
    from parmap.process.protocol import encode_request

    namespace = {"__name__": "__main__"}
    exec("def scaled(x):\n    return 10 * x\n", namespace)
    payload = encode_request(Batch(0, [(namespace["scaled"], (4,), {})]), False)
    assert b"scaled" in payload
    reader = ("import pickle, sys\n"
              "start, func, tasks, unary, track, nbytes, nested = "
              "pickle.loads(sys.stdin.buffer.read())\n"
              "print(func(tasks[0]) if unary else func(*tasks[0]))")
    out = subprocess.run([sys.executable, "-c", reader], input=payload, capture_output=True,
                         timeout=30, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == b"40", out.stderr
    importable = encode_request(Batch(0, [(identity, (4,), {})]), False)
    assert b"cloudpickle" not in importable  # by reference, with plain pickle
    assert pickle.loads(importable)[1] is identity


def test_a_crash_in_one_call_leaves_a_concurrent_call_whole():
    results, errors = {}, {}

    def run(name, func):
        try:
            results[name] = Parallel(n_jobs=2, batch_size=1)(
                delayed(func)(i) for i in range(40))
        except WorkerCrashedError as exc:
            errors[name] = exc

    threads = [threading.Thread(target=run, args=("crash", exit_on)),
               threading.Thread(target=run, args=("ok", sleep_then_identity))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results["ok"] == list(range(40))
    assert "crash" in errors
    healthy()


def sleep_then_identity(x):
    time.sleep(0.005)
    return x


STDERR_WITHOUT_FD = """
import io, sys
real = sys.stderr
sys.stderr = io.StringIO()   # pythonw, some IDEs and services: no file descriptor
from parmap import Parallel, delayed
print(Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(4)))
"""


@pytest.mark.timeout(60)
def test_workers_start_when_the_callers_stderr_has_no_file_descriptor():
    assert run_script(STDERR_WITHOUT_FD, timeout=50).strip() == "[0, 1, 2, 3]"


def test_one_argument_tasks_travel_as_the_arguments_themselves():
    """delayed(f)(x) batches go to workers as [x, ...] (no 1-tuples); others as tuples."""
    import pickle

    from parmap._delayed import Batch
    from parmap.process.protocol import Request, encode_request

    batch = Batch(3, [(identity, (i,), {}) for i in range(4)])
    request = Request(*pickle.loads(encode_request(batch, False)))
    assert request.unary and request.func is identity and request.tasks == [0, 1, 2, 3]
    assert batch.task(1) == (identity, (1,), {})  # the caller's batch keeps its tuples
    pair = Batch(0, [(identity, (1, 2), {}), (identity, (3,), {})])
    request = Request(*pickle.loads(encode_request(pair, False)))
    assert not request.unary and request.tasks == [(1, 2), (3,)]


def _inverse(x):
    return 1 / x


def test_a_unary_batch_names_the_failing_task_and_runs_the_general_ways():
    from parmap._delayed import Batch

    batch = Batch(10, [1, 2, 0, 4], _inverse)
    batch.unary = True
    with pytest.raises(ZeroDivisionError) as info:
        batch()
    assert batch.failed == 2 and batch.task(2) == (_inverse, (0,), {})
    assert "task 12" in " ".join(info.value.__notes__)
    marks = []

    class Tracker:
        def mark(self, index, started):
            marks.append(index)

    batch = Batch(5, [1, 2, 4], _inverse)
    batch.unary = True
    batch.tracker, batch.transform = Tracker(), str
    assert batch() == ["1.0", "0.5", "0.25"] and marks == [5, 6, 7]


def test_one_argument_tasks_in_workers_keep_order_and_error_index():
    assert Parallel(n_jobs=2)(delayed(_inverse)(i) for i in range(1, 3001)) == \
        [1 / i for i in range(1, 3001)]
    with pytest.raises(ZeroDivisionError) as info:
        Parallel(n_jobs=2)(delayed(_inverse)(i - 2000) for i in range(3000))
    assert "task 2000" in " ".join(info.value.__notes__)


ENV_AFTER_FORKSERVER = """
import os, threading
from parmap import Parallel, delayed
from parmap.process.registry import shutdown_all

stop = threading.Event()
threading.Thread(target=stop.wait, daemon=True).start()  # as in a notebook: no fork
os.environ["PARMAP_TEST_GONE"] = "1"
Parallel(n_jobs=2)(delayed(abs)(i) for i in range(4))  # the forkserver starts now
shutdown_all()
os.environ["PARMAP_TEST_NEW"] = "2"
del os.environ["PARMAP_TEST_GONE"]
seen = Parallel(n_jobs=2, batch_size=1)(
    delayed(os.getenv)(name) for name in ["PARMAP_TEST_NEW", "PARMAP_TEST_GONE"])
print(seen)
stop.set()
"""


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(),
                    reason="needs forkserver")
@pytest.mark.timeout(60)
def test_workers_from_the_forkserver_see_the_callers_environment_of_now():
    assert run_script(ENV_AFTER_FORKSERVER, timeout=50).strip() == "['2', None]"
