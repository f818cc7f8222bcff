"""Behaviours joblib's own tests expect of ``Parallel`` (found by tests/conformance):
each has a focused regression test here."""
from __future__ import annotations

import os
import re
import sys
import threading
import traceback
import warnings

import pytest

import parmap
from parmap import Parallel, delayed, parallel_config, register_parallel_backend
from parmap._batching import remember
from parmap.backends import _factories
from parmap.backends.threading import ThreadingBackend

joblib_backends = pytest.importorskip("joblib._parallel_backends")


@pytest.mark.parametrize("kind, name", [("ThreadingBackend", "threading"),
                                        ("SequentialBackend", "sequential")])
def test_joblib_builtin_backend_instance_means_parmap_backend(kind, name):
    instance = getattr(joblib_backends, kind)()
    assert Parallel(n_jobs=2, backend=instance)(delayed(abs)(-i) for i in range(4)) == \
        [0, 1, 2, 3]
    with parallel_config(backend=instance):
        assert type(Parallel(n_jobs=2)._backend) is type(Parallel(backend=name)._backend)


def test_custom_joblib_backend_is_refused_with_its_reason():
    class Custom(joblib_backends.ThreadingBackend):
        pass

    with pytest.raises(TypeError, match="Invalid backend: .*joblib backend class"):
        Parallel(backend=Custom())
    register_parallel_backend("custom-joblib", Custom)
    try:
        with pytest.raises(TypeError, match="backend 'custom-joblib' made .* not a parmap"):
            Parallel(backend="custom-joblib")
    finally:
        del _factories["custom-joblib"]


def test_registering_a_joblib_builtin_class_registers_parmap_backend():
    register_parallel_backend("joblib-threads", joblib_backends.ThreadingBackend)
    try:
        backend = Parallel(n_jobs=2, backend="joblib-threads")._backend
        assert isinstance(backend, parmap.ParallelBackendBase) and backend.supports_sharedmem
    finally:
        del _factories["joblib-threads"]


def test_explicit_batch_size_reads_ahead_inline():
    # joblib's test_dispatch_one_job: with one worker, batch_size=k still reads k tasks
    # before running the first of them
    events = []

    def produce():
        for i in range(6):
            events.append(f"P{i}")
            yield i

    Parallel(n_jobs=1, batch_size=4)(delayed(events.append)(f"C{i}") for i in produce())
    assert events == ["P0", "P1", "P2", "P3", "C0", "C1", "C2", "C3", "P4", "P5", "C4", "C5"]


def test_n_jobs_messages_start_with_joblibs_words():
    for zero in (0, 0.5):
        with pytest.raises(ValueError, match="n_jobs == 0 in Parallel has no meaning"):
            Parallel(n_jobs=zero)
    for text in ("2.3", "many"):
        with pytest.raises(ValueError, match="n_jobs could not be converted to int"):
            Parallel(n_jobs=text)
    assert Parallel(n_jobs="2").n_jobs == 2


def test_inconsistent_prefer_and_require_is_a_value_error():
    with pytest.raises(ValueError, match="inconsistent settings"):
        Parallel(prefer="processes", require="sharedmem")
    with pytest.raises(ValueError, match="does not share memory"):
        Parallel(backend="loky", require="sharedmem")
    with parallel_config(prefer="processes"):
        with pytest.raises(ValueError, match="inconsistent settings"):
            Parallel(require="sharedmem")


@pytest.mark.parametrize("n_jobs", [2, 4])
def test_unordered_returns_fastest_first_after_earlier_calls(n_jobs):
    # joblib's test_parallel_unordered_generator_returns_fastest_first, run twice: the
    # second call must not batch the slow task with quick ones from what the first learnt
    release = threading.Event()

    def task(i):
        if i == 1:
            release.wait(30)
        return i

    for _ in range(2):
        results = Parallel(n_jobs=n_jobs, backend="threading",
                           return_as="generator_unordered")(delayed(task)(i)
                                                            for i in range(10))
        try:
            assert sorted(next(results) for _ in range(9)) == [0, 2, 3, 4, 5, 6, 7, 8, 9]
        finally:
            release.set()
        assert list(results) == [1]
        release.clear()


def meet(barrier):
    barrier.wait(timeout=10)  # every task must run at once, each on its own worker
    return threading.get_ident()


