"""Behaviour of Parallel/delayed that every backend must share."""
from __future__ import annotations

import inspect
import itertools
import sys
import threading
import time
import weakref

import pytest

import parmap
from parmap import Parallel, delayed, parallel_config


def square(x):
    return x * x


def add(x, y=0, *, z=0):
    return x + y + z


def test_results_in_order(backend):
    assert Parallel(n_jobs=2, backend=backend)(delayed(square)(i) for i in range(50)) == \
        [i * i for i in range(50)]


def test_args_and_kwargs(backend):
    out = Parallel(n_jobs=2, backend=backend)(
        delayed(add)(i, y=i, z=1) for i in range(10))
    assert out == [2 * i + 1 for i in range(10)]


def test_empty_input(backend):
    assert Parallel(n_jobs=2, backend=backend)([]) == []
    assert list(Parallel(n_jobs=2, backend=backend, return_as="generator")(iter([]))) == []


def test_lambdas_closures_and_bound_methods(backend):
    offset = 10

    class Box:
        def __init__(self, v):
            self.v = v

        def get(self, k):
            return self.v * k

    tasks = [delayed(lambda x: x + offset)(1), delayed(Box(3).get)(2),
             delayed(sorted)([3, 1, 2])]
    assert Parallel(n_jobs=2, backend=backend)(tasks) == [11, 6, [1, 2, 3]]


def test_generator_return_is_lazy_and_ordered(backend):
    gen = Parallel(n_jobs=2, backend=backend, return_as="generator")(
        delayed(square)(i) for i in range(30))
    assert not isinstance(gen, list)
    assert list(gen) == [i * i for i in range(30)]


def test_generator_unordered_has_every_result(backend):
    out = Parallel(n_jobs=2, backend=backend, return_as="generator_unordered")(
        delayed(square)(i) for i in range(100))
    assert sorted(out) == [i * i for i in range(100)]


def test_unordered_yields_in_completion_order(parallel_backend):
    slow_done = threading.Event()

    def task(i):
        if i == 0:
            slow_done.wait(10)
        return i

    gen = Parallel(n_jobs=2, backend=parallel_backend, batch_size=1,
                   return_as="generator_unordered")(delayed(task)(i) for i in range(6))
    first = [next(gen) for _ in range(5)]
    assert 0 not in first  # task 0 is still blocked: later tasks overtook it
    slow_done.set()
    assert list(gen) == [0]


def test_context_manager_reuses_backend(parallel_backend):
    with Parallel(n_jobs=2, backend=parallel_backend) as parallel:
        first = parallel(delayed(square)(i) for i in range(10))
        workers = parallel._backend._pool
        second = parallel(delayed(square)(i) for i in range(10, 20))
        assert parallel._backend._pool is workers
    assert first + second == [i * i for i in range(20)]


def nap_square(x):
    time.sleep(0.02)
    return x * x


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["threading", "processes"])
def test_a_generator_read_after_its_with_block_ended_says_so(name):
    # its remaining tasks were cancelled as the block ended: no result will come
    with Parallel(n_jobs=2, backend=name, return_as="generator",
                  insights=True) as parallel:
        results = parallel(delayed(nap_square)(i) for i in range(50))
        assert next(results) == 0
        time.sleep(0.2)  # more results are in: none of them is handed out after the block
    # the block ended the call though its generator is still referenced: its report is
    # final and the instance is free (the files of its arguments: test_numpy.py)
    assert parallel.insights.to_dict()["running"] is False
    assert list(parallel(delayed(square)(i) for i in range(3))) == [0, 1, 4]
    with pytest.raises(RuntimeError, match=r"cancelled when its `with Parallel\(...\)` "
                                           r"block ended.*inside the block"):
        next(results)


@pytest.mark.parametrize("name", ["threading", "processes"])
def test_a_generator_read_to_its_last_result_in_its_block_finished(name):
    with Parallel(n_jobs=2, backend=name, return_as="generator",
                  insights=True) as parallel:
        results = parallel(delayed(square)(i) for i in range(5))
        assert [next(results) for _ in range(5)] == [0, 1, 4, 9, 16]
    assert parallel.insights.to_dict()["finished"] is True
    assert list(results) == []  # nothing was left to cancel


class _Result:
    pass


def result_or_wait(i, event):
    if i == 1:
        event.wait(10)
    return _Result()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("insights", [False, True])
