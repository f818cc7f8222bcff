"""Large numpy arrays to and from process workers through shared memory (parmap.process.shm)."""
from __future__ import annotations

import mmap
import os
import stat
import sys

import numpy as np
import pytest

import parmap._shm_files as shm_files
import parmap.process.shm as shm
from parmap.process.pool import WorkerPool
from parmap import Parallel, SerializationError, WorkerCrashedError, delayed, parallel_config

from .conftest import shm_entries

MB = 1024 ** 2
BIG = 2 * MB // 8  # float64 elements in a 2 MiB array: above the default 1M threshold


def big(value=1.0, n=BIG):
    return np.full(n, value)


def describe(arr):
    """How an argument arrived in the worker: mapped from a file, or unpickled."""
    return {"mapped": isinstance(_root(arr).base, mmap.mmap), "writeable": arr.flags.writeable,
            "sum": float(arr.sum()), "shape": arr.shape}


def _root(arr):
    while isinstance(arr.base, np.ndarray):
        arr = arr.base
    return arr


def describe_all(*args, **kwargs):
    found = []

    def walk(obj):
        if isinstance(obj, np.ndarray):
            found.append(describe(obj))
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                walk(item)

    walk(args)
    walk(kwargs)
    return found


_REAL_WILL_FORK = WorkerPool.will_fork


@pytest.fixture(autouse=True)
def no_inheritance(monkeypatch):
    """Most tests here are about placement in shared memory: keep arrays from being
    inherited by a cold pool's forked workers (tests of inheritance undo this)."""
    monkeypatch.setattr(WorkerPool, "will_fork", lambda self: False)


# ---------------------------------------------------------------------- arguments

def test_large_argument_is_mapped_read_only_and_placed_once(count_placements):
    arr = big(2.0)
    out = Parallel(n_jobs=2)(delayed(describe)(arr) for _ in range(6))
    assert all(d == {"mapped": True, "writeable": False, "sum": 2.0 * BIG,
                     "shape": (BIG,)} for d in out)
    assert count_placements == [arr.nbytes]
    np.testing.assert_array_equal(arr, big(2.0))  # the caller's array is intact
    assert arr.flags.writeable


def test_arrays_inside_lists_tuples_dicts_and_keywords_are_mapped(count_placements):
    a, b, c = big(1.0), big(2.0), big(3.0)
    out = Parallel(n_jobs=2)(
        delayed(describe_all)([a, (b,)], {"k": c}, small=np.ones(3), key=a)
        for _ in range(2))
    for found in out:
        assert [d["mapped"] for d in found] == [True, True, True, False, True]
        assert [d["sum"] for d in found] == [BIG, 2.0 * BIG, 3.0 * BIG, 3.0, BIG]
    assert len(count_placements) == 3  # `a` twice per task, in two tasks: one file


def slice_sum(arr):
    return float(arr.sum()), arr.shape, isinstance(_root(arr).base, mmap.mmap)


