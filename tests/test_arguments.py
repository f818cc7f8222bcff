"""Every bad argument gets a ValueError/TypeError that names it."""
from __future__ import annotations

import numpy as np
import pytest

import parmap
from parmap import Parallel, delayed, effective_n_jobs, parallel_config
from parmap._checks import (check_n_jobs, check_timeout, parse_pre_dispatch, parse_size,
                            resolve_n_jobs)
from parmap.backends.threading import ThreadingBackend


@pytest.mark.parametrize("value", [0, "0", True, False, "two", "", float("nan"), 0.5, 10**400,
                                   pytest.param(10**5000, id="10**5000")])
def test_bad_n_jobs_is_a_value_error(value):
    with pytest.raises(ValueError, match="n_jobs"):
        Parallel(n_jobs=value)


@pytest.mark.parametrize("value", [[2], object(), b"2"])
def test_n_jobs_of_wrong_type_is_a_type_error(value):
    with pytest.raises(TypeError, match="n_jobs"):
        Parallel(n_jobs=value)


@pytest.mark.parametrize("value, expected", [(2, 2), (2.9, 2), ("3", 3), (" 4 ", 4),
                                             (None, None), (-1, -1), (-2.5, -2)])
def test_n_jobs_accepted(value, expected):
    assert check_n_jobs(value) == expected


def test_negative_n_jobs_counts_from_cpu_count():
    n = parmap.cpu_count()
    assert resolve_n_jobs(-1) == n
    assert resolve_n_jobs(-2) == max(1, n - 1)
    assert resolve_n_jobs(-1000) == 1
    assert resolve_n_jobs(None) == 1
    assert effective_n_jobs(-1) == n


def test_n_jobs_none_uses_config():
    assert Parallel().n_jobs is None
    with parallel_config(n_jobs=3):
        assert Parallel().n_jobs == 3
        assert Parallel(n_jobs=2).n_jobs == 2  # explicit wins
    assert Parallel().n_jobs is None


@pytest.mark.parametrize("value", ["lists", "", None, "Generator"])
def test_bad_return_as(value):
    with pytest.raises(ValueError, match="return_as"):
        Parallel(return_as=value)


@pytest.mark.parametrize("value", [0, -1, "big", 1.5, True, None, 2 ** 63, 10 ** 30,
                                   pytest.param(10 ** 5000, id="10**5000")])
def test_bad_batch_size(value):
    with pytest.raises(ValueError, match="batch_size"):
        Parallel(batch_size=value)


@pytest.mark.parametrize("value, expected", [
    ("all", None), (3, 3), ("3", 3), ("2*n_jobs", 8), ("2 * n_jobs", 8), ("n_jobs", 4),
    (" 3 *\tn_jobs ", 12), ("3*n_jobs+1", 13), ("(n_jobs + 2) // 2", 3), ("n_jobs / 2", 2),
    ("-n_jobs + 10", 6)])
def test_pre_dispatch_expressions(value, expected):
    assert parse_pre_dispatch(value, 4) == expected


@pytest.mark.parametrize("value", [
    "__import__('os').system('true')", "n_jobs ** 2", "x * 2", "0", "n_jobs - 4", "1/0",
    "n_jobs()", "[1]", "2*", "open('f')", "1e400", True, 0, -3, "1" * 5000 + "*n_jobs"])
def test_bad_pre_dispatch(value):
    with pytest.raises(ValueError, match="pre_dispatch"):
        parse_pre_dispatch(value, 4)


def test_bad_pre_dispatch_rejected_by_parallel():
    with pytest.raises(ValueError, match="pre_dispatch"):
        Parallel(pre_dispatch="import os")
    with pytest.raises(TypeError, match="pre_dispatch"):
        Parallel(pre_dispatch=[1])


@pytest.mark.parametrize("value", [0, -1, "1s", True])
def test_bad_timeout(value):
    with pytest.raises(ValueError, match="timeout"):
        Parallel(timeout=value)


def test_a_timeout_too_large_for_a_float_is_no_timeout():
    assert check_timeout(10**400) == check_timeout(float("inf")) == float("inf")


