"""The dispatcher: results match a list comprehension, input is read within the bound."""
from __future__ import annotations

import itertools
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parmap import Parallel, ParallelBackendBase, delayed
from parmap import _batching
from parmap._batching import MAX_AUTO_BATCH, MIN_SPLIT, AutoBatchSizer
from parmap.backends.threading import ThreadingBackend

from .conftest import recording


def double(x):
    return 2 * x


class CountingIterable:
    """Yields tasks and records how many were read, and the most read ahead of results."""

    def __init__(self, n):
        self.n = n
        self.read = 0
        self.consumed = 0  # results the test has taken
        self.max_ahead = 0

    def __iter__(self):
        for i in range(self.n):
            self.read += 1
            self.max_ahead = max(self.max_ahead, self.read - self.consumed)
            yield delayed(double)(i)


class SyncBackend(ParallelBackendBase):
    """A synchronous backend that claims several workers: runs batches on submit."""

    def submit(self, batch, callback):
        try:
            outcome = batch()
        except BaseException as exc:
            outcome = exc
        callback(outcome)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_tasks=st.integers(0, 300), n_jobs=st.integers(2, 4),
       batch_size=st.one_of(st.just("auto"), st.integers(1, 40)),
       pre_dispatch=st.one_of(st.just("all"), st.integers(1, 10), st.just("2*n_jobs")),
       return_as=st.sampled_from(["list", "generator", "generator_unordered"]),
       backend=st.sampled_from(["threading", "sync"]))
def test_dispatch_properties(n_tasks, n_jobs, batch_size, pre_dispatch, return_as, backend):
    source = CountingIterable(n_tasks)
    parallel = Parallel(n_jobs=n_jobs, backend=SyncBackend() if backend == "sync" else backend,
                        batch_size=batch_size, pre_dispatch=pre_dispatch, return_as=return_as)
    out = parallel(source)
    if return_as == "list":
        results = out
    else:
        results = []
        for value in out:
            results.append(value)
            source.consumed += 1
    expected = [2 * i for i in range(n_tasks)]
    assert (sorted(results) if return_as == "generator_unordered" else results) == expected
    assert source.read == n_tasks
    if return_as != "list" and pre_dispatch != "all":
        limit = pre_dispatch if isinstance(pre_dispatch, int) else 2 * n_jobs
        size = batch_size if isinstance(batch_size, int) else MAX_AUTO_BATCH
        # a batch is read whole before it is submitted, and the consumer holds one
        assert source.max_ahead <= (limit + 1) * size


def test_infinite_generator_bounded_with_auto_batches():
    read = itertools.count()

    def tasks():
        for i in itertools.count():
            next(read)
            yield delayed(double)(i)

    gen = Parallel(n_jobs=2, backend="threading", return_as="generator")(tasks())
    assert list(itertools.islice(gen, 1000)) == [2 * i for i in range(1000)]
    gen.close()
    assert next(read) - 1 <= 1000 + 5 * MAX_AUTO_BATCH


def test_input_read_under_a_lock():
    """The iterable is never entered by two threads at once, whoever dispatches."""
    inside = threading.Lock()
    overlaps = []

    def tasks():
        for i in range(3000):
            if not inside.acquire(blocking=False):
                overlaps.append(i)
            else:
                inside.release()
            yield delayed(double)(i)

    out = Parallel(n_jobs=2, backend="threading", batch_size=1)(tasks())
    assert out == [2 * i for i in range(3000)]
    assert overlaps == []


def test_auto_batch_size_ramps_up_for_tiny_tasks():
    backend = recording(ThreadingBackend)()
    Parallel(n_jobs=2, backend=backend)(delayed(double)(i) for i in range(50_000))
    assert max(backend.sizes) > 100
    assert len(backend.sizes) < 1000


def test_auto_batch_size_stays_small_for_slow_tasks():
    sizer = AutoBatchSizer(target=0.02, n_jobs=2)
    sizer.observe(1, 0.5)
    assert sizer.size == 1
    sizer.observe(1, 0.0001)  # a fast outlier must not make one huge batch
    assert sizer.size <= 16


def test_batches_shrunk_towards_the_end_do_not_grow_back():
    sizer = AutoBatchSizer(target=0.04, n_jobs=2, n_tasks=200)
    sizer.observe(4, 0.04)  # 10 ms a task: batches of 4
    assert sizer.size == 4
    sizes, done = [], 188
    while done < 200:
        sizes.append(sizer.next_size(done))
        done += sizes[-1]
    # down to single tasks at the very end: the two workers finish within one task (10
    # ms) of each other; the last 4 never go to one worker while the other waits
    assert sizes == [3, 3, 2, 1, 1, 1, 1]