def test_views_of_one_array_share_its_placement(count_placements):
    base = np.arange(4 * BIG, dtype=np.float64).reshape(4, BIG)
    views = [base[1], base[:, 10:], base[::2, ::3], base.T, base[2:, BIG // 2:]]
    out = Parallel(n_jobs=2, max_nbytes="100K")(delayed(slice_sum)(v) for v in views)
    assert out == [(float(v.sum()), v.shape, True) for v in views]
    assert count_placements == [base.nbytes]


def test_foreign_buffer_and_non_contiguous_root_are_copied_correctly():
    raw = bytearray(np.arange(BIG, dtype=np.float64).tobytes())
    foreign = np.frombuffer(raw, dtype=np.float64)
    strided = np.asfortranarray(np.arange(2 * BIG, dtype=np.float64).reshape(2, BIG))
    out = Parallel(n_jobs=2)(delayed(slice_sum)(x) for x in (foreign, strided, strided[1]))
    assert out == [(float(x.sum()), x.shape, True) for x in (foreign, strided, strided[1])]


def test_small_and_object_arrays_are_pickled(count_placements):
    objects = np.empty(BIG, dtype=object)
    objects[:] = 1
    out = Parallel(n_jobs=2)(delayed(describe)(x) for x in (np.ones(10), objects))
    assert [d["mapped"] for d in out] == [False, False]
    assert [d["writeable"] for d in out] == [True, True]
    assert count_placements == []


@pytest.mark.parametrize("settings", [{"max_nbytes": None}, {"mmap_mode": None}])
def test_sharing_can_be_disabled(settings, count_placements):
    out = Parallel(n_jobs=2, **settings)(delayed(describe)(big()) for _ in range(2))
    assert [d["mapped"] for d in out] == [False, False]
    assert count_placements == []


def test_max_nbytes_from_parallel_config(count_placements):
    with parallel_config(max_nbytes="4M"):
        out = Parallel(n_jobs=2)(delayed(describe)(big()) for _ in range(2))
    assert [d["mapped"] for d in out] == [False, False]
    with parallel_config(max_nbytes="1K"):
        out = Parallel(n_jobs=2)(delayed(describe)(np.ones(1000)) for _ in range(2))
    assert [d["mapped"] for d in out] == [True, True]


def identity(x):
    return x


@pytest.mark.parametrize("backend", ["sequential", "threading"])
def test_in_process_backends_pass_arrays_untouched(backend, count_placements):
    arr = big()
    out = Parallel(n_jobs=2, backend=backend)(delayed(identity)(arr) for _ in range(3))
    assert all(x is arr for x in out)
    assert count_placements == []


def write_into(arr, i):
    arr[i] = -1.0
    return float(arr[i])


def test_read_only_mode_refuses_writes():
    with pytest.raises(ValueError, match="read-only"):
        Parallel(n_jobs=2)(delayed(write_into)(big(), i) for i in range(2))


def test_copy_on_write_mode_leaves_the_caller_unchanged():
    arr = big()
    assert Parallel(n_jobs=2, mmap_mode="c")(delayed(write_into)(arr, i)
                                             for i in range(4)) == [-1.0] * 4
    assert float(arr.sum()) == BIG


def test_memmap_is_sent_by_reference_and_r_plus_writes_reach_the_file(tmp_path,
                                                                     count_placements):
    path = tmp_path / "data.bin"
    mm = np.memmap(path, dtype=np.float64, mode="w+", shape=(3 * BIG,), offset=24)
    mm[:] = 1.0
    mm.flush()
    view = mm[BIG:]  # a view at an offset into the mapping: still a file reference
    out = Parallel(n_jobs=2, mmap_mode="r+")(delayed(write_into)(view, i) for i in range(4))
    assert out == [-1.0] * 4
    assert count_placements == []
    reread = np.memmap(path, dtype=np.float64, mode="r", shape=(3 * BIG,), offset=24)
    assert list(reread[BIG:BIG + 5]) == [-1.0] * 4 + [1.0]
    assert float(reread[:BIG].sum()) == BIG
    del mm, view, reread


def test_small_memmap_is_still_a_reference(tmp_path, count_placements):
    mm = np.memmap(tmp_path / "small.bin", dtype=np.int32, mode="w+", shape=(10,))
    mm[:] = 7
    out = Parallel(n_jobs=2)(delayed(slice_sum)(mm[i:]) for i in range(3))
    assert out == [(7.0 * (10 - i), (10 - i,), True) for i in range(3)]
    assert count_placements == []
    del mm


def list_folder(path):
    """(path relative to `path`, permission bits, is a folder) of everything under it."""
    found = []
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            found.append((os.path.relpath(full, path), stat.S_IMODE(os.stat(full).st_mode),
                          os.path.isdir(full)))
    return sorted(found)


def test_temp_folder_argument_holds_private_files_and_is_emptied(tmp_path):
    arr = big()
    listings = Parallel(n_jobs=2, temp_folder=str(tmp_path))(
        delayed(lambda a, p: list_folder(p))(arr, str(tmp_path)) for _ in range(2))
    for listing in listings:
        (folder, folder_mode, is_dir), (file, file_mode, file_is_dir) = listing
        assert is_dir and folder_mode == 0o700
        assert folder.startswith(f"parmap_{os.getpid()}_")
        assert not file_is_dir and file_mode == 0o600 and file.startswith(folder + os.sep)
    assert os.listdir(tmp_path) == []


def test_environment_variable_sets_the_temp_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PARMAP_TEMP_FOLDER", str(tmp_path))
    arr = big()
    out = Parallel(n_jobs=2)(delayed(lambda a, p: len(os.listdir(p)))(arr, str(tmp_path))
                             for _ in range(2))
    assert out == [1, 1]
    assert os.listdir(tmp_path) == []


def test_small_dev_shm_falls_back_to_the_temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(shm_files, "SHM_MARGIN", 1 << 62)  # as if /dev/shm were nearly full
    monkeypatch.setattr(shm.tempfile, "gettempdir", lambda: str(tmp_path))
    before = shm_entries()
    arr = big()
    out = Parallel(n_jobs=2)(delayed(lambda a, p: (describe(a)["mapped"], len(os.listdir(p))))
                             (arr, str(tmp_path)) for _ in range(2))
    assert out == [(True, 1), (True, 1)]
    assert shm_entries() == before
    assert os.listdir(tmp_path) == []


def test_stale_folder_of_a_dead_caller_is_swept(tmp_path):
    stale = tmp_path / "parmap_999999999_abc"  # no such pid
    stale.mkdir()
    (stale / "data").write_bytes(b"x")
    Parallel(n_jobs=2, temp_folder=str(tmp_path))(delayed(describe)(big()) for _ in range(2))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_other_start_methods_share_both_ways(method):
    arr = big(3.0)
    out = Parallel(n_jobs=2, start_method=method)(delayed(scaled)(arr, 2.0) for _ in range(2))
    for result in out:
        assert isinstance(result.base, mmap.mmap)
        assert float(result.sum()) == 6.0 * BIG


# ---------------------------------------------------------------------- results

def scaled(arr, factor):
    return arr * factor


def make(i, n=BIG):
    return np.full(n, float(i))


def test_large_results_come_back_through_shared_memory():
    out = Parallel(n_jobs=2)(delayed(make)(i) for i in range(8))
    assert shm_entries() == set()  # each file is unlinked as soon as it is mapped
    for i, result in enumerate(out):
        assert type(result) is np.ndarray
        assert isinstance(result.base, mmap.mmap)
        assert result.flags.writeable and result.flags.c_contiguous
        assert result.shape == (BIG,) and float(result.sum()) == i * BIG
    out[3][:] = 0  # an ordinary, writeable array
    assert float(out[3].sum()) == 0


def shapes(i):
    grid = np.arange(BIG * 2, dtype=np.int32).reshape(2, BIG)
    return {"f": np.asfortranarray(grid), "t": (grid[:, ::2], np.ones(3)), "i": i}


def test_nested_and_non_contiguous_results():
    out = Parallel(n_jobs=2, max_nbytes="100K")(delayed(shapes)(i) for i in range(3))
    grid = np.arange(BIG * 2, dtype=np.int32).reshape(2, BIG)
    for i, result in enumerate(out):
        np.testing.assert_array_equal(result["f"], grid)
        np.testing.assert_array_equal(result["t"][0], grid[:, ::2])
        assert isinstance(result["f"].base, mmap.mmap) and result["f"].dtype == np.int32
        assert not isinstance(result["t"][1].base, mmap.mmap)
        assert result["i"] == i


def test_small_object_and_disabled_results_are_pickled():
    objects = np.empty(BIG, dtype=object)
    out = Parallel(n_jobs=2)(delayed(identity)(x) for x in (np.ones(4), objects))
    assert not any(isinstance(r.base, mmap.mmap) for r in out)
    out = Parallel(n_jobs=2, max_nbytes=None)(delayed(make)(i) for i in range(2))
    assert not any(isinstance(r.base, mmap.mmap) for r in out)


def test_generator_results_are_shared_and_released():
    for i, result in enumerate(Parallel(n_jobs=2, return_as="generator")(
            delayed(make)(i) for i in range(6))):
        assert float(result[0]) == i and isinstance(result.base, mmap.mmap)


# ---------------------------------------------------------------------- cleanup paths

def fail_on(arr, i):
    if i == 3:
        raise KeyError(i)
    return make(i)


def exit_on(arr, i):
    if i == 3:
        os._exit(5)
    return make(i)


def stall_on(arr, i):
    import time

    if i == 3:
        time.sleep(30)
    return make(i)


@pytest.mark.parametrize("func, error, extra", [
    (fail_on, KeyError, {}),
    (exit_on, WorkerCrashedError, {}),
    (stall_on, TimeoutError, {"timeout": 1.0}),
])
def test_files_are_removed_when_a_call_fails(func, error, extra, tmp_path):
    before = shm_entries()
    arr = big()
    with pytest.raises(error):
        Parallel(n_jobs=2, batch_size=1, **extra)(delayed(func)(arr, i) for i in range(12))
    assert shm_entries() == before
    with pytest.raises(error):
        Parallel(n_jobs=2, batch_size=1, temp_folder=str(tmp_path), **extra)(
            delayed(func)(arr, i) for i in range(12))
    assert os.listdir(tmp_path) == []


def test_files_are_removed_when_a_generator_is_closed_early():
    before = shm_entries()
    arr = big()
    gen = Parallel(n_jobs=2, return_as="generator")(delayed(stall_on)(arr, i % 3)
                                                     for i in range(50))
    assert float(next(gen)[0]) == 0.0
    gen.close()
    assert shm_entries() == before


def crash_after_writing_a_result_file(_):
    path = f"/dev/shm/parmap_{os.getppid()}_w{os.getpid()}_999999"
    with open(path, "wb") as f:
        f.write(b"half a result")
    os._exit(3)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_result_files_of_a_crashed_worker_are_swept():
    with pytest.raises(WorkerCrashedError):
        Parallel(n_jobs=2)(delayed(crash_after_writing_a_result_file)(i) for i in range(2))
    assert not [name for name in shm_entries() if name.endswith("_999999")]


def test_placer_close_is_idempotent_and_removes_everything(tmp_path):
    placer = shm.ArgumentPlacer(0, "r", str(tmp_path))
    assert placer.reduce(np.ones(10)) is not None
    assert len(os.listdir(tmp_path)) == 1
    placer.close()
    placer.close()
    assert os.listdir(tmp_path) == []


# ------------------------------------------- cleanup when the calling process ends

SCRIPT = """
import os, sys, time
import numpy as np
from parmap import Parallel, delayed

def task(arr, seconds):
    time.sleep(seconds)
    return np.full(300_000, float(arr[0]))  # 2.4 MB: comes back through /dev/shm

how, folder = sys.argv[1], sys.argv[2] or None
Parallel(n_jobs=2)(delayed(abs)(-1) for _ in range(2))  # a warm pool: arr is placed
arr = np.ones(300_000)
gen = Parallel(n_jobs=2, batch_size=1, temp_folder=folder, return_as="generator")(
    delayed(task)(arr, 0.01 if i < 4 else 60) for i in range(50))
for _ in range(4):
    next(gen)
try:
    print(os.getpid(), flush=True)
    if how == "exit":
        sys.exit(0)  # the generator and its call are still open
    list(gen)  # SIGINT or SIGKILL arrives in here (or just before)
except KeyboardInterrupt:
    sys.exit(42)
"""


def ours(pid, folder=None):
    """Files and folders the process `pid` made in /dev/shm and in `folder`."""
    found = [name for name in shm_entries() if name.startswith(f"parmap_{pid}_")]
    if folder is not None:
        found += os.listdir(folder)
    return found


def wait_for_nothing_of(pid, folder=None, seconds=10.0):
    import time

    deadline = time.monotonic() + seconds
    while ours(pid, folder) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling another process's cleanup, not synchronising ours
    return ours(pid, folder)


def start_script(tmp_path, how, folder=None):
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), how, folder or ""],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    pid = int(proc.stdout.readline())
    return proc, pid


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
@pytest.mark.parametrize("use_folder", [False, True], ids=["dev-shm", "temp-folder"])
@pytest.mark.parametrize("how", ["exit", "sigint"])
def test_nothing_is_left_when_the_caller_exits_or_is_interrupted(tmp_path, how, use_folder):
    import signal

    folder = str(tmp_path / "tmp") if use_folder else None
    proc, pid = start_script(tmp_path, how, folder)
    try:
        if how == "sigint":
            assert ours(pid, folder)  # the call's argument file exists while it runs
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == (42 if how == "sigint" else 0), err
    assert ours(pid, folder) == []


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_shared_memory_is_removed_when_the_caller_is_killed(tmp_path):
    import signal

    proc, pid = start_script(tmp_path, "kill")
    assert ours(pid)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=20)
    # the resource tracker unlinks them once the caller and its workers are gone
    assert wait_for_nothing_of(pid) == []


