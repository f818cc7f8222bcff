"""scikit-learn and joblib on parmap's pool: ``parmap.joblib`` (issue 13).

Results are compared with joblib's sequential backend: loky, joblib's default, leaves
its own resource tracker process behind, which the leak check would rightly flag.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import pytest

joblib = pytest.importorskip("joblib")
pytest.importorskip("sklearn")

import numpy as np  # noqa: E402
import sklearn  # noqa: E402
from joblib.externals.loky.process_executor import TerminatedWorkerError  # noqa: E402
from sklearn.base import BaseEstimator, ClassifierMixin  # noqa: E402
from sklearn.datasets import load_digits, load_iris  # noqa: E402
from sklearn.ensemble import RandomForestClassifier  # noqa: E402
from sklearn.inspection import permutation_importance  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import (GridSearchCV, KFold, cross_val_score,  # noqa: E402
                                     cross_validate)
from sklearn.svm import SVC  # noqa: E402

import parmap  # noqa: E402
from parmap.joblib import JoblibWorkerCrashedError, register_parmap  # noqa: E402

from .conftest import run_script  # noqa: E402

register_parmap()
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")


def digits(n: int = 450) -> tuple:
    X, y = load_digits(return_X_y=True)
    return X[:n], y[:n]


def on(backend: str, n_jobs: int = 2):
    return joblib.parallel_config(backend=backend, n_jobs=n_jobs)


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError):
                continue
    return found


# --------------------------------------------------------------------------- estimators

class Probe(ClassifierMixin, BaseEstimator):
    """Predicts the majority class; records where and how its fit ran. ``crash_at`` and
    ``raise_at`` are (c, number of training samples) pairs; ``slow`` fits take 30 s."""

    def __init__(self, c=0, crash_at=None, raise_at=None, slow=()):
        self.c = c
        self.crash_at = crash_at
        self.raise_at = raise_at
        self.slow = slow

    def fit(self, X, y):
        if (self.c, len(X)) == self.crash_at:
            os._exit(1)
        if (self.c, len(X)) == self.raise_at:
            raise ValueError(f"Probe cannot fit c={self.c} on {len(X)} samples")
        if self.c in self.slow:
            time.sleep(30)  # long work that the failing call must not wait for
        self.pid_ = os.getpid()
        self.assume_finite_ = sklearn.get_config()["assume_finite"]
        values, counts = np.unique(y, return_counts=True)
        self.classes_, self.majority_ = values, values[np.argmax(counts)]
        return self

    def predict(self, X):
        return np.full(len(X), self.majority_)


def where(_):
    return os.getpid(), threading.get_ident()


class NestedProbe(Probe):
    """Runs joblib and a RandomForest(n_jobs=2) inside its fit, and records what ran."""

    def fit(self, X, y):
        self.inner_ = joblib.Parallel(n_jobs=2)(joblib.delayed(where)(i) for i in range(8))
        self.forest_ = RandomForestClassifier(n_estimators=4, n_jobs=2,
                                              random_state=0).fit(X, y)
        self.children_ = children_of(os.getpid())
        from threadpoolctl import threadpool_info

        self.thread_pools_ = [(p["internal_api"], p["num_threads"]) for p in threadpool_info()]
        return super().fit(X, y)


# --------------------------------------------------------------------------- imports

def test_import_parmap_does_not_import_joblib():
    code = ("import sys, parmap; print(sorted(m for m in sys.modules if m.split('.')[0] "
            "in ('joblib', 'sklearn'))); import parmap.joblib; print('joblib' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=30, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "True"]


# --------------------------------------------------------------------------- same results

def test_grid_search_matches_sequential_and_runs_in_workers():
    X, y = digits()
    grid = {"C": [1, 10, 100], "gamma": [1e-3, 1e-4]}
    fits = {}
    for backend in ("sequential", "parmap"):
        with on(backend):
            fits[backend] = GridSearchCV(SVC(), grid, cv=3).fit(X, y)
    ours, ref = fits["parmap"].cv_results_, fits["sequential"].cv_results_
    for key in ["params", "rank_test_score"] + [f"split{i}_test_score" for i in range(3)]:
        assert list(ours[key]) == list(ref[key]), key
    assert fits["parmap"].best_params_ == fits["sequential"].best_params_
    with on("parmap"):
        probes = cross_validate(Probe(), X, y, cv=3, return_estimator=True)["estimator"]
    assert {p.pid_ for p in probes}.isdisjoint({os.getpid()})


def test_cross_val_score_matches_sequential():
    X, y = load_iris(return_X_y=True)
    scores = {}
    for backend in ("sequential", "parmap"):
        with on(backend):
            scores[backend] = cross_val_score(LogisticRegression(max_iter=500), X, y, cv=5)
    assert np.array_equal(scores["parmap"], scores["sequential"])


def test_random_forest_with_n_jobs_inside_grid_search_matches_sequential():
    X, y = digits(300)
    search = {}
    for backend in ("sequential", "parmap"):
        with on(backend):
            search[backend] = GridSearchCV(
                RandomForestClassifier(n_estimators=10, n_jobs=2, random_state=0),
                {"max_depth": [4, None]}, cv=3).fit(X, y)
    assert np.array_equal(search["parmap"].cv_results_["mean_test_score"],
                          search["sequential"].cv_results_["mean_test_score"])
    assert np.array_equal(search["parmap"].predict(X), search["sequential"].predict(X))


def test_permutation_importance_matches_sequential():
    X, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500).fit(X, y)
    result = {}
    for backend in ("sequential", "parmap"):
        with on(backend):
            result[backend] = permutation_importance(model, X, y, n_repeats=4,
                                                     random_state=0, n_jobs=2)
    assert np.array_equal(result["parmap"].importances, result["sequential"].importances)


def test_plain_joblib_calls_in_every_return_mode():
    tasks = [joblib.delayed(pow)(i, 2) for i in range(50)]
    with on("parmap"):
        assert joblib.Parallel()(tasks) == [i * i for i in range(50)]
        assert list(joblib.Parallel(return_as="generator")(tasks)) == [i * i for i in range(50)]
        unordered = joblib.Parallel(return_as="generator_unordered")(tasks)
        assert sorted(unordered) == [i * i for i in range(50)]
    with on("parmap", n_jobs=1):  # one job: joblib runs the tasks in the caller
        assert joblib.Parallel()(joblib.delayed(where)(i) for i in range(2))[0][0] == os.getpid()


def slow_square(i):
    time.sleep(0.05)
    return i * i


def test_a_call_made_while_a_generator_of_another_is_unfinished():
    # joblib gives every Parallel of a parallel_config block the same backend object:
    # the inner call's end released the pool under the outer call, whose next batch
    # failed ("submit called before configure"); loky hangs here
    def squares(n, f=pow):
        return (joblib.delayed(f)(i, 2) if f is pow else joblib.delayed(f)(i)
                for i in range(n))

    with on("parmap"):
        outer = joblib.Parallel(return_as="generator", pre_dispatch="2*n_jobs",
                                batch_size=1)(squares(20, slow_square))
        first = next(outer)  # 20 tasks of 50 ms on 2 workers: most are not sent yet
        inner = joblib.Parallel()(joblib.delayed(pow)(-i, 3) for i in range(5))
        assert [first, *outer] == [i * i for i in range(20)]
        assert inner == [-i ** 3 for i in range(5)]
        # a loop that makes a call per result, and two generators read side by side
        loop = [(x, sum(joblib.Parallel()(joblib.delayed(pow)(j, 1) for j in range(x))))
                for x in joblib.Parallel(return_as="generator")(
                    joblib.delayed(pow)(i, 1) for i in range(6))]
        assert loop == [(i, sum(range(i))) for i in range(6)]
        left = joblib.Parallel(return_as="generator")(squares(20))
        right = joblib.Parallel(return_as="generator")(squares(20))
        assert list(zip(left, right)) == [(i * i, i * i) for i in range(20)]
        assert joblib.Parallel()(squares(20)) == [i * i for i in range(20)]


class TwoJobs(parmap.joblib.ParmapBackend):
    def effective_n_jobs(self, n_jobs):
        return 2  # a subclass's override: the twin made for a second call keeps it


def test_the_backend_of_a_second_call_keeps_the_subclass_and_a_failed_call_holds_nothing():
    joblib.register_parallel_backend("parmap-test-subclass", TwoJobs)
    with joblib.parallel_config(backend="parmap-test-subclass", n_jobs=5):
        outer_call = joblib.Parallel(return_as="generator")
        outer = outer_call(joblib.delayed(slow_square)(i) for i in range(8))
        next(outer)
        inner = joblib.Parallel()
        assert inner(joblib.delayed(pow)(i, 2) for i in range(4)) == [0, 1, 4, 9]
        assert type(inner._backend) is TwoJobs and inner._backend is not outer_call._backend
        assert list(outer) == [i * i for i in range(1, 8)]
        # a call that fails before its output exists never calls terminate(): it must
        # not keep the pool (an idle pool would never shut down) nor the backend
        failed = joblib.Parallel()
        with pytest.raises(TypeError, match="not iterable"):
            failed(5)
        later = joblib.Parallel()
        assert later(joblib.delayed(pow)(i, 2) for i in range(4)) == [0, 1, 4, 9]
        assert later._backend is failed._backend
    from parmap.process import registry

    assert all(pool.active_calls == 0 for pool in registry._shared)


# --------------------------------------------------------------------------- scikit-learn

def test_sklearn_config_reaches_the_workers():
    X, y = digits(150)
    for flag in (True, False):
        with sklearn.config_context(assume_finite=flag), on("parmap"):
            probes = cross_validate(Probe(), X, y, cv=3, return_estimator=True)["estimator"]
        assert [p.assume_finite_ for p in probes] == [flag] * 3
        assert os.getpid() not in {p.pid_ for p in probes}


@linux_only
@pytest.mark.parametrize("start_method", [None, "forkserver"])  # forked workers inherit
def test_nested_parallel_calls_stay_in_the_worker_within_its_cpu_share(start_method):
    X, y = digits(150)  # the caller's joblib settings; forkserver ones start afresh
    share = max(parmap.cpu_count() // 2, 1)
    with joblib.parallel_config(backend="parmap", n_jobs=2, start_method=start_method):
        probes = cross_validate(NestedProbe(), X, y, cv=3, return_estimator=True)["estimator"]
    for probe in probes:
        pids = {pid for pid, _ in probe.inner_}
        assert pids == {probe.pid_} and probe.pid_ != os.getpid()  # no new processes
        assert len({thread for _, thread in probe.inner_}) <= share
        assert probe.children_ == []
        assert probe.thread_pools_ and all(n <= share for _, n in probe.thread_pools_)


NAMED_IN_A_TASK = """
import os, sys, joblib
import parmap.joblib

