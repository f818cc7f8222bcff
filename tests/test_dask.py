"""The dask backend on a real cluster: a LocalCluster of two worker processes (one thread
each) started once for this module. Skipped where dask.distributed is not installed (the
two import tests run everywhere)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import numpy as np
import pytest

from parmap.backends import CallOptions
from parmap import (Parallel, RemoteTaskError, TaskTimeoutError, WorkerCrashedError, delayed,
                    parallel_config)

from . import conftest

try:
    import distributed
except ImportError:
    distributed = None

#: the threads a LocalCluster and its Client run in this process (the event loop, and the
#: watchers of each worker process and of its queues, which come back when a worker
#: restarts), and the two executors dask.distributed starts once per process (see
#: stop_dask_executors)
CLUSTER_THREADS = ("IO loop", "AsyncProcess Dask Worker process", "QueueFeederThread",
                   "Dask-Offload", "Dask-Callback-Thread")
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=SUBPROCESS_ENV, timeout=60)


def local_cluster(n_workers: int) -> distributed.LocalCluster:
    # dashboard_address=None still serves the scheduler's /health and /metrics on port 8787,
    # and a second cluster (or another program) on this machine makes that a warning: port 0
    return distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                    dashboard_address=None, host="127.0.0.1",
                                    scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})


def dask_config():
    import dask

    # allowed-failures: one retry for a task whose worker died, not three (the crash tests
    # stay short); pre-spawn-environ: a Nanny sets OMP_NUM_THREADS=1 & co. in *this*
    # process's os.environ before it starts a worker, which would change later tests
    return dask.config.set({"distributed.scheduler.allowed-failures": 1,
                            "distributed.nanny.pre-spawn-environ": {}})


def wait_until(condition, timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds (waiting for the cluster to settle, not syncing)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---------------------------------------------------------------------- no cluster needed

def test_import_parmap_does_not_import_dask():
    result = run_python("""
        import sys
        import parmap
        parmap.parallel_config(backend="dask").unregister()  # registered, not imported
        print(sorted(m for m in ("dask", "distributed") if m in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_missing_dask_gives_a_clear_import_error():
    result = run_python("""
        import sys
        sys.modules["distributed"] = None  # as if it were not installed
        from parmap import Parallel, delayed
        try:
            Parallel(n_jobs=2, backend="dask")(delayed(abs)(i) for i in range(4))
        except ImportError as exc:
            print(exc)
    """)
    assert result.returncode == 0, result.stderr
    assert "backend='dask' needs the dask and distributed packages" in result.stdout
    assert "pip install" in result.stdout


# ---------------------------------------------------------------------- the cluster

@pytest.fixture(scope="module")
def dask_client():
    if distributed is None:
        pytest.skip("dask.distributed is not installed")

    before = set(threading.enumerate())
    with dask_config():
        cluster = local_cluster(n_workers=2)
    client = distributed.Client(cluster, set_as_default=False)

    def owned() -> tuple[set, set]:
        threads = {t for t in threading.enumerate()
                   if t not in before and t.name.startswith(CLUSTER_THREADS)}
        return threads, {nanny.pid for nanny in list(cluster.workers.values()) if nanny.pid}

    conftest.LONG_LIVED.append(owned)
    try:
        yield client
    finally:
        conftest.LONG_LIVED.remove(owned)
        threads, pids = owned()
        client.close()
        cluster.close()
        stop_dask_executors()
        assert wait_until(lambda: not any(t.is_alive() for t in threads)
                          and not (pids & conftest.child_pids())), "the cluster did not stop"


def stop_dask_executors() -> None:
    """Stop the executor threads dask.distributed keeps for the rest of the process (its
    offload pool, and the thread that runs Future callbacks); both are made again when
    needed. Left running, they would change what later test modules see: with a thread
    alive besides the main one, parmap's process pool starts its workers through a
    forkserver instead of forking."""
    from concurrent.futures import ThreadPoolExecutor

    import distributed.utils
    from distributed.client import Future

    callbacks, Future._cb_executor = Future._cb_executor, None
    if callbacks is not None:
        callbacks.shutdown(wait=True)
    offload = distributed.utils._offload_executor
    distributed.utils._offload_executor = ThreadPoolExecutor(  # threads come on first use
        max_workers=1, thread_name_prefix="Dask-Offload")
    offload.shutdown(wait=True)


@pytest.fixture
def client(dask_client):
    """The module's client as the current one, as `distributed.get_client()` finds it."""
    with dask_client.as_current():
        yield dask_client


def parmap_keys(client) -> list:
    return client.run_on_scheduler(
        lambda dask_scheduler: [k for k in dask_scheduler.tasks if str(k).startswith("parmap")])


def key_states(client, prefix: str) -> dict:
    """The scheduler's state of each task whose key starts with ``prefix``, and who wants it."""
    return client.run_on_scheduler(lambda dask_scheduler, prefix=prefix: {
        str(k): (ts.state, sorted(c.client_key for c in ts.who_wants))
        for k, ts in dask_scheduler.tasks.items() if str(k).startswith(prefix)})


def square(x):
    return x * x


def slow_square(x):
    time.sleep(0.001 * (x % 5))  # uneven durations: completion order differs
    return x * x


@pytest.mark.parametrize("return_as", ["list", "generator", "generator_unordered"])
def test_results_and_order(client, return_as):
    with parallel_config(backend="dask"):
        out = Parallel(n_jobs=-1, return_as=return_as)(delayed(slow_square)(i)
                                                       for i in range(300))
        out = list(out)
    expected = [i * i for i in range(300)]
    assert (sorted(out) if return_as == "generator_unordered" else out) == expected


def test_tasks_run_on_the_workers(client):
    worker_pids = set(client.run(os.getpid).values())
    pids = Parallel(n_jobs=-1, backend="dask", batch_size=1)(
        delayed(os.getpid)() for _ in range(20))
    assert set(pids) <= worker_pids
    assert os.getpid() not in pids


def test_explicit_client_needs_no_current_one(dask_client):
    with parallel_config(backend="dask", client=dask_client):
        assert Parallel(n_jobs=-1)(delayed(square)(i) for i in range(5)) == [0, 1, 4, 9, 16]
    assert Parallel(n_jobs=2, backend="dask", client=dask_client)(
        delayed(square)(i) for i in range(3)) == [0, 1, 4]


def test_without_a_client_the_error_says_how_to_start_one(dask_client):
    # the module's client is not the default one, and no `as_current` block is active
    with pytest.raises(ValueError, match=r"needs a Dask client.*Client\(LocalCluster\("
                                         r"n_workers=.*processes=True\)\)"):
        Parallel(n_jobs=2, backend="dask")(delayed(square)(i) for i in range(3))


def test_bad_backend_arguments():
    if distributed is None:
        pytest.skip("dask.distributed is not installed")
    with pytest.raises(TypeError, match="client must be a distributed.Client"):
        Parallel(backend="dask", client="tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="wait_for_workers_timeout must be"):
        Parallel(backend="dask", wait_for_workers_timeout=-1)
    with pytest.raises(TypeError, match="unexpected keyword argument.*'no_such_option'"):
        Parallel(backend="dask", no_such_option=1)


def test_n_jobs_minus_one_counts_the_cluster_threads_not_local_cpus(client, monkeypatch):
    import parmap._checks

    monkeypatch.setattr(parmap._checks, "cpu_count", lambda *args, **kwargs: 7)
    threads = sum(client.nthreads().values())
    for n_jobs, expected in [(-1, threads), (3, 3)]:
        with Parallel(n_jobs=n_jobs, backend="dask") as parallel:
            assert parallel(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]
            assert parallel._backend.n_jobs == expected


def test_no_worker_waits_then_fails_clearly():
    if distributed is None:
        pytest.skip("dask.distributed is not installed")
    cluster = local_cluster(n_workers=0)
    empty = distributed.Client(cluster, set_as_default=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"has no worker after 0.5s.*"
                                               r"wait_for_workers_timeout="):
            Parallel(n_jobs=-1, backend="dask", client=empty, wait_for_workers_timeout=0.5)(
                delayed(square)(i) for i in range(3))
        assert time.monotonic() - t0 < 5
    finally:
        empty.close()
        cluster.close()


def test_auto_batching_groups_tiny_tasks(client, monkeypatch):
    submitted = []
    submit = client.submit
    monkeypatch.setattr(client, "submit", lambda *a, **k: submitted.append(a) or submit(*a, **k))
    out = Parallel(n_jobs=-1, backend="dask")(delayed(square)(i) for i in range(2000))
    assert out == [i * i for i in range(2000)]
    assert len(submitted) <= 40  # one Dask task per batch, not per parmap task


def test_batch_duration_is_measured_in_the_worker(dask_client):
    from parmap._delayed import Batch
    from parmap.backends.dask import DaskBackend

    backend = DaskBackend(client=dask_client)
    backend.configure(2, CallOptions())
    backend.start_call()
    done = threading.Event()
    outcome = []
    batch = Batch(0, [(time.sleep, (0.1,), {})])
    t0 = time.monotonic()
    backend.submit(batch, lambda result: (outcome.append(result), done.set()))
    assert done.wait(20)
    wall = time.monotonic() - t0
    backend.stop_call()
    backend.terminate()
    assert outcome == [[None]]
    assert 0.1 <= batch.duration < wall  # the task's time, without Dask's round trip


class CustomError(Exception):
    pass


def fail_on(x, bad=3):
    if x == bad:
        raise CustomError(f"bad value {x}")
    return x


def test_task_exception_type_remote_traceback_and_note(client):
    with pytest.raises(CustomError, match="bad value 3") as info:
        Parallel(n_jobs=-1, backend="dask")(delayed(fail_on)(i) for i in range(10))
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-1] == "fail_on"  # the worker's frames, down to the user's function
    assert "run_batch" in frames
    assert any("task 3: fail_on(3)" in note for note in info.value.__notes__)


class UnpicklableError(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def fail_unpicklable(x):
    if x == 2:
        raise UnpicklableError("cannot travel")
    return x


def test_exception_that_cannot_travel_comes_back_as_text(client):
    with pytest.raises(RemoteTaskError, match="task 2 raised .*UnpicklableError: cannot "
                                              "travel") as info:
        Parallel(n_jobs=-1, backend="dask")(delayed(fail_unpicklable)(i) for i in range(5))
    assert "fail_unpicklable" in info.value.remote_traceback


def make_lock(_):
    return threading.Lock()


def test_unpicklable_arguments_and_results_are_named(client):
    from parmap import SerializationError

    with pytest.raises(SerializationError, match=r"argument 0 of task 0 \(square\) could not "
                                                 r"be pickled to send it to the Dask cluster"):
        Parallel(n_jobs=-1, backend="dask")(delayed(square)(threading.Lock()) for _ in range(2))
    with pytest.raises(SerializationError, match=r"the results of tasks \d \(make_lock\) "
                                                 r"could not be fetched from the Dask worker"):
        Parallel(n_jobs=-1, backend="dask", batch_size=1)(delayed(make_lock)(i)
                                                          for i in range(2))
    assert wait_until(lambda: not parmap_keys(client))


def sleep_then_touch(i, folder):
    if i == 0:
        raise CustomError("first")
    time.sleep(0.05)
    open(os.path.join(folder, str(i)), "w").close()
    return i


def test_first_error_cancels_the_rest(client, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(CustomError, match="first"):
        Parallel(n_jobs=-1, backend="dask", batch_size=1, pre_dispatch="all")(
            delayed(sleep_then_touch)(i, str(tmp_path)) for i in range(200))
    assert time.monotonic() - t0 < 3  # 200 x 50 ms / 2 workers would be 5 s
    assert wait_until(lambda: not parmap_keys(client)), "cancelled tasks stayed queued"
    assert len(os.listdir(tmp_path)) < 100


def test_closing_a_generator_cancels_its_tasks(client):
    gen = Parallel(n_jobs=-1, backend="dask", return_as="generator", batch_size=1,
                   pre_dispatch="all")(delayed(time.sleep)(0.02) for _ in range(400))
    assert next(gen) is None
    gen.close()
    assert wait_until(lambda: not parmap_keys(client)), "the tasks went on after close()"


def kill_worker_once(i, marker):
    if i == 5 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return i * i


def kill_worker(i):
    if i == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return i


def test_a_killed_worker_is_replaced_and_its_tasks_rerun(client, tmp_path):
    marker = str(tmp_path / "killed")
    try:
        out = Parallel(n_jobs=-1, backend="dask", batch_size=2)(
            delayed(kill_worker_once)(i, marker) for i in range(12))
        assert out == [i * i for i in range(12)]
        assert os.path.exists(marker)  # a worker did die
    finally:
        client.wait_for_workers(2, timeout=30)


def test_a_worker_that_keeps_dying_fails_the_call_clearly(client):
    t0 = time.monotonic()
    try:
        # Dask holds every task queued on a dying worker suspect too, so the batch it gives
        # up on may be task 3's neighbour rather than task 3
        with pytest.raises(WorkerCrashedError, match=r"tasks (\d) \(kill_worker\) were "
                                                     r"running on Dask workers that died 2 "
                                                     r"times") as info:
            Parallel(n_jobs=-1, backend="dask", batch_size=1)(
                delayed(kill_worker)(i) for i in range(6))
        assert len(info.value.task_indices) == 1
        assert time.monotonic() - t0 < 30
    finally:
        client.wait_for_workers(2, timeout=30)


def test_losing_every_worker_fails_the_call_instead_of_hanging():
    if distributed is None:
        pytest.skip("dask.distributed is not installed")
    with dask_config():
        cluster = local_cluster(n_workers=1)
    lonely = distributed.Client(cluster, set_as_default=False)
    try:
        gen = Parallel(n_jobs=2, backend="dask", client=lonely, batch_size=1,
                       return_as="generator", wait_for_workers_timeout=1)(
            delayed(time.sleep)(0.1) for _ in range(100))
        next(gen)
        cluster.scale(0)  # the only worker goes away for good
        t0 = time.monotonic()
        with pytest.raises(WorkerCrashedError, match=r"has had no worker for more than 1s"):
            list(gen)
        assert time.monotonic() - t0 < 10
    finally:
        lonely.close()
        cluster.close()


def element(array, i, offset=0):
    return float(array[i]) + offset


def test_a_large_argument_is_scattered_once_per_call(client, monkeypatch):
    big = np.arange(25_000_000, dtype=np.float64)  # 200 MB
    scattered, sent = [], []
    scatter, submit = client.scatter, client.submit

    def spy_scatter(data, **kwargs):
        scattered.append([getattr(d, "nbytes", 0) for d in data])
        return scatter(data, **kwargs)

    def spy_submit(func, *args, **kwargs):
        sent.append(args)
        return submit(func, *args, **kwargs)

    monkeypatch.setattr(client, "scatter", spy_scatter)
    monkeypatch.setattr(client, "submit", spy_submit)
    out = Parallel(n_jobs=-1, backend="dask", batch_size=1)(
        delayed(element)(big, i) for i in range(16))
    assert out == [float(i) for i in range(16)]
    assert scattered == [[big.nbytes]]  # once, not once per task
    assert len(sent) == 16
    for start, func, tasks, options, *futures in sent:  # only a placeholder in each task
        assert not any(isinstance(a, np.ndarray) for args in tasks for a in args)
        assert [f.key for f in futures] == [sent[0][4].key]
    del big, sent[:], futures
    # and the cluster forgets it after the call
    assert wait_until(lambda: not client.run_on_scheduler(
        lambda dask_scheduler: [k for k, ts in dask_scheduler.tasks.items()
                                if (ts.nbytes or 0) >= 200e6]))


def test_scattered_objects_in_keywords_and_mixed_tasks(client, monkeypatch):
    medium = np.ones(300_000)  # 2.4 MB: above the default max_nbytes of 1 MB
    small = np.ones(10)
    calls = []
    scatter = client.scatter
    monkeypatch.setattr(client, "scatter",
                        lambda data, **k: calls.append(len(data)) or scatter(data, **k))
    tasks = [delayed(element)(medium, i, offset=1) if i % 2 else
             delayed(np.sum)(medium) for i in range(10)]
    tasks.append(delayed(element)(small, 0, offset=medium.size))
    out = Parallel(n_jobs=-1, backend="dask", batch_size=3)(tasks)
    assert out == [2.0 if i % 2 else medium.size for i in range(10)] + [1.0 + medium.size]
    assert calls == [1]
    with parallel_config(max_nbytes=None):  # no scattering at all
        out = Parallel(n_jobs=-1, backend="dask")(delayed(np.sum)(medium) for _ in range(2))
    assert out == [medium.size] * 2 and calls == [1]


def task_key(_=None):
    from distributed.utils import thread_state

    return thread_state.key


def outer(i):
    inner = Parallel(n_jobs=2, batch_size=1)(delayed(task_key)(j) for j in range(3))
    return task_key(), inner


@pytest.mark.timeout(30)
def test_nested_parallel_runs_on_dask_without_deadlock(client):
    # 4 outer tasks on 2 worker threads, each waiting for 3 inner tasks: without seceding,
    # the waiting outer tasks would hold every thread the inner tasks need
    results = Parallel(n_jobs=-1, backend="dask", batch_size=1)(
        delayed(outer)(i) for i in range(4))
    assert len(results) == 4
    for outer_key, inner_keys in results:
        assert outer_key.startswith("parmap-outer-")
        assert all(key.startswith("parmap-task_key-") for key in inner_keys)
        assert len(set(inner_keys)) == 3  # each inner task was a Dask task of its own


def stuck(i, event_name):
    if i == 1:
        distributed.Event(event_name).wait(20)
    return i


def test_timeout_raises_task_timeout_error(client):
    release = distributed.Event("parmap-test-release", client=client)
    t0 = time.monotonic()
    try:
        with pytest.raises(TaskTimeoutError, match=r"task 1 \(stuck\(1, .*\)\) has run for "
                                                   r"more than timeout=0.5s; it ran on the Dask "
                                                   r"worker") as info:
            Parallel(n_jobs=-1, backend="dask", timeout=0.5)(
                delayed(stuck)(i, "parmap-test-release") for i in range(4))
        assert isinstance(info.value, TimeoutError)
        assert time.monotonic() - t0 < 5
    finally:
        release.set()  # Dask cannot stop the task: let it end
    # the stuck task ends once it sees the event (20 s at most); then nothing of this call
    # may stay on the scheduler
    assert wait_until(lambda: not key_states(client, "parmap-stuck-"), timeout=30), \
        key_states(client, "parmap-stuck-")


def test_timeout_not_triggered_by_fast_tasks(client):
    out = Parallel(n_jobs=-1, backend="dask", timeout=5)(delayed(square)(i) for i in range(500))
    assert out == [i * i for i in range(500)]


def test_workers_option_pins_the_batches(client):
    address, pid = sorted(client.run(os.getpid).items())[0]
    pids = Parallel(n_jobs=-1, backend="dask", batch_size=1, workers=[address])(
        delayed(os.getpid)() for _ in range(6))
    assert set(pids) == {pid}


class _EventLog:
    """Stands in for a Dask worker: the watchdog logs its timeout events here."""

    address = "fake-worker"

    def __init__(self):
        self.events = []

    def log_event(self, topic, message):
        self.events.append((topic, message))


def test_the_timeout_watchdog_fires_alone_ends_when_idle_and_comes_back(monkeypatch):
    # A batch whose first task was marked after the watchdog looked (a race: the
    # watchdog's thread wakes as the batch is tracked) was seen only at another batch's
    # start or end, never for a batch alone. And a worker in the caller's process
    # (LocalCluster(processes=False)) kept the watchdog thread for the caller's life.
    from parmap.backends import _dask_worker

    monkeypatch.setattr(_dask_worker, "WATCHDOG_IDLE", 0.2, raising=False)
    watchdog, worker = _dask_worker._Watchdog(), _EventLog()

    def watchdog_threads():
        return [t for t in threading.enumerate() if t.name == "parmap-dask-timeout-watchdog"]

    for round_ in range(2):  # the second batch starts a new thread
        running = _dask_worker._Running(round_, 0.1, "topic", worker)
        watchdog.track(running)
        if round_:  # the first task's mark may come after the watchdog looked (round 0)
            running.mark(round_, time.monotonic())
        assert wait_until(lambda: len(worker.events) == round_ + 1, timeout=5)
        assert worker.events[-1][1]["index"] == round_
        watchdog.untrack(running)
        assert wait_until(lambda: not watchdog_threads(), timeout=5)


def stuck_once_started(i, started_name, release_name):
    if i == 1:
        distributed.Event(started_name).set()
        distributed.Event(release_name).wait(20)
    return i


def test_closing_the_client_during_a_call_says_so(client):
    from parmap import PoolError

    other = distributed.Client(client.scheduler.address, set_as_default=False)
    started = distributed.Event("parmap-test-close-started", client=client)
    release = distributed.Event("parmap-test-close", client=client)

    def close_once_a_task_runs():
        if started.wait(30):
            other.close()

    closer = threading.Thread(target=close_once_a_task_runs)
    closer.start()
    try:
        with pytest.raises(PoolError, match="client was closed") as info:
            Parallel(n_jobs=-1, backend="dask", client=other)(
                delayed(stuck_once_started)(i, "parmap-test-close-started",
                                            "parmap-test-close") for i in range(4))
        assert "client.cancel" not in str(info.value)
    finally:
        release.set()
        started.set()  # (the closer's wait ends, whatever happened)
        closer.join(30)
    assert wait_until(lambda: not key_states(client, "parmap-stuck_once_started-"),
                      timeout=30)


def subscribed_parmap_topics(dask_scheduler) -> int:
    broker = getattr(dask_scheduler, "_broker", None)  # (distributed 2024.1+)
    if broker is None:
        return -1
    return sum(1 for name, topic in broker._topics.items()
               if str(name).startswith("parmap") and topic.subscribers)


def test_a_cancelled_or_failed_call_unsubscribes_its_timeout_topic(client):
    # a call with a timeout listens to its tasks' start times on a topic of its own;
    # calls that were cancelled or failed left theirs subscribed on the scheduler
    if client.run_on_scheduler(subscribed_parmap_topics) < 0:
        pytest.skip("this distributed keeps its topics elsewhere")
    parallel = Parallel(n_jobs=2, backend="dask", timeout=30, return_as="generator")
    for _ in range(3):
        results = parallel(delayed(square)(i) for i in range(100))
        next(results)
        results.close()
    for _ in range(3):
        with pytest.raises(ZeroDivisionError):
            list(parallel(delayed(divmod)(1, 0) for _ in range(4)))
    assert wait_until(lambda: client.run_on_scheduler(subscribed_parmap_topics) == 0), \
        client.run_on_scheduler(subscribed_parmap_topics)