def test_temp_folder_of_a_killed_caller_is_swept_by_the_next_call(tmp_path):
    import signal

    folder = tmp_path / "tmp"
    proc, pid = start_script(tmp_path, "kill", str(folder))
    assert os.listdir(folder)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=20)
    Parallel(n_jobs=2, temp_folder=str(folder))(delayed(describe)(big()) for _ in range(2))
    assert os.listdir(folder) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and maps are Linux")
def test_cold_pool_workers_do_not_inherit_a_private_copy_of_a_large_argument():
    """The pool starts after the first batch placed its arrays: forked workers then map
    the shared file where the caller's array was, instead of keeping its original
    private pages alive (a second copy of the data)."""
    from parmap.process.registry import shutdown_all

    from .conftest import child_pids

    shutdown_all()  # a cold start, as in a script
    arr = np.random.default_rng(1).random(8_000_000)  # 64 MB: remapped in place
    middle = arr.__array_interface__["data"][0] + arr.nbytes // 2
    out = Parallel(n_jobs=2, start_method="fork")(delayed(np.sum)(arr) for _ in range(2))
    assert out == [arr.sum()] * 2
    backing = {}
    for pid in child_pids():
        try:
            with open(f"/proc/{pid}/maps") as fh:
                for line in fh:
                    low, high = (int(x, 16) for x in line.split()[0].split("-"))
                    if low <= middle < high:
                        backing[pid] = line.split()[5:]
        except OSError:
            continue
    assert backing, "no worker found"
    for pid, path in backing.items():
        assert path and "parmap_" in path[0], f"worker {pid}: array region is {path or 'anonymous'}"