parmap.joblib.register_parmap()  # in the caller only: the tasks go by value

def inner(i):
    return os.getpid(), joblib.Parallel(n_jobs=2, backend="parmap")(
        joblib.delayed(abs)(-j) for j in range(4))

with joblib.parallel_config(backend="parmap", n_jobs=2, start_method=sys.argv[1]):
    out = joblib.Parallel()(joblib.delayed(inner)(i) for i in range(2))
print([results for _, results in out], os.getpid() in {pid for pid, _ in out})
"""


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
@pytest.mark.timeout(60)
def test_a_task_may_name_the_bridge_in_a_worker_that_was_not_forked(start_method):
    # a forked worker inherits the caller's registration; a forkserver's did not know the
    # name: "ValueError: Invalid backend: parmap"
    out = run_script(NAMED_IN_A_TASK, timeout=50, args=(start_method,))
    assert out == "[[0, 1, 2, 3], [0, 1, 2, 3]] False\n"


USERS_OWN_THREAD_COUNT = """
import os
os.environ["OPENBLAS_NUM_THREADS"] = "3"  # the user's own, before numpy loads OpenBLAS
import joblib, numpy
from threadpoolctl import threadpool_info
import parmap.joblib

parmap.joblib.register_parmap()

def openblas_threads(_):
    return sorted({pool["num_threads"] for pool in threadpool_info()
                   if pool["internal_api"] == "openblas"})

