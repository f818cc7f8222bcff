"""Behaviours joblib's own tests expect of ``Parallel`` (found by tests/conformance):
each has a focused regression test here."""
from __future__ import annotations

import pytest

import parmap
from parmap import Parallel, delayed, parallel_config, register_parallel_backend
from parmap.backends import _factories

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
