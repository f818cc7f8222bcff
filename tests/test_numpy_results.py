"""Large numpy results from process workers through shared memory, and the cleanup of
every file on each path out: failures, closed generators, crashes, a caller that ends
or is killed (parmap.process.shm, parmap.process.shm_results)."""
from __future__ import annotations

import itertools
import mmap
import os
import sys
import threading

import numpy as np
import pytest

import parmap.process.shm as shm
from parmap import Parallel, SerializationError, WorkerCrashedError, delayed
from parmap.process import folders, shm_results

from .conftest import shm_entries, twice_at_once
from .numpy_helpers import BIG, big, describe, identity, no_inheritance  # noqa: F401


# ---------------------------------------------------------------------- results

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


def head(arr, i):
    return arr[i:i + 5]  # a small slice of the argument: a memmap view in the worker


def test_a_small_slice_of_an_argument_comes_back_as_a_writeable_ndarray():
    arr = np.arange(BIG * 2, dtype=float)  # above max_nbytes: mapped in the workers
    for out in (Parallel(n_jobs=2)(delayed(head)(arr, i) for i in range(4)),
                Parallel(n_jobs=2, start_method="forkserver")(
                    delayed(head)(arr, i) for i in range(4))):
        for i, result in enumerate(out):
            assert type(result) is np.ndarray and result.flags.writeable
            np.testing.assert_array_equal(result, arr[i:i + 5])
            result[:] = -1  # a copy: the caller's array is unchanged
        assert arr[0] == 0


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


def crash_after_writing_a_result_file(caller):
    # and one of another caller with our caller's pid, and a worker with our pid: a
    # process of another PID namespace that shares /dev/shm (docker --ipc=host)
    for tag in (caller, f"{os.getppid()}_0a0b0c0d"):
        with open(f"/dev/shm/parmap_{tag}_w{os.getpid()}_999999", "wb") as f:
            f.write(b"half a result")
    os._exit(3)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_result_files_of_a_crashed_worker_are_swept_and_only_ours():
    caller = shm_results.caller_tag()
    try:
        with pytest.raises(WorkerCrashedError):
            Parallel(n_jobs=2)(delayed(crash_after_writing_a_result_file)(caller)
                               for i in range(2))
        left = [name for name in shm_entries() if name.endswith("_999999")]
        assert left and all("_0a0b0c0d_" in name for name in left)
    finally:
        for name in shm_entries():
            if "_0a0b0c0d_" in name:
                os.unlink(os.path.join("/dev/shm", name))