with joblib.parallel_config(backend="parmap", n_jobs=2):
    print(joblib.Parallel()(joblib.delayed(openblas_threads)(i) for i in range(2)))
"""


@linux_only
@pytest.mark.timeout(60)
def test_the_users_own_thread_count_wins_in_every_library_of_a_worker():
    # as with loky; the OpenBLAS loaded before the workers started was capped at
    # cpu_count() // n_jobs, while a library a task loaded later read the user's value
    assert run_script(USERS_OWN_THREAD_COUNT, timeout=50) == "[[3], [3]]\n"


@linux_only
@pytest.mark.parametrize("threads", [None, 2])
def test_openmp_in_workers_after_the_caller_used_it(threads):
    """GNU OpenMP hangs or crashes a forked child once the parent ran an OpenMP region,
    unless the child keeps to one thread (threads=None here: one CPU per worker) or
    the workers are not forked (threads=2: forkserver)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    X, y = digits(300)
    model = HistGradientBoostingClassifier(max_iter=5, random_state=0)
    model.fit(X, y)  # the caller's OpenMP threads now exist
    scores = {}
    for backend in ("sequential", "parmap"):
        with joblib.parallel_config(backend=backend, n_jobs=2, inner_max_num_threads=threads
                                    if backend == "parmap" else None):
            scores[backend] = cross_val_score(model, X, y, cv=3)
    assert np.array_equal(scores["parmap"], scores["sequential"])


