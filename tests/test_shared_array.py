"""parmap.shared_array: arrays in shared memory from the start, sent to workers by reference."""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from parmap import Parallel, delayed, shared_array

from .conftest import shm_entries


def part_sum(arr, i, parts):
    n = len(arr)
    return float(arr[i * n // parts:(i + 1) * n // parts].sum()), bool(arr.flags.writeable)


def fill_row(out, i):
    out[i] = i


def test_a_zero_filled_writable_memmap_whose_file_goes_with_it():
    before = shm_entries()
    arr = shared_array((3, 4), dtype=np.int32)
    assert isinstance(arr, np.memmap) and arr.shape == (3, 4) and arr.dtype == np.int32
    assert arr.flags.writeable and not arr.any()
    path = str(arr.filename)
    assert os.path.exists(path) and oct(os.stat(path).st_mode & 0o777) == "0o600"
    view = arr[1:]
    del arr
    gc.collect()
    assert os.path.exists(path)  # a view still holds the memory
    del view
    gc.collect()
    assert not os.path.exists(path)
    assert shm_entries() == before


def test_shapes_and_dtypes_like_numpy():
    for shape, dtype, expected in [(5, float, (5,)), ([2, 3], "f4", (2, 3)), ((), "i8", ()),
                                   (0, float, (0,)), ((2, 0), np.uint8, (2, 0))]:
        arr = shared_array(shape, dtype)
        assert arr.shape == expected and arr.dtype == np.dtype(dtype)
        del arr
    gc.collect()


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="dtype"):
        shared_array(3, dtype=object)
    with pytest.raises(TypeError, match="shape"):
        shared_array("3")
    with pytest.raises(ValueError, match="shape"):
        shared_array((2, -1))
    for shape in [10 ** 19, (10 ** 12, 10 ** 12)]:  # more bytes than a file can hold
        with pytest.raises(ValueError, match="shape"):
            shared_array(shape)


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_sent_to_workers_without_a_copy(start_method, count_placements):
    data = shared_array(4 * 1024 ** 2 // 8)  # 4 MiB, above the 1M default threshold
    data[:] = np.arange(len(data))
    got = Parallel(n_jobs=2, start_method=start_method)(
        delayed(part_sum)(data, i, 4) for i in range(4))
    n = len(data)
    assert got == [(float(np.arange(i * n // 4, (i + 1) * n // 4).sum()), False)
                   for i in range(4)]
    assert count_placements == []  # referenced, never copied into a new file
    del data
    gc.collect()


def test_tasks_fill_one_output_with_r_plus():
    out = shared_array((8, 1000))
    Parallel(n_jobs=2, mmap_mode="r+")(delayed(fill_row)(out, i) for i in range(8))
    assert out[:, 0].tolist() == list(range(8)) and float(out[3].sum()) == 3000.0
    del out
    gc.collect()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_never_removes_the_parents_file():
    arr = shared_array(10)
    path = str(arr.filename)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child drops its copy of the array
        del arr
        gc.collect()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.path.exists(path)
    del arr
    gc.collect()
    assert not os.path.exists(path)