@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_a_result_dropped_is_not_kept_while_the_next_is_awaited(return_as, insights):
    # the call kept the last batch handed out (its arrays) until the next one came
    event, seen = threading.Event(), []
    results = Parallel(n_jobs=2, backend="threading", batch_size=1, return_as=return_as,
                       insights=insights)(delayed(result_or_wait)(i, event) for i in range(2))
    first = weakref.ref(next(results))

    def look():  # while the caller waits in next(): the first result must go
        deadline = time.monotonic() + 5
        while first() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(first() is None)
        event.set()

    threading.Thread(target=look).start()
    next(results)
    assert seen == [True]


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_a_generator_read_to_the_middle_of_its_last_batch_is_not_finished(return_as):
    # the rest of that batch was handed out after the block, as if the call had finished
    with Parallel(n_jobs=2, backend="threading", batch_size=4,
                  return_as=return_as) as parallel:
        results = parallel(delayed(square)(i) for i in range(8))
        for _ in range(5):
            next(results)
        time.sleep(0.1)  # (the last batch is in)
    with pytest.raises(RuntimeError, match="block ended"):
        next(results)


def test_a_block_cannot_begin_while_a_call_of_its_instance_runs():
    parallel = Parallel(n_jobs=2, backend="threading", return_as="generator")
    results = parallel(delayed(square)(i) for i in range(5))
    with pytest.raises(RuntimeError, match="already running"):
        with parallel:
            pass
    assert list(results) == [0, 1, 4, 9, 16]  # its end would have cancelled it


@pytest.mark.timeout(30)
@pytest.mark.parametrize("in_call", [False, True], ids=["reading", "starting"])
@pytest.mark.parametrize("name", ["threading", "processes"])
def test_a_block_ends_while_another_thread_reads_its_generators_input(name, in_call):
    # the reading thread ends the call, told to stop: ended by the block's thread under
    # it, its batch went into the instance's next call (and, with placed arrays, left
    # files: test_numpy.py). "starting": that thread is still in the call's first
    # dispatch, inside Parallel(...)(tasks)
    reading, gate, ran = threading.Event(), threading.Event(), []

    def tasks():
        yield delayed(square)(0)
        reading.set()
        gate.wait(10)  # the input is slow
        yield delayed(ran.append)(1)

    outcome = {}
    with Parallel(n_jobs=2, backend=name, return_as="generator", batch_size=1,
                  pre_dispatch=3 if in_call else 1) as parallel:
        results = None if in_call else parallel(tasks())

        def consume():
            try:
                outcome["results"] = list(results if results is not None
                                          else parallel(tasks()))
            except RuntimeError as exc:
                outcome["error"] = str(exc)

        reader = threading.Thread(target=consume)
        reader.start()
        assert reading.wait(10)
    with pytest.raises(RuntimeError, match="already running"):  # not ended under it
        parallel(delayed(square)(i) for i in range(2))
    gate.set()
    reader.join(10)
    assert "block ended" in outcome.get("error", "") and ran == []
    assert list(parallel(delayed(square)(i) for i in range(2))) == [0, 1]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["threading", "processes"])
def test_a_call_started_as_its_block_ended_ends_even_if_never_read(name):
    # the thread starting it was left to end it, and did so only when its generator
    # was read: a thread that kept the generator kept the instance busy
    reading, gate, held = threading.Event(), threading.Event(), []

    def tasks():
        yield delayed(square)(0)
        reading.set()
        gate.wait(10)
        yield delayed(square)(1)

    with Parallel(n_jobs=2, backend=name, return_as="generator", batch_size=1,
                  pre_dispatch=3) as parallel:
        starter = threading.Thread(target=lambda: held.append(parallel(tasks())))
        starter.start()
        assert reading.wait(10)
    gate.set()
    starter.join(10)
    assert list(parallel(delayed(square)(i) for i in range(2))) == [0, 1]  # it is free
    with pytest.raises(RuntimeError, match="block ended"):
        next(held[0])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["threading", "processes"])
def test_a_list_call_cut_off_by_its_block_says_so_in_its_own_terms(name):
    # it said "the generator of this Parallel call ... or use return_as='list'"
    reading, gate, outcome = threading.Event(), threading.Event(), {}

    def tasks():
        yield delayed(square)(0)
        reading.set()
        gate.wait(10)
        yield delayed(square)(1)

    def run():
        try:
            outcome["results"] = parallel(tasks())
        except RuntimeError as exc:
            outcome["error"] = str(exc)

    with Parallel(n_jobs=2, backend=name, batch_size=1, pre_dispatch=1) as parallel:
        runner = threading.Thread(target=run)
        runner.start()
        assert reading.wait(10)
    gate.set()
    runner.join(10)
    assert "still running in another thread, was cancelled when its `with Parallel(...)` " \
        "block ended: end the block once the call has returned" in outcome["error"]
    assert "generator" not in outcome["error"]


