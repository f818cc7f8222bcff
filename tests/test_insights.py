"""insights=True: a run with a known mix is reported right on every backend; the report's
advice follows the figures; plot() writes a PNG; insights off adds nothing anywhere."""
from __future__ import annotations

import json
import os
import re
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

from parmap import Parallel, delayed, parallel_config
from parmap._delayed import Batch
from parmap._insights import Insights
from parmap._record import BatchRecord, bin_of, memory
from parmap.backends.threading import ThreadingBackend
from parmap.process import protocol, worker

from .conftest import recording

SHORT, SLOW, SLOW_INDEX, N = 0.03, 0.3, 5, 13
BIG_RESULT = 2 * 1024 ** 2


def sleeper(seconds, big=False, array=False):
    time.sleep(seconds)
    if array:
        return np.ones(BIG_RESULT // 8)  # above max_nbytes: back through /dev/shm
    return b"x" * BIG_RESULT if big else seconds


def mix():
    """Sleep tasks of known lengths, one slow one, big results (bytes and an array)."""
    for i in range(N):
        yield delayed(sleeper)(SLOW if i == SLOW_INDEX else SHORT, big=i in (2, 3),
                               array=i == 7)


@pytest.mark.parametrize("backend, n_jobs", [("sequential", 2), ("threading", 2),
                                              ("processes", 2), ("processes", 1)])
def test_a_known_mix_is_reported_right(backend, n_jobs):
    Parallel(n_jobs=n_jobs, backend=backend)(delayed(sleeper)(0) for _ in range(2))  # warm
    parallel = Parallel(n_jobs=n_jobs, backend=backend, batch_size=1, insights=True)
    t0 = time.perf_counter()
    parallel(mix())
    wall = time.perf_counter() - t0
    data = parallel.insights.to_dict()
    json.dumps(data)  # plain data, for programs
    workers = 1 if backend == "sequential" else n_jobs
    assert data["finished"] and not data["running"]
    assert (data["n_tasks"], data["n_batches"], data["n_workers"]) == (N, N, workers)
    assert 0 < data["wall_s"] <= wall

    slowest = data["tasks"]["slowest"][0]
    assert slowest["index"] == SLOW_INDEX and slowest["call"].startswith(f"sleeper({SLOW}")
    assert SLOW <= slowest["wall_s"] < SLOW + 0.25
    assert slowest["cpu_s"] < 0.1  # it slept
    assert data["tasks"]["total_s"] >= SLOW + (N - 1) * SHORT

    # utilisation: the sleeps fill the workers' time, within tolerance
    expected = (SLOW + (N - 1) * SHORT) / (workers * wall)
    utilisation = sum(w["utilisation"] for w in data["workers"]) / workers
    assert abs(utilisation - expected) < 0.15, (utilisation, expected)
    assert sum(w["tasks"] for w in data["workers"]) == N
    assert abs(sum(data["time"][k] for k in ("compute", "transfer", "in_batch_overhead",
                                             "idle")) - 1) < 0.01
    for w in data["workers"]:
        assert w["peak_rss_bytes"] >= w["rss_bytes"] > 1024 ** 2

    transfer = data["transfer"]
    if backend == "processes" and n_jobs > 1:
        assert transfer["to_workers_bytes"] > 0
        assert transfer["from_workers_bytes"] > 2 * BIG_RESULT  # the two bytes results
        assert transfer["shm_result_bytes"] >= BIG_RESULT  # the array
        assert transfer["worker_pickle_s"] > 0 and transfer["caller_unpickle_s"] > 0
        assert all(w["worker"].startswith("pid ") for w in data["workers"])
    else:
        assert transfer["to_workers_bytes"] == transfer["from_workers_bytes"] == 0

    text = str(parallel.insights)
    assert f"task {SLOW_INDEX}: sleeper({SLOW}" in text
    assert "What to change:" in text and len(text.splitlines()) < 40


def test_insights_can_be_read_during_a_generator_call():
    parallel = Parallel(n_jobs=2, backend="threading", batch_size=1, insights=True,
                        return_as="generator")
    results = parallel(delayed(sleeper)(0.001) for _ in range(20))
    next(results)
    running = parallel.insights.to_dict()
    assert running["running"] and not running["finished"] and running["n_tasks"] >= 1
    list(results)
    done = parallel.insights.to_dict()
    assert done["finished"] and done["n_tasks"] == 20


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_a_generator_closed_before_its_first_result_ends_the_run(n_jobs):
    parallel = Parallel(n_jobs=n_jobs, backend="threading", insights=True,
                        return_as="generator")
    parallel(delayed(abs)(-i) for i in range(5)).close()
    data = parallel.insights.to_dict()
    assert not data["running"] and not data["finished"]



@pytest.mark.timeout(60)
@pytest.mark.parametrize("n_jobs", [1, 2])
def test_a_generator_left_open_at_exit_says_nothing(n_jobs):
    # finalised as the interpreter tears its modules down, an n_jobs=1 call's last
    # record once failed there ("Exception ignored ... NameError: name 'open'")
    code = ("from parmap import Parallel, delayed\n"
            f"g = Parallel(n_jobs={n_jobs}, insights=True, return_as='generator')("
            "delayed(abs)(-i) for i in range(5))\n"
            "next(g)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=50, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]

def test_recycled_workers_are_lanes_of_their_pool_slot():
    """With max_tasks_per_child, the processes that replace one another are one worker
    (its slot), not a worker each: 2 workers, not 6, and the replacements counted."""
    parallel = Parallel(n_jobs=2, insights=True, batch_size=2, max_tasks_per_child=2)
    parallel(delayed(sleeper)(0.02) for _ in range(12))
    data = parallel.insights.to_dict()
    assert data["n_workers"] == 2 and len(data["workers"]) == 2
    assert sum(w["processes"] for w in data["workers"]) == 6
    assert data["startup"]["replaced_workers"] == 4
    assert sum(w["tasks"] for w in data["workers"]) == 12
    for w in data["workers"]:  # (one slot may have run more batches than the other)
        assert re.fullmatch(rf"worker [01] \({w['processes']} procs\)", w["worker"]) or \
            w["processes"] == 1 and w["worker"].startswith("pid ")
    assert "workers replaced 4 time(s)" in str(parallel.insights)


def lanes_of_a_threading_call(_):
    parallel = Parallel(n_jobs=3, backend="threading", insights=True)
    parallel(delayed(sleeper)(0.05) for _ in range(9))
    return sorted(w["worker"] for w in parallel.insights.to_dict()["workers"])


def test_a_threading_call_inside_a_process_worker_has_a_lane_per_thread():
    # its records are made in a pool's process, but the lanes are its threads
    assert Parallel(n_jobs=2)(delayed(lanes_of_a_threading_call)(i) for i in range(1)) == \
        [["parmap-thread-0", "parmap-thread-1", "parmap-thread-2"]]


def test_a_failed_call_keeps_what_completed():
    parallel = Parallel(n_jobs=2, backend="threading", batch_size=1, insights=True)
    with pytest.raises(ZeroDivisionError):
        parallel(delayed(divmod)(1, i) for i in [1, 1, 0])
    data = parallel.insights.to_dict()
    assert not data["finished"] and not data["running"] and data["n_tasks"] <= 2


def test_the_input_generator_and_the_callers_loop_are_timed():
    def slow_input():
        for i in range(6):
            time.sleep(0.02)
            yield delayed(sleeper)(0)

    parallel = Parallel(n_jobs=2, backend="threading", insights=True,
                        return_as="generator")
    for _ in parallel(slow_input()):
        time.sleep(0.01)
    caller = parallel.insights.to_dict()["caller"]
    assert caller["input_s"] >= 0.1 and caller["consumer_s"] >= 0.05
    advice = parallel.insights.to_dict()["advice"]
    assert any("waiting for the input generator" in text for text in advice), advice


def test_insights_with_a_timeout_run_the_tracked_loop():
    parallel = Parallel(n_jobs=2, timeout=30, insights=True, batch_size=2)
    assert parallel(delayed(abs)(-i) for i in range(6)) == list(range(6))
    assert parallel.insights.to_dict()["n_tasks"] == 6


def test_insights_through_parallel_config():
    with parallel_config(insights=True, backend="threading"):
        parallel = Parallel(n_jobs=2)
    parallel(delayed(abs)(i) for i in range(3))
    assert isinstance(parallel.insights, Insights)
    with pytest.raises(TypeError, match="insights must be True or False"):
        Parallel(insights="yes")


# ------------------------------------------------------------------ insights off

def test_insights_off_adds_no_record_and_no_object():
    backend = recording(ThreadingBackend)()
    seen = []
    submit = backend.submit
    backend.submit = lambda batch, callback: (seen.append(batch), submit(batch, callback))
    parallel = Parallel(n_jobs=2, backend=backend)
    assert parallel(delayed(abs)(-i) for i in range(10)) == list(range(10))
    assert parallel.insights is None
    assert seen and all(batch.record is None for batch in seen)


def test_insights_off_sends_no_byte_more():
    batch = Batch(0, [(1,), (2,)], abs)
    plain = protocol.encode_request(batch, False)
    assert len(pickle.loads(plain)) == 7  # the request without insights, as before
    batch.record = BatchRecord()
    observed = protocol.encode_request(batch, False)
    assert pickle.loads(observed)[7] is True

    def reply(request_bytes):
        request = protocol.decode_request(request_bytes)
        status = [0.0, 0.0]
        data, _ = worker._run(request, worker._SharedTracker(status), 0, False,
                              time.monotonic())
        return pickle.loads(data)

    without = reply(plain)
    assert without[:2] == (protocol.OK, [1, 2]) and len(without) == 4
    with_record = reply(observed)
    assert len(with_record) == 5 and with_record[4].n_tasks == 2
    assert pickle.loads(with_record[1]) == [1, 2]


def test_the_reply_record_is_merged_into_the_callers_batch():
    batch = Batch(0, [(-3,)], abs)
    batch.record = record = BatchRecord(submitted=time.time())
    request = protocol.decode_request(protocol.encode_request(batch, False))
    data, _ = worker._run(request, worker._SharedTracker([0.0, 0.0]), 0, False,
                          time.monotonic())
    assert protocol.decode_reply(data, batch, lambda: "the batch") == [3]
    assert record.n_tasks == 1 and record.reply_bytes == len(data)
    assert record.submitted <= record.received <= record.began <= record.ended <= record.sent
    assert record.slowest[0][2:] == (0, "abs(-3)")


def test_memory_reads_this_process():
    rss, peak = memory()
    assert peak is not None and peak > 1024 ** 2
    assert rss is None or rss <= peak


# ------------------------------------------------------------------ advice from figures

def synthetic(n_batches, tasks_per_batch, task_s, gap, *, input_s=0.0, reply_bytes=0,
              workers=2):
    """An Insights whose records describe a run with known shares (no timing involved)."""
    insights = Insights("process", workers, started=1000.0)
    clock = {w: 1000.0 for w in range(workers)}
    for b in range(n_batches):
        w = b % workers
        record = BatchRecord(submitted=clock[w])
        record.pid, record.thread = 10 + w, "MainThread"
        record.received = clock[w] + gap
        record.began = record.received
        record.ended = record.sent = record.began + tasks_per_batch * task_s
        record.n_tasks, record.task_s = tasks_per_batch, tasks_per_batch * task_s
        record.task_cpu_s = record.task_s
        record.hist = {bin_of(task_s): tasks_per_batch}
        record.slowest = [(task_s, task_s, b * tasks_per_batch, f"f({b})")]
        record.reply_bytes = reply_bytes
        clock[w] = record.sent
        insights.add(record)
    insights.ended = max(clock.values())
    insights.finished = True
    insights.input_s = input_s
    return insights


def test_advice_per_batch_overhead_suggests_a_batch_size():
    insights = synthetic(2000, 8, 40e-6, gap=0.6e-3)  # 0.32 ms of work, 0.6 ms lost
    advice = insights.to_dict()["advice"]
    assert re.match(r"Tasks take ~(39\.\d|40\.\d) µs each and each batch of ~8 loses", advice[0])
    assert "per-task overhead is 65 % of the run; batch_size=512 would cut it to ~3 %" \
        in advice[0]


def test_advice_too_little_work_for_workers():
    insights = synthetic(40, 2, 1e-6, gap=1e-3)
    assert "too little to gain from 2 workers" in insights.to_dict()["advice"][0]


def test_advice_slow_input_generator():
    insights = synthetic(20, 1, 0.01, gap=0.04, input_s=0.8)
    advice = insights.to_dict()["advice"]
    assert "waiting for the input generator" in advice[0] and "batch_size" not in advice[0]


def test_advice_big_results():
    insights = synthetic(20, 1, 0.01, gap=0.001, reply_bytes=16 * 1024 ** 2)
    advice = " ".join(insights.to_dict()["advice"])
    assert "Results of 16 MiB each are pickled through a pipe" in advice


def test_advice_when_compute_dominates():
    insights = synthetic(20, 10, 0.01, gap=0.0)
    assert insights.to_dict()["advice"] == [
        "Nothing to change: the workers computed 100 % of the time. Only more cores or "
        "faster tasks would make this run faster."]


# ------------------------------------------------------------------ the picture

def test_plot_writes_a_png_that_matplotlib_reads_back(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    parallel = Parallel(n_jobs=2, backend="threading", batch_size=2, insights=True)
    parallel(delayed(sleeper)(0.002) for _ in range(10))
    path = tmp_path / "run.png"
    figure = parallel.insights.plot(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    pixels = image.imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    assert len(figure.axes) == 2
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert sorted(labels) == ["parmap-thread-0", "parmap-thread-1"]


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    parallel = Parallel(n_jobs=2, backend="threading", insights=True)
    parallel(delayed(abs)(i) for i in range(2))
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'pip install "parmap\[plot\]"'):
        parallel.insights.plot()