# ------------------------------------------- inheritance by workers forked for the call

@pytest.fixture
def inheritance(monkeypatch):
    """A cold pool whose workers fork for this call: the case where arrays are inherited."""
    from parmap.process import spawn
    from parmap.process.registry import shutdown_all

    # an earlier test's scikit-learn OpenMP pool would send workers to the forkserver;
    # these tasks use no OpenMP, so forking stays safe for them
    monkeypatch.setattr(spawn, "_openmp_pool_running", lambda: False)
    if spawn.choose_start_method() != "fork":
        pytest.skip("the caller would not fork here")
    monkeypatch.setattr(WorkerPool, "will_fork", _REAL_WILL_FORK)  # undo no_inheritance
    shutdown_all()
    yield WorkerPool


def test_cold_fork_pool_reads_arrays_in_place_without_copying(inheritance, count_placements):
    arr = big(3.0, n=4 * BIG)
    out = Parallel(n_jobs=2)(delayed(describe_all)(arr, arr[::2], k=arr[10:]) for _ in range(4))
    assert count_placements == []  # nothing was copied to shared memory
    assert all(len(d) == 3 and not any(x["mapped"] or x["writeable"] for x in d) for d in out)
    assert [x["sum"] for x in out[0]] == [3.0 * 4 * BIG, 3.0 * 2 * BIG, 3.0 * (4 * BIG - 10)]
    assert shm._PINNED == {}  # released with the call
    arr[:] = 5.0  # the next call (warm pool) must see the new values: placed, not inherited
    out = Parallel(n_jobs=2)(delayed(describe)(arr) for _ in range(2))
    assert count_placements == [arr.nbytes] and out[0]["sum"] == 5.0 * 4 * BIG