def test_an_even_split_from_history_still_shrinks_once_tasks_prove_slow():
    def looked_quick(x):  # its own name: other tests' history stays untouched
        return x

    _batching.remember(looked_quick, 1e-6)  # history: quick, so 40 tasks split in halves
    sizer = AutoBatchSizer(target=0.05, n_jobs=2, n_tasks=40)
    sizer.prime(looked_quick, 40)
    assert sizer.next_size(0) == 20
    sizer.observe(20, 0.2)  # 10 ms a task in this call: the rest shrinks as usual
    sizes, done = [], 20
    while done < 40:
        sizes.append(sizer.next_size(done))
        done += sizes[-1]
    assert sizes[0] <= 5 and sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]


def test_batches_of_quick_tasks_stop_shrinking_at_min_split():
    sizer = AutoBatchSizer(target=0.05, n_jobs=2, n_tasks=100_000)
    for _ in range(4):  # 1 us a task: grows (16-fold a step) to MAX_AUTO_BATCH
        sizer.observe(sizer.size, 1e-6 * sizer.size)
    assert sizer.size == MAX_AUTO_BATCH
    sizes, done = [], 0
    while done < 100_000:
        sizes.append(sizer.next_size(done))
        done += sizes[-1]
    assert sizes == sorted(sizes, reverse=True)  # never growing back
    # a batch of MIN_SPLIT's worth is not split further: the round trip would cost more
    assert min(sizes[:-1]) == round(MIN_SPLIT / 1e-6) == 2000


def test_auto_batch_size_capped_by_known_length():
    sizer = AutoBatchSizer(target=1.0, n_jobs=2, n_tasks=800)
    for _ in range(10):
        sizer.observe(sizer.size, 1e-7 * sizer.size)
    assert sizer.size == 100  # 800 / (4 * 2): every worker gets several batches


@pytest.mark.parametrize("return_as", ["list", "generator"])
def test_fixed_batch_size_groups_tasks(return_as):
    sizes = []

    class Recording(SyncBackend):
        def submit(self, batch, callback):
            sizes.append(len(batch))
            super().submit(batch, callback)

    out = Parallel(n_jobs=2, backend=Recording(), batch_size=7, return_as=return_as)(
        delayed(double)(i) for i in range(30))
    assert list(out) == [2 * i for i in range(30)]
    assert sizes == [7, 7, 7, 7, 2]


def triple(x):
    return 3 * x


@pytest.mark.parametrize("sized", [True, False], ids=["list", "generator"])
def test_small_call_of_a_known_tiny_function_is_split_in_n_jobs_batches(sized):
    Parallel(n_jobs=2, backend="threading")(delayed(triple)(i) for i in range(5000))
    backend = recording(ThreadingBackend)()
    tasks = [delayed(triple)(i) for i in range(6)]
    out = Parallel(n_jobs=2, backend=backend)(tasks if sized else iter(tasks))
    assert out == [3 * i for i in range(6)]
    assert backend.sizes == [3, 3]


def test_learnt_size_of_the_first_batch_is_bounded():
    sizer = AutoBatchSizer(target=0.02, n_jobs=2)
    sizer.observe(1000, 1e-3)  # a previous call: a microsecond per task
    fresh = AutoBatchSizer(target=0.02, n_jobs=2)
    fresh.prime(quadruple, n_tasks=None)
    assert fresh.size == 1  # nothing learnt about this function
    sizer.observe(1000, 1e-3, func=quadruple)
    fresh.prime(quadruple, n_tasks=None)
    assert 1 < fresh.size <= 256  # the guess may be wrong: trust it only so far
    small = AutoBatchSizer(target=0.02, n_jobs=2, n_tasks=6)
    small.prime(quadruple, n_tasks=6)
    assert small.size == 3  # 6 us of work in all: one batch per worker
    known = AutoBatchSizer(target=0.02, n_jobs=2, n_tasks=10**6)
    known.prime(quadruple, n_tasks=10**6)
    assert known.size <= 10**6 // 8 and known.size <= MAX_AUTO_BATCH


def quadruple(x):
    return 4 * x


def megabyte(i):
    return bytes(1_000_000)