def test_a_generator_finalised_while_the_claim_lock_is_held_does_not_deadlock(monkeypatch):
    # a generator's finally can run in a garbage collection, which can start while
    # Parallel.__call__ holds its module lock (raising "already running"): ending a
    # call must not take that lock
    from parmap import _parallel

    monkeypatch.setattr(_parallel, "_CLAIM", threading.Lock())  # (a failure stays here)
    results = Parallel(n_jobs=1, return_as="generator")(delayed(abs)(-i) for i in range(3))
    next(results)
    done = threading.Event()

    def drop():
        nonlocal results
        with _parallel._CLAIM:
            results = None  # the generator's finally runs here
        done.set()

    thread = threading.Thread(target=drop, daemon=True)
    thread.start()
    assert done.wait(5)


def test_an_inline_generator_read_after_its_with_block_ended_says_so():
    # n_jobs=1 runs each task as it is read: after the block, none may run
    ran = []

    def note(x):
        ran.append(x)
        return x

    for read_first in (True, False):
        ran.clear()
        with Parallel(n_jobs=1, return_as="generator", insights=True) as parallel:
            results = parallel(delayed(note)(i) for i in range(5))
            if read_first:
                assert next(results) == 0
        # the block ended the call though its generator is still referenced
        report = parallel.insights.to_dict()
        assert report["running"] is False and report["n_tasks"] == (1 if read_first else 0)
        assert list(parallel([delayed(abs)(-1)])) == [1]  # the instance is free
        with pytest.raises(RuntimeError, match=r"cancelled when its `with Parallel\(...\)` "
                                               r"block ended"):
            next(results)
        assert ran == ([0] if read_first else [])
    with Parallel(n_jobs=1, return_as="generator") as parallel:  # all read in the block:
        results = parallel(delayed(note)(i) for i in range(2))
        assert [next(results), next(results)] == [0, 1]
    assert list(results) == []  # nothing was left to cancel


def test_instance_can_be_called_again(backend):
    parallel = Parallel(n_jobs=2, backend=backend)
    assert parallel([delayed(square)(2)]) == [4]
    assert parallel([delayed(square)(3)]) == [9]


def test_call_while_generator_running_is_an_error(backend):
    parallel = Parallel(n_jobs=2, backend=backend, return_as="generator")
    gen = parallel(delayed(square)(i) for i in range(10))
    next(gen)
    with pytest.raises(RuntimeError, match="already running"):
        parallel([delayed(square)(1)])
    gen.close()
    assert list(parallel([delayed(square)(5)])) == [25]


@pytest.mark.timeout(30)
def test_one_instance_called_from_two_threads_at_once_is_an_error(parallel_backend):
    # the second call gets the error (the two used to share the backend's pool and
    # shared-memory files, and could hang or lose a file); the first one completes
    parallel = Parallel(n_jobs=2, backend=parallel_backend)
    running, release, out = threading.Event(), threading.Event(), []

    def tasks():
        running.set()
        release.wait(10)  # the input is read in the caller's thread: the call is on
        yield from (delayed(square)(i) for i in range(4))

    first = threading.Thread(target=lambda: out.append(parallel(tasks())))
    first.start()
    assert running.wait(10)
    with pytest.raises(RuntimeError, match="already running: a call of it in another thread"):
        parallel([delayed(square)(1)])
    release.set()
    first.join(20)
    assert out == [[0, 1, 4, 9]]


def test_infinite_generator_is_read_lazily(backend):
    consumed = itertools.count()

    def tasks():
        for i in itertools.count():
            next(consumed)
            yield delayed(square)(i)

    parallel = Parallel(n_jobs=2, backend=backend, return_as="generator",
                        batch_size=1, pre_dispatch="2*n_jobs")
    gen = parallel(tasks())
    taken = list(itertools.islice(gen, 20))
    assert taken == [i * i for i in range(20)]
    read = next(consumed) - 1
    assert read <= 20 + 4, read  # at most pre_dispatch (4) batches of one task ahead
    gen.close()