def test_result_file_names_are_this_callers_own():
    tag = shm_results.caller_tag()
    assert tag == shm_results.caller_tag() and tag.startswith(f"{os.getpid()}_")
    assert shm_results.ResultPlacer(0, tag).prefix.startswith(f"/dev/shm/parmap_{tag}_w")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked child is another caller: a tag of its own
        os.write(write, shm_results.caller_tag().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        assert f.read().startswith(f"{pid}_")


def test_threads_asking_for_the_tag_at_once_get_the_same(monkeypatch):
    # each made its own once (two pools' workers, one sweep prefix): 183 of 300 with a
    # tiny switch interval
    for first, second in twice_at_once(
            shm_results.caller_tag, lambda: monkeypatch.setattr(shm_results, "_tags", {})):
        assert isinstance(first, str) and first == second


def test_placer_close_is_idempotent_and_removes_everything(tmp_path):
    placer = shm.ArgumentPlacer(0, "r", str(tmp_path))
    assert placer.reduce(np.ones(10)) is not None
    assert len(os.listdir(tmp_path)) == 1
    placer.close()
    placer.close()
    assert os.listdir(tmp_path) == []


def test_each_file_goes_where_there_is_room(monkeypatch, tmp_path):
    # room in /dev/shm was checked for a call's first file only: a later, larger array
    # failed the call with "No space left on device"
    rooms = itertools.chain([True], itertools.repeat(False))  # the first file fills it
    for module in (shm, folders):
        monkeypatch.setattr(module, "shm_has_room", lambda nbytes: next(rooms))
    monkeypatch.setattr(folders.tempfile, "gettempdir", lambda: str(tmp_path))
    placer = shm.ArgumentPlacer(0, "r")
    first, second = (placer.reduce(np.full(10, float(i)))[1][0] for i in range(2))
    assert os.path.dirname(first) == shm.SHM_DIR
    assert os.path.dirname(os.path.dirname(second)) == str(tmp_path)
    placer.close()
    assert shm_entries() == set() and os.listdir(tmp_path) == []


# ------------------------------------------- cleanup when the calling process ends

SCRIPT = """
import os, sys, time
import numpy as np
from parmap import Parallel, delayed

def task(arr, seconds):
    time.sleep(seconds)
    return np.full(300_000, float(arr[0]))  # 2.4 MB: comes back through /dev/shm

how, folder = sys.argv[1], sys.argv[2] or None
if sys.argv[3:] == ["thread"]:  # workers from the forkserver, whose start (parmap's)
    import threading            # launches multiprocessing's resource tracker
    threading.Thread(target=threading.Event().wait, daemon=True).start()
Parallel(n_jobs=2)(delayed(abs)(-1) for _ in range(2))  # a warm pool: arr is placed
arr = np.ones(300_000)
gen = Parallel(n_jobs=2, batch_size=1, temp_folder=folder, return_as="generator")(
    delayed(task)(arr, 0.01 if i < 4 else 60) for i in range(50))
for _ in range(4):
    next(gen)
try:
    from multiprocessing import resource_tracker
    print(os.getpid(), resource_tracker._resource_tracker._pid, flush=True)
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


def start_script(tmp_path, how, folder=None, thread=False, tracker=None):
    """The script above, running; its pid. ``tracker``: a list to receive the pid of
    its resource tracker."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, str(script), how, folder or ""] + (["thread"] if thread else []),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    pid, tracker_pid = (int(word) for word in proc.stdout.readline().split())
    if tracker is not None:
        tracker.append(tracker_pid)
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
@pytest.mark.parametrize("thread", [False, True], ids=["forked", "forkserver"])
def test_shared_memory_is_removed_when_the_caller_is_killed(tmp_path, thread):
    import signal

    tracker: list[int] = []
    proc, pid = start_script(tmp_path, "kill", thread=thread, tracker=tracker)
    try:
        assert ours(pid)
        # launched by parmap's start of the forkserver, the tracker goes without site
        # (-S, from Python 3.11); launched by other code (here parmap's first file,
        # after forked workers), as it was
        with open(f"/proc/{tracker[0]}/cmdline", "rb") as cmdline:
            words = cmdline.read().split(b"\0")
        assert (b"-S" in words) == (b"-P" in words) == (thread and sys.version_info >= (3, 11))
    finally:
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


def test_a_result_that_no_longer_fits_in_shared_memory_is_pickled(monkeypatch):
    def full(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm_results, "write_all", full)  # other results filled it meanwhile
    placer = shm_results.ResultPlacer(0, shm_results.caller_tag())
    assert placer.reduce(np.ones(10)) is None and placer.created == []
    assert shm_entries() == set()


def test_a_name_registered_for_a_file_never_made_is_forgotten(monkeypatch):
    # Ctrl-C between the registration and the creation: close() must still unregister;
    # a file someone else removed is theirs to unregister (twice: the tracker's KeyError)
    calls = []
    monkeypatch.setattr(shm, "track", lambda path, register: calls.append(register))
    shm.unlink(os.path.join(shm.SHM_DIR, "parmap_never_made"), made_here=True)
    shm.unlink(os.path.join(shm.SHM_DIR, "parmap_removed_meanwhile"))
    assert calls == [False]