def test_bad_backend_name_lists_choices():
    with pytest.raises(ValueError, match="Invalid backend: 'nope' is not registered.*threading"):
        Parallel(backend="nope")
    with pytest.raises(TypeError, match="backend"):
        Parallel(backend=3)


def test_a_bad_start_method_names_where_it_came_from(monkeypatch):
    with pytest.raises(ValueError, match="^start_method must be 'auto' or one of"):
        Parallel(n_jobs=2, start_method="Spawn")
    monkeypatch.setenv("PARMAP_START_METHOD", "Spawn")
    with pytest.raises(ValueError, match="^the PARMAP_START_METHOD variable must be 'auto' "
                                         "or one of .*got 'Spawn'"):
        Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(4))


@pytest.mark.parametrize("key, value", [("prefer", "gpu"), ("require", "shm"),
                                        ("mmap_mode", "rw"), ("verbose", "loud"),
                                        ("max_nbytes", "1Q"), ("max_nbytes", -5)])
def test_bad_other_arguments(key, value):
    with pytest.raises((ValueError, TypeError), match=key):
        Parallel(**{key: value})


@pytest.mark.parametrize("value, expected", [(None, None), (0, 0), (1000, 1000), ("1M", 2**20),
                                             ("500K", 500 * 1024), ("2G", 2 * 2**30),
                                             ("1.5k", 1536), ("10", 10), (" 2 MB ", 2 * 2**20),
                                             ("1.5 kb", 1536), ("7B", 7), (np.int64(5), 5),
                                             ("9007199254740993", 2**53 + 1)])
def test_max_nbytes_sizes(value, expected):
    assert parse_size(value) == expected


def test_numpy_numbers_are_accepted_where_numbers_are():
    """As any numbers.Real / numbers.Integral: numpy's scalars pass the checks."""
    assert check_n_jobs(np.int64(2)) == 2 and check_n_jobs(np.float32(3.0)) == 3
    assert Parallel(n_jobs=np.int32(2), batch_size=np.int64(4), timeout=np.float64(1.5),
                    verbose=np.int8(0))(delayed(abs)(-i) for i in range(3)) == [0, 1, 2]
    with pytest.raises(ValueError, match="batch_size"):
        Parallel(batch_size=np.float64(4.0))


@pytest.mark.parametrize("value", ["1.M", "M", "1K B", "1..5K", ".5M", "1e3", "-1K", "²K",
                                   "", "B", 1.5, np.float64(2.0), "1" * 5000])
def test_bad_max_nbytes_sizes(value):
    with pytest.raises(ValueError, match="max_nbytes must be None, a non-negative int"):
        parse_size(value)


def test_delayed_rejects_non_callables():
    with pytest.raises(TypeError, match="delayed"):
        delayed(3)


@pytest.mark.parametrize("backend", ["threading", "processes"])
@pytest.mark.parametrize("n_jobs", [1, 2])
def test_items_that_are_not_tasks(n_jobs, backend):
    with pytest.raises(TypeError, match="item 1 of the iterable.*delayed"):
        Parallel(n_jobs=n_jobs, backend=backend)([delayed(abs)(1), abs, delayed(abs)(2)])
    Parallel(n_jobs=n_jobs, backend=backend)(delayed(abs)(-i) for i in range(100))
    for first in [(), (abs,), "abc"]:  # the first item, whatever earlier calls learnt
        with pytest.raises(TypeError, match="item 0 of the iterable.*delayed"):
            Parallel(n_jobs=n_jobs, backend=backend)([first, delayed(abs)(1)])


def test_require_sharedmem_with_process_like_backend_is_rejected():
    class NoShare(parmap.ParallelBackendBase):
        def submit(self, batch, callback):
            callback(batch())

    with pytest.raises(ValueError, match="sharedmem"):
        Parallel(backend=NoShare(), require="sharedmem")
    with parallel_config(backend=NoShare()):  # from the context it falls back to threads
        assert Parallel(require="sharedmem")._backend.supports_sharedmem


def test_prefer_threads_picks_threading():
    assert type(Parallel(prefer="threads")._backend).__name__ == "ThreadingBackend"


