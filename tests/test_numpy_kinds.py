"""Large arrays of every kind cross to the workers and back through shared memory
intact: structured and datetime dtypes, subclasses (masked arrays, matrices), Fortran
order (placed once for all tasks), and ``mmap_mode="r+"`` next to an array whose pages
the caller remapped onto the file."""
from __future__ import annotations

import numpy as np
import pytest

from parmap import Parallel, delayed

#: every array below is over it: it goes through /dev/shm, both ways
LIMIT = dict(n_jobs=2, max_nbytes="1K")

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def warm_pool():
    # workers already running: arrays are placed in files, not inherited through fork
    Parallel(n_jobs=2)(delayed(abs)(i) for i in range(2))


def same(arr):
    return arr


def fields(arr):
    return arr.dtype.names, float(arr["x"].sum())


def test_structured_arrays_keep_their_fields():
    arr = np.zeros(1000, dtype=[("x", "f8"), ("y", "i4")])
    arr["x"] = 1
    assert Parallel(**LIMIT)(delayed(fields)(arr) for _ in range(2)) == [(("x", "y"), 1000.0)] * 2
    back = Parallel(**LIMIT)(delayed(same)(arr) for _ in range(2))
    assert back[0].dtype == arr.dtype and (back[0] == arr).all()


def masked_count(arr):
    return type(arr).__name__, int(np.ma.count_masked(arr))


def test_masked_arrays_and_matrices_keep_their_class():
    # a file holds only the data: a subclass is pickled whole, not reduced to its buffer
    arr = np.ma.masked_less(np.arange(1000.0), 100)
    assert Parallel(**LIMIT)(delayed(masked_count)(arr) for _ in range(2)) == \
        [("MaskedArray", 100)] * 2
    back = Parallel(**LIMIT)(delayed(same)(arr) for _ in range(2))
    assert isinstance(back[0], np.ma.MaskedArray) and int(back[0].mask.sum()) == 100
    with pytest.warns(PendingDeprecationWarning):  # numpy's, for making a matrix
        matrix = np.asmatrix(np.ones((40, 40)))
    assert type(Parallel(**LIMIT)(delayed(same)(matrix) for _ in range(2))[0]) is np.matrix


def test_datetime_and_timedelta_arrays_are_placed():
    # a memoryview of them is refused: they are written as bytes
    for arr in (np.arange(1000).astype("datetime64[s]"), np.arange(1000).astype("m8[ms]")):
        back = Parallel(**LIMIT)(delayed(same)(arr) for _ in range(2))
        assert back[0].dtype == arr.dtype and (back[0] == arr).all()


def test_a_fortran_ordered_array_is_placed_once_for_all_its_tasks(count_placements):
    arr = np.asfortranarray(np.arange(20_000.0).reshape(200, 100))
    assert Parallel(**LIMIT)(delayed(np.sum)(arr) for _ in range(20)) == [arr.sum()] * 20
    assert count_placements == [arr.nbytes]  # one C copy, not one per task


def set_one(arr, i):
    arr[i] = 1.0


def test_r_plus_writes_reach_the_file_not_a_remapped_callers_array():
    # the caller's pages of an array of 32 MB or more are remapped onto the file it
    # places (one copy in memory); with r+ they are not, or the workers' writes would
    # show through in part
    arr = np.zeros(5_000_000)  # 40 MB
    small = np.zeros(1000)
    for a in (arr, small):
        Parallel(**LIMIT, mmap_mode="r+")(delayed(set_one)(a, i) for i in range(4))
        assert not a[:4].any()


def zero_d(i):
    return np.array(float(i))


def test_zero_dimensional_results_keep_their_shape():
    # np.ascontiguousarray made them 1-d on their way through /dev/shm
    out = Parallel(n_jobs=2, max_nbytes=0)(delayed(zero_d)(i) for i in range(4))
    assert [(r.shape, float(r)) for r in out] == [((), float(i)) for i in range(4)]


def total(arr):
    return float(arr.sum())


def test_copy_on_write_and_deleted_memmaps_are_copied_not_referenced(tmp_path):
    path = tmp_path / "data.bin"
    np.arange(1000, dtype="f8").tofile(path)
    private = np.memmap(path, dtype="f8", mode="c")
    private[:] = 1.0  # the caller's own values: not in the file
    assert Parallel(**LIMIT)(delayed(total)(private) for _ in range(2)) == [1000.0] * 2
    scratch = np.memmap(path, dtype="f8", mode="r+")
    path.unlink()  # a scratch file removed while its mapping lives on
    assert Parallel(**LIMIT)(delayed(total)(scratch) for _ in range(2)) == [499500.0] * 2