def test_n_jobs_tasks_run_at_once_after_an_earlier_call_learnt_they_are_quick():
    # joblib's test_initializer_reused: after an earlier call found the function quick,
    # a generator of n_jobs tasks that wait for each other still gets one batch per
    # worker (the first batch was shared out, and the following ones were not lumped)
    for n_jobs in (2, 4):
        barrier = threading.Barrier(n_jobs)
        idents = Parallel(n_jobs=n_jobs, backend="threading")(
            delayed(meet)(barrier) for _ in range(n_jobs))
        assert len(set(idents)) == n_jobs
    # history says two tasks fill a batch: still one task per worker for 4 workers
    remember(meet, ThreadingBackend.target_batch_duration / 2)
    barrier = threading.Barrier(4)
    idents = Parallel(n_jobs=4, backend="threading")(delayed(meet)(barrier) for _ in range(4))
    assert len(set(idents)) == 4


def environment_variable(name):
    return os.environ.get(name)


def test_workers_see_the_callers_thread_caps_as_they_are_now(monkeypatch):
    # joblib's test_threadpool_limitation_in_child_override: a thread-cap variable set
    # between two calls reaches the workers (the shared pool's workers read them at start,
    # so they are replaced); inner_max_num_threads wins over the caller's value
    def in_workers():
        return Parallel(n_jobs=2)(delayed(environment_variable)("OMP_NUM_THREADS")
                                  for _ in range(2))

    in_workers()  # a shared pool exists already
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert in_workers() == ["4", "4"]
    with parallel_config(inner_max_num_threads=1):
        assert in_workers() == ["1", "1"]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert in_workers() == ["3", "3"]


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_verbose_lines_go_through_print_in_joblibs_words_aligned(n_jobs):
    # joblib's test_parallel_pretty_print: a subclass overriding _print gets every line
    class Logged(Parallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.lines = []

        def _print(self, line):
            self.lines.append(line)

    parallel = Logged(n_jobs=n_jobs, backend="threading", verbose=100)
    parallel([delayed(abs)(i) for i in range(100)])
    spans = [re.search(r"Done\s+\d+ out of \d+ \|", line) for line in parallel.lines]
    assert parallel.lines and all(spans)
    assert len({span.end() - span.start() for span in spans}) == 1
    assert parallel.lines[-1].endswith("finished")


def recurse(depth=0):
    return recurse(depth + 1)


def test_a_recursion_error_in_a_worker_comes_back_as_itself():
    # joblib's test_thread_bomb_mitigation. Up to Python 3.12 its thousand frames cannot be
    # pickled: the exception travels without them, its worker traceback attached as text;
    # 3.13 pickles them (tblib), and they come back as frames
    with pytest.raises(RecursionError) as info:
        Parallel(n_jobs=2)(delayed(recurse)() for _ in range(2))
    cause = info.value.__cause__
    if sys.version_info < (3, 13):
        assert isinstance(cause, parmap.RemoteTraceback) and "in recurse" in str(cause)
    else:
        assert cause is None
        assert "recurse" in [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]


def nested_warnings(backend, n_jobs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Parallel(n_jobs=n_jobs, backend=backend)(delayed(abs)(-i) for i in range(3))
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("child, warns", [("multiprocessing", True), ("loky", True),
                                          ("processes", False), ("threading", False)])
def test_nested_process_requests_below_threads_warn_as_in_joblib(child, warns):
    # joblib's test_nested_parallel_warnings: threads run the nested call; where joblib
    # refuses processes it warns, once per call with more than one worker
    for seen in Parallel(n_jobs=2, backend="threading")(
            delayed(nested_warnings)(child, 2) for _ in range(2)):
        assert len(seen) == warns and all("backed parallel loops cannot" in m for m in seen)
    assert Parallel(n_jobs=2, backend="threading")(
        delayed(nested_warnings)(child, 1) for _ in range(2)) == [[], []]


def test_effective_n_jobs_of_an_instance_as_joblib_code_calls_it():
    # joblib's private Parallel._effective_n_jobs(), which joblib-era code and joblib's
    # own tests call
    assert Parallel(n_jobs=2)._effective_n_jobs() == 2
    assert Parallel(n_jobs=2.3)._effective_n_jobs() == 2
    assert Parallel(n_jobs=-1)._effective_n_jobs() == parmap.cpu_count()
    assert Parallel(n_jobs=4, backend="sequential")._effective_n_jobs() == 1