# --------------------------------------------------------------------------- failures

def test_worker_crash_fails_the_call_fast_and_the_pool_carries_on():
    X, y = digits(151)  # KFold(3) trains on 100 samples in the first fold, then 101
    grid = {"c": [0, 1, 2, 3]}  # task 3 (c=1, first fold) crashes; c=2, 3 take 30 s
    t0 = time.monotonic()
    with on("parmap"), pytest.raises(TerminatedWorkerError) as info:
        GridSearchCV(Probe(crash_at=(1, 100), slow=(2, 3)), grid, cv=KFold(3)).fit(X, y)
    assert time.monotonic() - t0 < 2.0
    err = info.value
    assert isinstance(err, parmap.WorkerCrashedError) and isinstance(err, JoblibWorkerCrashedError)
    assert err.task_indices == (3,) and err.exitcode == 1
    assert "exit code 1 while running task 3 (_fit_and_score(" in str(err)
    with on("parmap"):
        search = GridSearchCV(SVC(), {"C": [1, 10]}, cv=3).fit(*digits(300))
    with on("sequential"):
        expected = GridSearchCV(SVC(), {"C": [1, 10]}, cv=3).fit(*digits(300))
    assert np.array_equal(search.cv_results_["mean_test_score"],
                          expected.cv_results_["mean_test_score"])


def test_value_error_in_fit_reaches_the_caller_with_the_worker_traceback():
    X, y = digits(151)  # KFold(3): only task 3 (c=1, first fold) trains on 100 samples
    with on("parmap"), pytest.raises(ValueError, match="cannot fit c=1 on 100") as info:
        GridSearchCV(Probe(raise_at=(1, 100)), {"c": [0, 1]}, cv=KFold(3),
                     error_score="raise").fit(X, y)
    text = "".join(traceback.format_exception(type(info.value), info.value,
                                              info.value.__traceback__))
    assert 'raise ValueError(f"Probe cannot fit c={self.c} on {len(X)} samples")' in text
    assert "in fit" in text and __file__ in text  # the worker's frames
    assert any("task 3: _fit_and_score(" in note for note in info.value.__notes__)


def raise_from(x):
    try:
        {0: 0, 1: 1, 2: 2}[x]
    except KeyError as exc:
        raise ValueError(f"no entry for {x}") from exc


def test_an_error_raised_from_another_keeps_the_frames_that_raised_it():
    with on("parmap"), pytest.raises(ValueError, match="no entry for 3") as info:
        joblib.Parallel()(joblib.delayed(raise_from)(i) for i in range(4))
    text = "".join(traceback.format_exception(type(info.value), info.value,
                                              info.value.__traceback__))
    assert 'raise ValueError(f"no entry for {x}") from exc' in text  # the worker's line
    assert "KeyError: 3" in text  # and the cause's


