"""parallel_config, the backend registry, cpu_count, verbose output, the public API."""
from __future__ import annotations

import os
import threading

import pytest

import parmap
from parmap import (Parallel, ParallelBackendBase, delayed, parallel_backend, parallel_config,
                    register_parallel_backend)
from parmap._cpu import cgroup_cpu_limit, physical_core_count
from parmap._settings import get_config
from parmap.backends import _factories

from .conftest import run_script, twice_at_once

DOCUMENTED_API = {
    "Parallel", "delayed", "parallel_config", "parallel_backend", "register_parallel_backend",
    "effective_n_jobs", "cpu_count", "ParallelBackendBase", "ParmapError", "PoolError",
    "WorkerCrashedError", "TerminatedWorkerError", "TaskTimeoutError", "SerializationError",
    "RemoteTaskError", "RemoteTraceback", "shared_array", "worker_state", "worker_id",
}


def test_public_api_is_what_the_docs_promise():
    assert set(parmap.__all__) == DOCUMENTED_API
    assert parmap.Parallel.__module__ == "parmap"
    assert parmap.TerminatedWorkerError is parmap.WorkerCrashedError


PUBLIC_NAMES = """
import importlib, pickle, sys, parmap
assert "parmap._parallel" not in sys.modules  # nothing of the front end yet
from parmap._errors import WorkerCrashedError  # reached without going through parmap.X
error = pickle.loads(pickle.dumps(WorkerCrashedError("x")))
print(f"{type(error).__module__}.{type(error).__qualname__}: {error}")
for name in parmap.__all__:
    obj = getattr(importlib.import_module(parmap._LAZY[name]), name)
    assert obj.__module__ == "parmap", (name, obj.__module__)
    assert pickle.loads(pickle.dumps(obj)) is obj, name
print([name for name in dir(parmap) if not name.startswith("__")] == sorted(parmap.__all__))
"""


def test_public_names_show_as_parmap_however_they_were_imported():
    # the package resolves them on first use (PEP 562); their module is 'parmap' from
    # the start, for tracebacks and pickles
    assert set(parmap._LAZY) == set(parmap.__all__)
    out = run_script(PUBLIC_NAMES, timeout=60)
    assert out.splitlines() == ["parmap.WorkerCrashedError: x", "True"], out


def test_config_is_undone_on_exit():
    before = get_config()
    with parallel_config(backend="threading", n_jobs=3, verbose=2) as config:
        assert get_config()["n_jobs"] == 3
        assert config.settings["backend"] == "threading"
        with parallel_config(n_jobs=5):
            assert get_config()["n_jobs"] == 5
            assert get_config()["backend"] == "threading"  # inherited
        assert get_config()["n_jobs"] == 3
    assert get_config() == before


def test_config_is_per_thread():
    seen = {}

    def other():
        seen["n_jobs"] = get_config()["n_jobs"]

    with parallel_config(n_jobs=4):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert seen["n_jobs"] is None


def test_config_reaches_tasks_run_by_threads():
    with parallel_config(verbose=0, n_jobs=2, inner_max_num_threads=3):
        out = Parallel(backend="threading")(
            delayed(lambda: get_config()["inner_max_num_threads"])() for _ in range(4))
    assert out == [3] * 4


def test_legacy_parallel_backend_alias():
    with parallel_backend("threading"):
        parallel = Parallel()
        assert parallel.n_jobs == -1
        assert type(parallel._backend).__name__ == "ThreadingBackend"


def test_register_custom_backend():
    calls = []

    class Custom(ParallelBackendBase):
        def submit(self, batch, callback):
            calls.append(len(batch))
            callback(batch())

    register_parallel_backend("custom-test", Custom)
    try:
        with parallel_config(backend="custom-test", n_jobs=2):
            assert Parallel()(delayed(abs)(-i) for i in range(5)) == [0, 1, 2, 3, 4]
        assert sum(calls) == 5
    finally:
        del _factories["custom-test"]


def test_register_rejects_bad_arguments():
    with pytest.raises(TypeError, match="name"):
        register_parallel_backend("", ParallelBackendBase)
    with pytest.raises(TypeError, match="factory"):
        register_parallel_backend("x", 3)


def test_backend_base_requires_submit():
    with pytest.raises(TypeError, match="submit"):
        ParallelBackendBase()


def test_cpu_count_respects_affinity():
    n = parmap.cpu_count()
    assert 1 <= n <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert n <= len(os.sched_getaffinity(0))
    assert 1 <= parmap.cpu_count(only_physical_cores=True) <= n


def _tree(tmp_path, files):
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(tmp_path)


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"sub/cpu.max": "50000 100000\n"}, 0.5),
    ({}, None),
])
def test_cgroup_quota(tmp_path, files, expected):
    root = _tree(tmp_path / "cg", files)
    proc = tmp_path / "cgroup"
    proc.write_text("0::/sub\n")
    assert cgroup_cpu_limit(root, str(proc)) == expected


def test_physical_cores_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    blocks = [f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i % 2}\n" for i in range(4)]
    info.write_text("\n".join(blocks))
    assert physical_core_count(str(info)) == 2
    assert physical_core_count(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_verbose_reports_progress_on_stderr(capsys, n_jobs):
    Parallel(n_jobs=n_jobs, backend="threading", verbose=10, batch_size=5)(
        delayed(abs)(i) for i in range(20))
    err = capsys.readouterr().err
    assert "Done  20 out of  20 | elapsed: " in err and "finished" in err
    if n_jobs == 2:
        assert "Done   5 out of  20" not in err or "remaining" in err


def test_verbose_above_50_goes_to_stdout(capsys):
    Parallel(n_jobs=2, backend="threading", verbose=60)(delayed(abs)(i) for i in range(5))
    captured = capsys.readouterr()
    assert "Done   5 out of   5" in captured.out and captured.err == ""


def test_verbose_zero_is_silent(capsys):
    Parallel(n_jobs=2, backend="threading")(delayed(abs)(i) for i in range(5))
    assert capsys.readouterr() == ("", "")


def test_two_threads_making_the_first_parallel_at_once_both_succeed(monkeypatch):
    # the checked defaults, made on first use, were seen half made by the other thread:
    # KeyError('verbose') in 57 of 200 tries with a tiny switch interval
    from parmap import _settings

    for outcomes in twice_at_once(
            lambda: Parallel(n_jobs=2),
            lambda: monkeypatch.setattr(_settings, "_CHECKED_DEFAULT", {})):
        assert len(outcomes) == 2 and all(isinstance(o, Parallel) for o in outcomes), outcomes



def test_an_input_read_by_a_worker_thread_sees_the_callers_settings():
    # the threading backend's threads read the input as they finish a batch: there the
    # generator ran in an empty context, without the caller's parallel_config
    seen = []

    def tasks():
        for i in range(200):
            seen.append((threading.current_thread() is threading.main_thread(),
                         get_config()["n_jobs"]))
            yield delayed(abs)(i)

    with parallel_config(n_jobs=3):
        Parallel(backend="threading", batch_size=1)(tasks())
    assert {n_jobs for _, n_jobs in seen} == {3}
    assert not all(in_caller for in_caller, _ in seen)  # (threads did read some)