def test_worker_without_the_pinned_array_asks_again_and_gets_it_placed(
        inheritance, count_placements, monkeypatch):
    monkeypatch.setattr(inheritance, "will_fork", lambda self: self._manager is None)
    arr = big(4.0)
    out = Parallel(n_jobs=2, start_method="forkserver")(delayed(describe)(arr)
                                                        for _ in range(5))
    assert count_placements == [arr.nbytes]
    assert all(d["mapped"] and d["sum"] == 4.0 * BIG for d in out)


@pytest.mark.parametrize("mode", ["r+", "c"])
def test_writable_modes_are_never_inherited(inheritance, count_placements, mode):
    arr = big(1.0)
    Parallel(n_jobs=2, mmap_mode=mode)(delayed(describe)(arr) for _ in range(2))
    assert count_placements == [arr.nbytes]


# ------------------------------------------- results placed as each task returns

def big_or_fail(i, bad=-1, unpicklable=-1):
    if i == bad:
        raise ValueError(f"task {i} fails")
    if i == unpicklable:
        import threading

        return threading.Lock()  # cannot be pickled at all
    return big(float(i))


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_results_placed_early_are_correct_and_cleaned_up_when_a_batch_fails():
    before = shm_entries()
    # results through /dev/shm: from now on the workers place them as tasks return
    out = Parallel(n_jobs=2, batch_size=3)(delayed(big_or_fail)(i) for i in range(12))
    assert [float(a[0]) for a in out] == [float(i) for i in range(12)]
    out = Parallel(n_jobs=2, batch_size=3)(delayed(big_or_fail)(i) for i in range(12))
    assert all(a.flags.writeable and float(a.sum()) == i * BIG for i, a in enumerate(out))
    with pytest.raises(ValueError, match="task 5 fails"):
        Parallel(n_jobs=2, batch_size=3)(delayed(big_or_fail)(i, bad=5) for i in range(12))
    with pytest.raises(SerializationError, match="task 4"):
        Parallel(n_jobs=2, batch_size=3)(delayed(big_or_fail)(i, unpicklable=4)
                                         for i in range(12))
    assert shm_entries() == before


def memmap_kinds(arr):
    """What code written for joblib checks: the argument and its slices are np.memmap."""
    return [isinstance(arr, np.memmap), isinstance(arr[1:], np.memmap),
            float(arr[: 10].sum())]


def test_large_arguments_arrive_as_memmaps_placed(count_placements):
    arr = big(1.0, n=4 * BIG)  # its strided view is above max_nbytes too
    out = Parallel(n_jobs=2)(delayed(memmap_kinds)(a) for a in (arr, arr[::2]))
    assert out == [[True, True, 10.0]] * 2
    assert Parallel(n_jobs=2)(delayed(memmap_kinds)(np.ones(10)) for _ in range(2)) == \
        [[False, False, 10.0]] * 2  # small arrays travel pickled, as ndarrays


def test_large_arguments_arrive_as_memmaps_inherited(inheritance, count_placements):
    arr = big(1.0)
    out = Parallel(n_jobs=2)(delayed(memmap_kinds)(arr) for _ in range(2))
    assert out == [[True, True, 10.0]] * 2 and count_placements == []