def test_timeout_names_the_task_and_stops_its_worker():
    # joblib times the wait for each result, in order: task 1 holds it back for 0.5 s
    # after task 2 started, so parmap's own timer (per task, naming it) fires first
    with on("parmap"), pytest.raises(multiprocessing.TimeoutError,
                                     match=r"task 2 \(sleep\(30\)\)") as info:
        joblib.Parallel(timeout=1.0, batch_size=1)(
            joblib.delayed(time.sleep)(s) for s in [0, 0.5, 30, 0])
    assert isinstance(info.value, parmap.TaskTimeoutError)
    with on("parmap"):
        assert joblib.Parallel()(joblib.delayed(abs)(-i) for i in range(4)) == [0, 1, 2, 3]


def test_unpicklable_argument_is_named():
    with on("parmap"), pytest.raises(parmap.SerializationError, match="argument 1 of task 0"):
        joblib.Parallel()(joblib.delayed(pow)(2, threading.Lock()) for _ in range(3))


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="'spam'"):
        with on("parmap"):
            joblib.Parallel(spam=1)(joblib.delayed(abs)(i) for i in range(2))
    with pytest.raises(ValueError, match="idle_timeout"):
        joblib.parallel_config(backend="parmap", idle_timeout=-1)
    with pytest.raises(TypeError, match="name"):
        register_parmap("")


# --------------------------------------------------------------------------- large data

def writeable_and_sum(a):
    return bool(a.flags.writeable), float(a.sum())


def test_large_arrays_travel_through_shared_memory_not_pickles():
    from sklearn.utils.parallel import Parallel, delayed  # what scikit-learn calls with

    big = np.arange(300_000, dtype=np.float64)  # 2.4 MB: above joblib's 1M max_nbytes
    with on("parmap"):
        for _ in range(2):  # a cold pool (forked workers inherit it), then a warm one
            placed = Parallel()(delayed(writeable_and_sum)(big) for _ in range(4))
            assert placed == [(False, float(big.sum()))] * 4  # read-only views, not copies
        pickled = joblib.Parallel(max_nbytes=None)(
            joblib.delayed(writeable_and_sum)(big) for _ in range(4))
    assert pickled == [(True, float(big.sum()))] * 4


# --------------------------------------------------------------------------- signals

SCRIPT = textwrap.dedent("""
    import os, sys, time
    import joblib, parmap.joblib

    def task(seconds):
        if seconds > 1:
            print("started", os.getpid(), flush=True)
        time.sleep(seconds)
        return os.getpid()

    parmap.joblib.register_parmap()
    with joblib.parallel_config(backend="parmap", n_jobs=2):
        try:
            joblib.Parallel(batch_size=1)(joblib.delayed(task)(s) for s in [0, 0] + [60] * 20)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(42)
""")


def _start_script(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            text=True, env=env)
    workers = {int(proc.stdout.readline().split()[1]) for _ in range(2)}  # both running
    return proc, workers


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def _wait_gone(pids, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if not _gone(pid)]
        if not alive:
            return []
        time.sleep(0.05)  # polling other processes' state, not synchronising ours
    return alive


@linux_only
def test_ctrl_c_stops_the_call_promptly_and_its_workers(tmp_path):
    proc, workers = _start_script(tmp_path)
    try:
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 42 and "interrupted" in out
    assert elapsed < 2.0
    assert _wait_gone(workers, 2.0) == []


@linux_only
def test_workers_die_with_their_parent(tmp_path):
    proc, workers = _start_script(tmp_path)
    proc.kill()
    proc.communicate()
    assert _wait_gone(workers, 5.0) == []


def fails_at_2(x):
    if x == 2:
        raise ValueError("bad")
    return x


@pytest.mark.parametrize("return_as", ["list", "generator"])
def test_a_joblib_parallel_reused_after_a_failed_call_returns_its_own_results(return_as):
    # joblib 1.6 keeps the batches a failed call read ahead, and sends them first in
    # the next call of the same Parallel: parmap's backend drops them as a call starts
    wrong = []
    with joblib.parallel_config(backend="parmap"):
        parallel = joblib.Parallel(n_jobs=2, return_as=return_as)
        for _ in range(10):
            with pytest.raises(ValueError):
                list(parallel(joblib.delayed(fails_at_2)(i) for i in range(10)))
            out = sorted(parallel(joblib.delayed(abs)(-i) for i in range(3)))
            if out != [0, 1, 2]:
                wrong.append(out)
    assert wrong == []