@pytest.mark.parametrize("backend_class", ["threading", "processes"])
def test_auto_batches_of_big_results_stay_under_the_byte_bound(backend_class):
    """Cheap tasks with big results: batches are bounded by bytes, not only by time, so
    the pre_dispatch bound (in batches) bounds memory on an endless stream."""
    from parmap._batching import MAX_BATCH_BYTES
    from parmap.backends.process import ProcessBackend

    cls = ThreadingBackend if backend_class == "threading" else ProcessBackend
    backend = recording(cls)()
    gen = Parallel(n_jobs=2, backend=backend, return_as="generator")(
        delayed(megabyte)(i) for i in itertools.count())
    for _, result in zip(range(300), gen):
        assert len(result) == 1_000_000
    gen.close()
    assert max(backend.sizes) * 1_000_000 <= MAX_BATCH_BYTES
    assert max(backend.sizes) > 1  # still batched


def test_the_sizer_caps_batches_by_result_bytes():
    sizer = AutoBatchSizer(target=1.0, n_jobs=2)
    sizer.observe(1, 1e-6, nbytes=2_000_000)  # fast, but 2 MB a result
    for _ in range(5):
        sizer.observe(sizer.size, 1e-6 * sizer.size, nbytes=2_000_000 * sizer.size)
    assert sizer.size == 4  # 8 MiB / 2 MB


@pytest.mark.parametrize("position", [1, 7, 40])
def test_batches_read_one_task_at_a_time_keep_every_kind_of_task(position):
    """After the first batch, tasks are read in compact form one at a time; a task of
    another function, one with keywords or one given by hand falls back to the general
    form without losing or reordering anything."""
    def tasks(odd):
        for i in range(60):
            yield odd if i == position else delayed(double)(i)

    for odd, result in [(delayed(triple)(5), 15), (delayed(double)(x=4), 8),
                        ((double, (6,), {}), 12)]:
        got = Parallel(n_jobs=2, backend=SyncBackend())(tasks(odd))
        expected = [2 * i for i in range(60)]
        expected[position] = result
        assert got == expected


def quintuple(x):
    return 5 * x


@pytest.mark.parametrize("sized", [True, False], ids=["list", "generator"])
@pytest.mark.parametrize("position", [0, 1, 7, 40])
def test_a_first_batch_sized_from_history_keeps_every_kind_of_task(position, sized):
    """A first batch that earlier calls make large reads ahead in compact form; a task of
    another function, with keywords or given by hand, inside it or among what it puts
    back, is neither lost nor moved."""
    Parallel(n_jobs=2, backend="threading")(delayed(quintuple)(i) for i in range(5000))
    for odd, result in [(delayed(triple)(5), 15), (delayed(quintuple)(x=4), 20),
                        ((quintuple, (6,), {}), 30)]:
        tasks = [delayed(quintuple)(i) for i in range(60)]
        tasks[position] = odd
        backend = recording(ThreadingBackend)()
        got = Parallel(n_jobs=2, backend=backend)(tasks if sized else iter(tasks))
        expected = [5 * i for i in range(60)]
        expected[position] = result
        assert got == expected and sum(backend.sizes) == 60
        if position > 0 or odd[0] is quintuple:  # the first task's function is known
            assert backend.sizes[0] > 1


class _NoTruth:
    """Like a numpy array of several items: asking for its truth value raises."""

    def __bool__(self):
        raise ValueError("the truth value is ambiguous")


@pytest.mark.parametrize("bad", [abs, "abc", (double, 1), (double, (1,), _NoTruth()),
                                 (1, (2,), {})])
def test_an_item_that_is_not_a_task_after_the_first_batch_is_named(bad):
    items = [delayed(double)(i) for i in range(30)]
    items[20] = bad
    with pytest.raises(TypeError, match="item 20 of the iterable.*delayed"):
        Parallel(n_jobs=2, backend=SyncBackend())(iter(items))



def nap_square(x):
    time.sleep(0.02)
    return x * x


def tasks_that_call_parallel(n, readers):
    for i in range(n):
        readers.add(threading.current_thread().name)
        # read in another thread (as it was, by the pool's manager), call Parallel there
        if threading.current_thread() is not threading.main_thread():
            Parallel(n_jobs=2)(delayed(nap_square)(j) for j in range(2))
        yield delayed(nap_square)(i)


@pytest.mark.timeout(60)
def test_an_input_generator_is_read_by_the_callers_thread_and_may_call_parallel():
    # read by the pool's manager thread (which delivers every call's results), an input
    # that calls Parallel waited for itself forever, and a slow one stalled other calls
    readers: set = set()
    out = Parallel(n_jobs=2, batch_size=1)(tasks_that_call_parallel(10, readers))
    assert out == [i * i for i in range(10)]
    assert readers == {threading.current_thread().name}