def test_closing_generator_cancels_remaining(parallel_backend):
    ran = []
    gate = threading.Event()

    def task(i):
        gate.wait(10)
        ran.append(i)
        return i

    gen = Parallel(n_jobs=2, backend=parallel_backend, batch_size=1, return_as="generator",
                   pre_dispatch="all")(delayed(task)(i) for i in range(200))
    gen.close()
    gate.set()
    assert len(ran) <= 2  # only the batches already running could finish


def test_garbage_collected_generator_cancels(parallel_backend):
    gate = threading.Event()
    ran = []

    def task(i):
        gate.wait(10)
        ran.append(i)

    gen = Parallel(n_jobs=2, backend=parallel_backend, batch_size=1, return_as="generator",
                   pre_dispatch="all")(delayed(task)(i) for i in range(100))
    del gen
    gate.set()
    assert len(ran) <= 2


def test_parallel_config_sets_defaults(backend):
    with parallel_config(backend=backend, n_jobs=2):
        parallel = Parallel()
        assert parallel.n_jobs == 2
        assert parallel(delayed(square)(i) for i in range(5)) == [0, 1, 4, 9, 16]


def test_threading_runs_tasks_concurrently():
    barrier = threading.Barrier(2, timeout=10)
    out = Parallel(n_jobs=2, backend="threading", batch_size=1)(
        delayed(barrier.wait)() for _ in range(2))
    assert sorted(out) == [0, 1]  # both tasks were at the barrier at once


def test_nested_parallel_calls(backend):
    def inner(i):
        return sum(Parallel(n_jobs=2, backend=backend)(delayed(square)(j) for j in range(i)))

    assert Parallel(n_jobs=2, backend=backend)(delayed(inner)(i) for i in range(6)) == \
        [sum(j * j for j in range(i)) for i in range(6)]


def test_statistics_snapshot():
    from parmap._dispatch import Dispatcher, statistics
    from parmap.backends.sequential import SequentialBackend

    dispatcher = Dispatcher((delayed(square)(i) for i in range(10)), SequentialBackend(), 2,
                            pre_dispatch=4, batch_size=3, retain=True)
    dispatcher.start()
    assert [r for batch in dispatcher.batches(ordered=True) for r in batch] == \
        [square(i) for i in range(10)]
    stats = statistics(dispatcher)
    assert stats["dispatched_tasks"] == stats["completed_tasks"] == 10
    assert stats["dispatched_batches"] == 4
    assert stats["exhausted"] and stats["n_tasks"] == 10


def backend_chain(depth):
    """The backend class of each nested Parallel call, from this level down."""
    from parmap._parallel import Parallel as P  # the same class; a plain name for pickling

    inner = P(n_jobs=2)
    name = type(inner._backend).__name__
    if depth == 1:
        return [name]
    return [name] + inner(delayed(backend_chain)(depth - 1) for _ in range(2))[0]


@pytest.mark.parametrize("outer", ["processes", "threading"])
def test_nested_calls_use_threads_then_run_sequentially(outer):
    out = Parallel(n_jobs=2, backend=outer)(delayed(backend_chain)(3) for _ in range(2))
    assert out == [["ThreadingBackend", "SequentialBackend", "SequentialBackend"]] * 2


def recursive_parallel(peak):
    peak.append(threading.active_count())
    return Parallel()(delayed(recursive_parallel)(peak) for _ in range(2))


def test_recursive_parallel_calls_end_in_recursion_error_with_bounded_threads():
    peak = []
    with parallel_config(backend="threading", n_jobs=2):
        with pytest.raises(RecursionError):
            recursive_parallel(peak)
    assert max(peak) - threading.active_count() <= 6  # 2 outer threads + 2 x 2 nested


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_closing_a_generator_never_read_cancels_its_call_and_frees_the_instance(return_as):
    """Python 3.12+ closes a generator that never started without running its code
    (CPython gh-142766): parmap's is started before it is handed out."""
    parallel = Parallel(n_jobs=2, return_as=return_as)
    unread = parallel(delayed(abs)(-x) for x in range(100))
    unread.close()
    assert sorted(parallel(delayed(abs)(-x) for x in range(3))) == [0, 1, 2]


class SlowToCloseBar:
    """A tqdm-compatible bar whose close() (a final redraw, say) takes a while."""

    closing = threading.Event()

    def __init__(self, total=None, desc=None, unit=None):
        self.total, self.n = total, 0

    def update(self, n):
        self.n += n

    def refresh(self):
        pass

    def close(self):
        SlowToCloseBar.closing.set()
        time.sleep(0.5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["threading", "processes"])
