"""Large numpy arrays to process workers: placed in shared memory, or inherited by
workers forked for the call (parmap.process.shm). Results: test_numpy_results.py."""
from __future__ import annotations

import gc
import mmap
import os
import stat
import threading
from types import SimpleNamespace

import numpy as np
import pytest

import parmap._shm_files as shm_files
import parmap.process.shm as shm
from parmap._delayed import Batch
from parmap.backends.process import _Resubmit
from parmap.process import folders, protocol
from parmap.process.pool import WorkerPool
from parmap import Parallel, delayed, parallel_config

from .conftest import shm_entries
from .numpy_helpers import (_REAL_WILL_FORK, BIG, _root, big, describe, describe_all,  # noqa: F401
                            first_after, identity, no_inheritance, scaled)


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
    monkeypatch.setattr(folders.tempfile, "gettempdir", lambda: str(tmp_path))
    before = shm_entries()
    arr = big()
    out = Parallel(n_jobs=2)(delayed(lambda a, p: (describe(a)["mapped"], len(os.listdir(p))))
                             (arr, str(tmp_path)) for _ in range(2))
    assert out == [(True, 1), (True, 1)]
    assert shm_entries() == before
    assert os.listdir(tmp_path) == []


def test_stale_folder_of_a_dead_caller_is_swept(tmp_path):
    stale = tmp_path / f"parmap_999999999_{folders.origin()}_abc"  # no such pid here
    stale.mkdir()
    (stale / "data").write_bytes(b"x")
    # another machine's or PID namespace's (a shared volume): its pid means nothing here
    foreign = tmp_path / "parmap_999999999_0a0b0c0d_abc"
    foreign.mkdir()
    Parallel(n_jobs=2, temp_folder=str(tmp_path))(delayed(describe)(big()) for _ in range(2))
    assert os.listdir(tmp_path) == [foreign.name]


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_other_start_methods_share_both_ways(method):
    arr = big(3.0)
    out = Parallel(n_jobs=2, start_method=method)(delayed(scaled)(arr, 2.0) for _ in range(2))
    for result in out:
        assert isinstance(result.base, mmap.mmap)
        assert float(result.sum()) == 6.0 * BIG


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


def test_a_closed_call_is_freed_without_waiting_for_a_garbage_collection():
    # with numpy loaded, each batch's callback can send it again (RETRY above): it once
    # named itself, and that cycle held the call (its arguments, the input generator)
    # until a collection, so the input's ``finally`` ran late
    closed = []
    arr = big(1.0)

    def tasks():
        try:
            for _ in range(1000):
                yield delayed(describe)(arr)
        finally:
            closed.append(True)

    Parallel(n_jobs=2)(delayed(abs)(i) for i in range(2))  # workers started before:
    gc.disable()  # one forked now would keep gc off for its life (and its cycles' arrays)
    try:
        gen = Parallel(n_jobs=2, batch_size=1, return_as="generator")(tasks())
        next(gen)
        gen.close()
        del gen
        assert closed == [True]
    finally:
        gc.enable()


@pytest.mark.parametrize("view", [False, True], ids=["arrays", "views-copied"])
def test_a_stream_of_new_arrays_keeps_only_the_files_of_tasks_in_flight(
        count_placements, view):
    # an input that makes a new array per task: each array's file goes once the array
    # is gone (its batch done), not when the call ends (all 40 files were kept, and the
    # arrays with them). A view that is not contiguous goes through a C copy (kept with
    # its view's root)
    in_shm = []

    def tasks():
        for i in range(40):
            in_shm.append(len(shm_entries()))
            arr = big(float(i), 2 * BIG)
            yield delayed(describe)(arr[::2] if view else arr[:BIG])

    out = Parallel(n_jobs=2, batch_size=1, pre_dispatch=2, return_as="generator")(tasks())
    assert [d["sum"] for d in out] == [float(i) * BIG for i in range(40)]
    assert len(count_placements) == 40
    assert max(in_shm) <= 5, in_shm


def test_a_stream_of_arrays_over_foreign_buffers_keeps_only_the_files_in_flight():
    # such an array is its own "C copy": it was held by the call, so none of them died
    in_shm = []

    def tasks():
        for i in range(30):
            in_shm.append(len(shm_entries()))
            yield delayed(describe)(np.frombuffer(bytearray(big(float(i)).tobytes())))

    out = Parallel(n_jobs=2, batch_size=1, pre_dispatch=2, return_as="generator")(tasks())
    assert [d["sum"] for d in out] == [float(i) * BIG for i in range(30)]
    assert max(in_shm) <= 5, in_shm


