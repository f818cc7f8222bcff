"""A large array remapped onto its file by one call goes to the next calls without a copy,
while none of its pages changed (parmap.process.remap)."""
from __future__ import annotations

import functools
import gc
import multiprocessing
import os

import numpy as np
import pytest

from parmap import Parallel, delayed
from parmap.process import remap

from .numpy_helpers import no_inheritance  # noqa: F401

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"),
                                reason="remapping and its reuse are Linux's")

N = remap.REMAP_MIN_BYTES // 8 + 4096  # float64s: just above the remapping threshold


@pytest.fixture(autouse=True, params=[1, 2], ids=["one file", "two parts"])
def reuse_enabled(monkeypatch, request):
    """Every test with an array in one file and in two parts written side by side (as on
    a machine with 2+ CPUs); a refused kept file turns reuse off: only for the test."""
    global N
    monkeypatch.setattr(remap, "_enabled", [True])
    monkeypatch.setattr(remap, "parts", functools.partial(remap.parts, cpus=request.param))
    N = request.param * (remap.REMAP_MIN_BYTES // 8) + 4096
    assert len(remap.parts(N * 8)) == request.param


@pytest.fixture
def copies(monkeypatch):
    """The number of times an array was written to a new file and remapped onto it."""
    count = [0]
    original = remap.copy_and_remap

    def spy(*args):
        count[0] += 1
        return original(*args)

    monkeypatch.setattr(remap, "copy_and_remap", spy)
    return count


def edges(arr):
    return float(arr[0]), float(arr[-1]), float(arr.sum())


def run(arr, n=4):
    return Parallel(n_jobs=2)(delayed(edges)(arr) for _ in range(n))


def test_unchanged_array_is_not_written_again(copies):
    arr = np.ones(N)
    assert run(arr) == [(1.0, 1.0, float(N))] * 4 and copies[0] == 1
    assert run(arr) == [(1.0, 1.0, float(N))] * 4 and copies[0] == 1
    float(arr[N // 2])  # reading it changes nothing
    assert run(arr) == [(1.0, 1.0, float(N))] * 4 and copies[0] == 1


@pytest.mark.parametrize("where", [0.0, 0.5, 0.75, 1.0])
def test_a_write_anywhere_sends_the_array_again(copies, where):
    arr = np.ones(N)
    run(arr)
    arr[min(int(where * N), N - 1)] = 5.0  # one page becomes the caller's own
    expected = (float(arr[0]), float(arr[-1]), float(N) + 4.0)
    assert run(arr) == [expected] * 4 and copies[0] == 2
    assert run(arr) == [expected] * 4 and copies[0] == 2  # and is reused from then on


def test_a_new_array_at_the_same_address_is_not_mistaken_for_the_old(copies):
    arr = np.ones(N)
    run(arr)
    address = arr.__array_interface__["data"][0]
    del arr
    gc.collect()
    assert remap._kept == {}  # its descriptor went with it
    arr = np.full(N, 2.0)  # glibc may well hand out the same address
    assert run(arr) == [(2.0, 2.0, 2.0 * N)] * 4 and copies[0] == 2
    del address


def test_worker_that_cannot_open_the_file_gets_the_array_placed(copies, monkeypatch):
    arr = np.ones(N)
    run(arr)
    monkeypatch.setattr(remap, "reusable",
                        lambda root, start, end: (f"/proc/{os.getpid()}/fd/999999", (0, 0)))
    assert run(arr) == [(1.0, 1.0, float(N))] * 4 and copies[0] == 2
    assert remap._enabled == [False]  # later calls copy at once, without a retry


def test_worker_checks_that_it_maps_the_file_that_was_sent(copies, monkeypatch, tmp_path):
    arr = np.ones(N)
    run(arr)
    other = tmp_path / "zeros.bin"  # what a reused descriptor number might point to
    other.write_bytes(bytes(N * 8 + 8192))
    fd = os.open(other, os.O_RDONLY)
    kept = remap.reusable

    def another_file_first(root, start, end):
        files, identity = kept(root, start, end)
        wrong = f"/proc/{os.getpid()}/fd/{fd}"
        if isinstance(files, str):
            return wrong, identity
        return ((wrong, files[0][1]),) + files[1:], identity

    monkeypatch.setattr(remap, "reusable", another_file_first)
    try:
        assert run(arr) == [(1.0, 1.0, float(N))] * 4 and copies[0] == 2
    finally:
        os.close(fd)


def _kept_in_child(queue, fds, identities):
    still_open = False
    for fd, identity in zip(fds, identities):
        try:  # the number may have been reused since (multiprocessing opens /dev/null)
            st = os.fstat(fd)
            still_open = still_open or (st.st_dev, st.st_ino) == identity
        except OSError:
            pass
    queue.put((len(remap._kept), still_open))


def test_forked_child_does_not_hold_the_files():
    arr = np.ones(N)
    run(arr)
    assert len(remap._kept) == 1
    _finalizer, fds, parts = next(iter(remap._kept.values()))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue()
    child = ctx.Process(target=_kept_in_child,
                        args=(queue, fds, [identity for _, _, identity in parts]))
    child.start()
    child.join(30)
    assert child.exitcode == 0 and queue.get() == (0, False)
    assert len(remap._kept) == 1  # the caller's own are untouched
    del arr


def first(arr):
    return float(arr[0])


def test_overlapping_calls_keep_only_the_newest_file(copies):
    arr = np.ones(N)
    run(np.ones(3))  # a warm pool: the array is placed, not inherited
    # call A stays open (a generator) while call B copies the changed array to a newer
    # file; A's end must not keep its older file for the next call
    a = Parallel(n_jobs=2, return_as="generator", batch_size=1, pre_dispatch="2")(
        delayed(first)(arr) for _ in range(40))
    assert next(a) == 1.0
    arr[0] = 5.0
    assert Parallel(n_jobs=2)(delayed(first)(arr) for _ in range(2)) == [5.0, 5.0]
    assert set(a) <= {1.0, 5.0}
    assert Parallel(n_jobs=2)(delayed(first)(arr) for _ in range(2)) == [5.0, 5.0]


def test_an_array_from_the_heap_is_not_remapped():
    from .conftest import run_script

    # glibc serves a large allocation from the heap once small objects freed enough of
    # it: its first and last pages then hold other objects, which must keep their pages
    out = run_script(
        "import numpy as np\n"
        "from parmap.process import remap\n"
        "fresh = np.ones(remap.REMAP_MIN_BYTES // 8 + 4096)\n"
        "junk = [bytearray(3000) for _ in range(20000)]\n"
        "keep = bytearray(3000)\n"
        "del junk\n"
        "heap = np.ones(remap.REMAP_MIN_BYTES // 8 + 4096)\n"
        "print(remap.can_remap(fresh), remap.can_remap(heap),\n"
        "      heap.__array_interface__['data'][0] % 4096 == 16)\n", timeout=60)
    fresh, heap, heap_looks_mapped = out.split()
    if heap_looks_mapped == "True":
        pytest.skip("this allocator gave the second array a mapping of its own too")
    assert (fresh, heap) == ("True", "False")


def picks(arr, indices):
    return [float(arr[i]) for i in indices], float(arr.sum()), arr.flags.writeable


def test_workers_see_the_whole_array_across_its_parts():
    arr = np.arange(N, dtype=np.float64)
    cuts = [lo // 8 for lo, _ in remap.parts(N * 8)] + [N]
    indices = sorted({max(0, min(N - 1, c + d)) for c in cuts for d in (-1, 0, 1)})
    expected = ([float(i) for i in indices], float(arr.sum()), False)
    for _ in range(2):  # placed, then reused
        assert Parallel(n_jobs=2)(delayed(picks)(arr, indices) for _ in range(4)) == \
            [expected] * 4


def write_first(arr):
    before = float(arr[0])
    arr[0] = -1.0
    return before


def test_parts_keep_the_modes_read_only_and_copy_on_write():
    arr = np.ones(N)
    with pytest.raises(ValueError, match="read-only"):
        Parallel(n_jobs=2)(delayed(write_first)(arr) for _ in range(2))
    out = Parallel(n_jobs=2, mmap_mode="c", batch_size=1)(
        delayed(write_first)(arr) for _ in range(6))
    assert out == [1.0] * 6 and float(arr[0]) == 1.0  # each batch saw the file's data


def make_writeable(arr):
    try:
        arr.flags.writeable = True
    except ValueError:
        return "refused", arr.filename is None or os.path.exists(arr.filename)
    return "allowed", None


def test_a_read_only_argument_cannot_be_made_writeable():
    # a view over PROT_READ pages made writeable would crash its worker on a write
    arr = np.ones(N)
    out = Parallel(n_jobs=2)(delayed(make_writeable)(arr) for _ in range(2))
    assert out == [("refused", True)] * 2


def filename_of(arr):
    return isinstance(arr, np.memmap), arr.filename


def test_an_array_in_parts_names_no_file():
    arr = np.ones(N)  # joblib reopens a memmap by (filename, offset): not part 0's file
    (is_memmap, name), = Parallel(n_jobs=2)(delayed(filename_of)(arr) for _ in range(1))
    assert is_memmap and (name is None) == (len(remap.parts(N * 8)) > 1)