def test_an_instance_is_busy_until_its_call_has_ended(backend):
    # a second thread calling it while the first call's bar closes gets "already
    # running": it hung (threading), or failed as "submit called before configure"
    SlowToCloseBar.closing.clear()
    parallel = Parallel(n_jobs=2, backend=backend, progress=SlowToCloseBar)
    seen = []

    def meanwhile():
        SlowToCloseBar.closing.wait(10)
        try:  # (its tasks outlast the first call's end)
            seen.append(parallel(delayed(nap_square)(i) for i in range(40)))
        except RuntimeError as exc:
            seen.append(str(exc))

    other = threading.Thread(target=meanwhile)
    other.start()
    assert parallel(delayed(abs)(-i) for i in range(10)) == list(range(10))
    other.join(10)
    assert not other.is_alive()
    assert seen[0] == [i * i for i in range(40)] or \
        seen[0].startswith("This Parallel instance is already running")
    assert parallel(delayed(abs)(-i) for i in range(3)) == [0, 1, 2]  # and free after


def reads_then_interrupted():
    yield delayed(abs)(-1)
    raise KeyboardInterrupt  # as a Ctrl-C that lands while the input is read


@pytest.mark.parametrize("backend", ["threading", "processes"])
@pytest.mark.parametrize("return_as", ["generator", "generator_unordered", "list"])
def test_ctrl_c_while_the_input_is_read_is_raised_at_once(backend, return_as):
    # not queued behind the results already in, to come out after them
    with pytest.raises(KeyboardInterrupt):
        Parallel(n_jobs=2, backend=backend, batch_size=1, return_as=return_as)(
            reads_then_interrupted())


@pytest.mark.timeout(30)
def test_a_with_blocks_end_abandons_threads_still_running_a_closed_generators_tasks():
    # as a stuck thread is abandoned outside a block; the block's own threads keep
    # their worker_state for its calls meanwhile (n_jobs threads at most)
    release = threading.Event()

    def held(x):
        if x:
            release.wait(20)
        return x, parmap.worker_state().setdefault("calls", []).append(x)

    try:
        with Parallel(n_jobs=2, backend="threading", return_as="generator") as parallel:
            assert list(parallel(delayed(held)(0) for _ in range(4))) == [(0, None)] * 4
            results = parallel(delayed(held)(x) for x in [0, 1, 1, 1])
            assert next(results) == (0, None)
            results.close()
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 5  # the block's end did not wait for them
    finally:
        release.set()


def test_a_with_blocks_threads_keep_their_state_after_a_failed_call():
    def count(x):
        if x is None:
            raise ValueError("failed")
        time.sleep(0.005)  # (so that both threads take some)
        state = parmap.worker_state()
        state["n"] = state.get("n", 0) + 1
        return state["n"], parmap.worker_id()

    with Parallel(n_jobs=2, backend="threading", batch_size=1) as parallel:
        first = parallel(delayed(count)(i) for i in range(8))
        with pytest.raises(ValueError):
            parallel(delayed(count)(x) for x in [1, None, 1])
        after = parallel(delayed(count)(i) for i in range(8))
    last: dict[int, int] = {}
    for n, wid in first:
        last[wid] = max(last.get(wid, 0), n)
    assert set(last) == {0, 1}
    for n, wid in after:  # the same two threads, whose counts went on
        assert n > last[wid]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["threading", "processes"])
def test_a_ctrl_c_between_two_lines_of_a_call_ends_that_call(backend):
    # right after the call started dispatching: its traceback (kept, as a REPL keeps
    # sys.last_traceback) kept the call running, its instance marked free
    source, first = inspect.getsourcelines(Parallel.__call__)
    target = first + next(i for i, line in enumerate(source) if "next(batches)" in line) + 1

    def tracer(frame, event, arg):
        if frame.f_code is not Parallel.__call__.__code__:
            return None

        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == target:
                sys.settrace(None)
                raise KeyboardInterrupt
            return local
        return local

    with Parallel(n_jobs=2, backend=backend, batch_size=1) as parallel:
        sys.settrace(tracer)
        try:
            with pytest.raises(KeyboardInterrupt) as info:
                parallel(delayed(nap_square)(i) for i in range(40))
        finally:
            sys.settrace(None)
        assert parallel._live is None  # ended, though its traceback is still held
        t0 = time.monotonic()
        assert parallel(delayed(abs)(-i) for i in range(4)) == [0, 1, 2, 3]
        assert time.monotonic() - t0 < 0.5  # not behind the interrupted call's tasks
    del info