def test_unknown_keyword_is_a_type_error_naming_it_and_the_valid_ones():
    with pytest.raises(TypeError, match=r"'bogus_option'.*'processes' accepts.*initializer"):
        Parallel(n_jobs=2, bogus_option=3)
    with pytest.raises(TypeError, match=r"'max_nbyte'"):
        Parallel(max_nbyte="1M")  # a typo of max_nbytes
    with pytest.raises(TypeError, match=r"'workers'.*'threading' accepts.*none"):
        Parallel(backend="threading", workers=2)
    with pytest.raises(TypeError, match=r"parallel_config.*'bogus'"):
        parallel_config(backend="threading", bogus=1)
    assert Parallel(n_jobs=2, idle_timeout=30)._backend.idle_timeout == 30


def test_process_pool_keywords_are_dropped_by_a_backend_the_caller_did_not_name():
    # library code asking for recycling runs under the backend its user chose, as in
    # joblib (nested calls in a task run on threads too); a typo is still an error
    with parallel_config(backend="threading"):
        parallel = Parallel(n_jobs=2, max_tasks_per_child=3, start_method="spawn")
        assert type(parallel._backend).__name__ == "ThreadingBackend"
        assert parallel(delayed(abs)(-i) for i in range(3)) == [0, 1, 2]
        with parallel_config(max_tasks_per_child=3):
            assert Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(3)) == [0, 1, 2]
        with pytest.raises(TypeError, match=r"'max_task_per_child'.*spelling"):
            Parallel(n_jobs=2, max_task_per_child=3)
        with pytest.raises(TypeError, match=r"'max_task_per_child'.*spelling"):
            parallel_config(max_task_per_child=3)
    with parallel_config(backend=ThreadingBackend()):  # an instance alike
        assert type(Parallel(n_jobs=2, idle_timeout=3)._backend).__name__ == \
            "ThreadingBackend"
    # chosen in the same call (prefer, require, backend): the caller's mistake
    for chosen in ({"prefer": "threads"}, {"require": "sharedmem"},
                   {"backend": "threading"}):
        with pytest.raises(TypeError, match=r"'max_tasks_per_child', an option of the "
                                            r"process backend.*'threading'"):
            Parallel(n_jobs=2, max_tasks_per_child=3, **chosen)
    # what tasks rely on is never dropped
    with parallel_config(backend="threading"):
        with pytest.raises(TypeError, match="'initializer'"):
            Parallel(n_jobs=2, initializer=print)
    with pytest.raises(TypeError, match="backend instance"):
        Parallel(backend=ThreadingBackend(), max_tasks_per_child=3)


def test_backend_params_of_a_config_block_reach_its_backend_only():
    with parallel_config(backend="processes", idle_timeout=12):
        assert Parallel()._backend.idle_timeout == 12
        assert type(Parallel(backend="threading")._backend).__name__ == "ThreadingBackend"


def test_a_multiprocessing_context_as_backend_picks_its_start_method():
    import multiprocessing

    parallel = Parallel(n_jobs=2, backend=multiprocessing.get_context("spawn"))
    assert parallel._backend.start_method == "spawn"
    assert parallel(delayed(abs)(-i) for i in range(3)) == [0, 1, 2]


def test_an_initializer_on_an_inline_run_warns_that_it_does_not_run():
    with pytest.warns(UserWarning, match=r"^initializer and finalizer do not run with "
                      r"n_jobs=1: the tasks run in the calling process"):
        assert Parallel(n_jobs=1, initializer=print, finalizer=print)(
            delayed(abs)(-i) for i in range(3)) == [0, 1, 2]
    with pytest.warns(UserWarning, match=r"^initializer does not run with n_jobs=1"):
        with Parallel(n_jobs=1, initializer=print) as parallel:
            assert parallel(delayed(abs)(-i) for i in range(3)) == [0, 1, 2]


def test_timeout_on_an_inline_run_warns_in_joblibs_words():
    with pytest.warns(UserWarning, match=r"^The backend class 'SequentialBackend' does not "
                      r"support timeout. You have set 'timeout=1' in Parallel but the "
                      r"'timeout' parameter will not be used.$"):
        assert Parallel(n_jobs=1, timeout=1)(delayed(abs)(-i) for i in range(3)) == [0, 1, 2]