def test_new_views_of_one_array_over_a_foreign_buffer_keep_its_file_while_needed():
    # such a view is its own "C copy", held weakly: a later view of the same geometry
    # used the first one's file, and the first one's death removed it (FileNotFoundError)
    root = np.frombuffer(big(3.0).tobytes())
    out = Parallel(n_jobs=2, batch_size=1)(
        delayed(first_after)(root[:], 0.005) for _ in range(30))
    assert out == [3.0] * 30


class MadeWhenPickled:
    """Pickles as a large array made on the spot: an array that exists only while its
    batch is encoded."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return np.asarray, (big(self.value),)


def test_an_array_made_while_its_batch_is_pickled_keeps_its_file_until_the_batch_is_done():
    # it died as soon as its batch was encoded, and the next batch's encoding removed
    # its file before a worker had read it (FileNotFoundError in the worker)
    out = Parallel(n_jobs=2, batch_size=1)(
        delayed(first_after)(MadeWhenPickled(float(i)), 0.02) for i in range(20))
    assert out == [float(i) for i in range(20)]


def test_a_with_blocks_end_frees_the_files_of_a_generator_still_referenced():
    arr = big(1.0)
    with Parallel(n_jobs=2, batch_size=1, return_as="generator") as parallel:
        results = parallel(delayed(describe)(arr) for _ in range(100))
        next(results)
        assert shm_entries()  # the array was placed (no_inheritance)
    assert not shm_entries()  # before the generator is dropped
    with pytest.raises(RuntimeError, match="block ended"):
        next(results)


@pytest.mark.timeout(30)
def test_a_block_ending_while_another_thread_places_arrays_leaves_no_file():
    # the block's thread once ended the call (closing its placer) under the thread that
    # read the input and placed arrays: their files stayed until the process exited
    reading, gate = threading.Event(), threading.Event()

    def tasks():
        yield delayed(describe)(big(0.0))
        reading.set()
        gate.wait(10)
        for i in range(1, 20):
            yield delayed(describe)(big(float(i)))

    outcome = {}
    with Parallel(n_jobs=2, batch_size=1, pre_dispatch=1, return_as="generator") as parallel:
        results = parallel(tasks())

        def consume():
            try:
                list(results)
            except RuntimeError as exc:
                outcome["error"] = str(exc)

        reader = threading.Thread(target=consume)
        reader.start()
        assert reading.wait(10)
    gate.set()
    reader.join(20)
    assert "block ended" in outcome.get("error", "")
    assert not shm_entries()


@pytest.mark.parametrize("mode", ["r+", "c"])
def test_writable_modes_are_never_inherited(inheritance, count_placements, mode):
    arr = big(1.0)
    Parallel(n_jobs=2, mmap_mode=mode)(delayed(describe)(arr) for _ in range(2))
    assert count_placements == [arr.nbytes]


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


# ------------------------------------------- a worker's mappings, kept between batches

_last_mapping: dict[str, object] = {}  # in a worker: the mapping its previous task saw


def mapping_as_before(arr):
    """(worker pid, whether the array's mapping is the one the previous task saw); the
    previous mapping is held here, so a new one cannot reuse its identity."""
    mm = _root(arr).base
    before, _last_mapping["mm"] = _last_mapping.get("mm"), mm
    return os.getpid(), before is mm


def forget_mapping():
    _last_mapping.clear()
    return os.getpid()


def _mappings_seen(arr, n_tasks, **settings):
    run = Parallel(n_jobs=2, batch_size=1, **settings)
    run(delayed(forget_mapping)() for _ in range(4))
    try:
        return run(delayed(mapping_as_before)(arr) for _ in range(n_tasks))
    finally:
        run(delayed(forget_mapping)() for _ in range(4))


def test_read_only_mapping_is_kept_from_batch_to_batch():
    out = _mappings_seen(big(1.0), 12)
    by_worker: dict[int, list[bool]] = {}
    for pid, same in out:
        by_worker.setdefault(pid, []).append(same)
    assert any(len(seen) > 1 for seen in by_worker.values())
    assert all(seen[1:] == [True] * (len(seen) - 1) for seen in by_worker.values()), by_worker


def test_copy_on_write_mapping_is_new_for_every_batch():
    # a task may write into a "c" mapping: the next batch must not see it
    out = _mappings_seen(big(1.0), 6, mmap_mode="c")
    assert not any(same for _, same in out)


def _maps_argument_files(pid: int) -> bool:
    # not result files (``_w<worker>_`` in the name): a worker forked while the caller
    # still mapped an earlier call's results has those mappings too, from the fork
    with open(f"/proc/{pid}/maps") as maps:
        return any("/parmap_" in line and "_w" not in line.rsplit("/", 1)[-1]
                   for line in maps)


def test_idle_worker_lets_go_of_argument_files():
    import time

    arr = big(1.0)
    pids = set(Parallel(n_jobs=2)(delayed(lambda a: os.getpid())(arr) for _ in range(4)))
    deadline = time.monotonic() + 10
    while any(_maps_argument_files(pid) for pid in pids):  # the call's files are unlinked:
        assert time.monotonic() < deadline, "a worker still maps an argument file"  # only
        time.sleep(0.02)  # the workers' mappings keep their memory


def test_unit_mappings_kept_by_identity(tmp_path):
    from parmap.process import arg_maps

    path = str(tmp_path / "a.bin")
    with open(path, "wb") as f:
        f.write(b"x" * 8192)
    first = arg_maps.mapping(path, "r")
    arg_maps.keep_only_used()
    assert arg_maps.mapping(path, "r") is first and arg_maps.holding()
    arg_maps.keep_only_used()
    arg_maps.keep_only_used()  # a request that did not use it
    assert not arg_maps.holding()
    second = arg_maps.mapping(path, "r")
    os.replace(str(tmp_path / "a.bin"), str(tmp_path / "old.bin"))
    with open(path, "wb") as f:  # another file at the same path
        f.write(b"y" * 4096)
    third = arg_maps.mapping(path, "r")
    assert third is not second and len(third) == 4096
    assert arg_maps.mapping(path, "c") is not arg_maps.mapping(path, "c")
    arg_maps.release()
    assert not arg_maps.holding()
    for mm in (first, second, third):
        mm.close()


def _resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_argument_pages_are_not_a_workers_memory():
    import warnings

    # a worker's own memory: forked from this process, it counts all that it inherits
    own = max(Parallel(n_jobs=2, max_memory_per_child="100G")(
        delayed(_resident_bytes)() for _ in range(4)))
    arr = np.ones(256 * 1024 ** 2 // 8)  # 256 MiB, every page read by every task
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = Parallel(n_jobs=2, batch_size=1, max_memory_per_child=own + 128 * 1024 ** 2)(
            delayed(lambda a: (os.getpid(), float(a.sum())))(arr) for _ in range(6))
    assert [total for _, total in out] == [float(arr.size)] * 6
    assert not [w for w in caught if "max_memory_per_child" in str(w.message)]
    assert len({pid for pid, _ in out}) <= 2  # no worker was replaced


_leaked = []  # in a worker: shared memory it made and keeps


def leak_shared_memory(nbytes):
    leaked = mmap.mmap(-1, nbytes)
    leaked.write(b"x" * nbytes)  # resident, shared (shmem) pages of the worker's own
    _leaked.append(leaked)
    return os.getpid()


def test_a_workers_own_shared_memory_still_counts():
    own = max(Parallel(n_jobs=2, max_memory_per_child="100G")(
        delayed(_resident_bytes)() for _ in range(4)))
    with pytest.warns(UserWarning, match="max_memory_per_child"):
        pids = Parallel(n_jobs=2, batch_size=1, max_memory_per_child=own + 100 * 1024 ** 2)(
            delayed(leak_shared_memory)(64 * 1024 ** 2) for _ in range(8))
    assert len(set(pids)) > 2  # workers were replaced


def test_an_inherited_argument_cannot_be_made_writeable(inheritance, count_placements):
    arr = big(1.0)
    out = Parallel(n_jobs=2)(delayed(try_writeable)(arr) for _ in range(2))
    assert out == ["refused"] * 2 and count_placements == []


def try_writeable(arr):
    try:
        arr.flags.writeable = True
    except ValueError:
        return "refused"
    arr[0] = 99.0  # would change the worker's copy for every later task
    return "allowed"


def test_a_late_retry_after_its_call_ended_places_nothing():
    # a worker that did not inherit a pinned array answers RETRY; answered after the
    # call had ended (failed, timed out), the batch was placed again, into a file that
    # stayed in /dev/shm until the interpreter exited
    before = shm_entries()
    placer = shm.ArgumentPlacer(max_nbytes=1024, mmap_mode="r")
    sent, told = [], []
    resubmit = _Resubmit(SimpleNamespace(submit=sent.append), object(),
                         Batch(0, [(np.sum, (big(),), {})]), told.append, None, placer,
                         False, None, [])
    placer.close()  # the call ended
    resubmit(protocol.RETRY)
    assert sent == [] and told == [] and shm_entries() == before
