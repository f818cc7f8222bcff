"""``delayed(f)(x) for x in xs`` is read from ``xs`` without running the expression, and
every other expression is run as written."""
from __future__ import annotations

import inspect
import itertools
import math

import joblib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import parmap
from parmap import Parallel, delayed
from parmap._batching import MAX_AUTO_BATCH
from parmap._genexpr import delayed_calls
from parmap.backends.threading import ThreadingBackend

from .conftest import recording


def double(x):
    return 2 * x


def add(x, y=0):
    return x + y


class Counted:
    """An iterator over ``range(n)`` that counts the items taken from it."""

    def __init__(self, n=None):
        self._it = itertools.count() if n is None else iter(range(n))
        self.read = 0

    def __iter__(self):
        return self

    def __next__(self):
        value = next(self._it)
        self.read += 1
        return value


class Reads:
    """``.value`` is a property that counts its reads (``.reads``) and returns
    ``give(reads)``."""

    def __init__(self, give):
        self.give = give
        self.reads = 0

    @property
    def value(self):
        self.reads += 1
        return self.give(self.reads)


def closure_over(func):
    return (delayed(func)(x) for x in range(3))


def test_the_idiom_is_recognised_whatever_the_names_are_bound_to():
    xs = range(3)
    cases = {
        "global": ((delayed(double)(x) for x in xs), double),
        "builtin": ((delayed(abs)(x) for x in xs), abs),
        "attribute chain": ((parmap.delayed(math.sqrt)(i) for i in xs), math.sqrt),
        "enclosing function's variable": (closure_over(double), double),
    }
    for label, (expression, func) in cases.items():
        found = delayed_calls(expression)
        assert found is not None, label
        assert found[0] is func, label
        assert list(found[1]) == [0, 1, 2], label
        assert found[2] == 3, label  # the length of a range is known at once


def test_an_argument_that_is_not_the_loop_variable_is_looked_up_once():
    y = 7
    for expression, value in [((delayed(double)(y) for _ in range(3)), 7),
                              ((delayed(double)(2.5) for _ in range(3)), 2.5),
                              ((delayed(double)("a") for _ in range(3)), "a")]:
        found = delayed_calls(expression)
        assert found is not None
        assert list(found[1]) == [value] * 3 and found[2] == 3


def test_an_attribute_as_the_argument_is_read_for_every_task():
    counter = Reads(lambda n: n)
    expression = (delayed(double)(counter.value) for _ in range(3))
    assert delayed_calls(expression) is None
    assert Parallel(n_jobs=2, backend="threading")(expression) == [2, 4, 6]


def test_a_range_too_long_for_a_length_is_read_as_an_endless_input():
    found = delayed_calls(delayed(double)(x) for x in range(2 ** 64))
    assert found is not None and found[2] is None
    out = Parallel(n_jobs=2, backend="threading", return_as="generator")(
        delayed(double)(x) for x in range(2 ** 64))
    assert list(itertools.islice(out, 5)) == [0, 2, 4, 6, 8]
    out.close()


def test_the_number_of_tasks_is_known_only_where_the_iterator_tells_it_exactly():
    assert delayed_calls(delayed(double)(x) for x in [1, 2])[2] == 2
    assert delayed_calls(delayed(double)(x) for x in Counted(5))[2] is None
    assert delayed_calls(delayed(double)(x) for x in {1: 0, 2: 0})[2] is None


@pytest.mark.parametrize("label", ["condition", "two arguments", "keyword", "expression",
                                   "call", "two loops", "unpacking", "other delayed",
                                   "list", "started"])
def test_other_inputs_are_not_recognised(label):
    xs = range(4)
    y = 1
    inputs = {
        "condition": (delayed(double)(x) for x in xs if x),
        "two arguments": (delayed(add)(x, y) for x in xs),
        "keyword": (delayed(add)(x, y=1) for x in xs),
        "expression": (delayed(double)(x + 1) for x in xs),
        "call": (delayed(double)(len(xs)) for x in xs),
        "two loops": (delayed(double)(x) for x in xs for _ in xs),
        "unpacking": (delayed(add)(x) for x, in zip(xs)),
        "other delayed": (joblib.delayed(double)(x) for x in xs),
        "list": [delayed(double)(x) for x in xs],
    }
    if label == "started":
        started = (delayed(double)(x) for x in xs)
        next(started)
        inputs["started"] = started
    assert delayed_calls(inputs[label]) is None


def test_a_recognised_expression_is_not_run_and_its_iterator_is_read():
    source = Counted(100)
    expression = (delayed(double)(x) for x in source)
    assert Parallel(n_jobs=2, backend="threading")(expression) == [2 * i for i in range(100)]
    assert source.read == 100
    # never started: a run expression would have ended (and dropped its frame)
    assert inspect.getgeneratorstate(expression) == inspect.GEN_CREATED  # (3.10 too)


@pytest.mark.parametrize("backend", ["threading", "processes"])
def test_recognised_calls_give_the_results_and_errors_of_the_expression(backend):
    expected = [math.sqrt(i) for i in range(3000)]
    assert Parallel(n_jobs=2, backend=backend)(
        delayed(math.sqrt)(i) for i in range(3000)) == expected
    with pytest.raises(ValueError) as info:
        Parallel(n_jobs=2, backend=backend)(delayed(math.sqrt)(x) for x in [4.0] * 50 + [-1.0])
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "task 50" in notes and "sqrt(-1.0)" in notes


@pytest.mark.parametrize("return_as", ["list", "generator"])
def test_n_jobs_1_runs_a_recognised_call_in_the_callers_thread(return_as):
    source = Counted(3000)
    expression = (delayed(math.sqrt)(x) for x in source)
    out = Parallel(n_jobs=1, return_as=return_as)(expression)
    assert list(out) == [math.sqrt(i) for i in range(3000)]
    assert source.read == 3000 and expression.gi_frame is not None  # never started
    with pytest.raises(ValueError, match="math domain error") as info:  # plain, for pdb
        list(Parallel(n_jobs=1, return_as=return_as)(delayed(math.sqrt)(x) for x in [4.0, -1.0]))
    assert not getattr(info.value, "__notes__", None)


def test_a_name_bound_to_something_else_runs_the_expression_as_written():
    with pytest.raises(TypeError, match="callable"):
        Parallel(n_jobs=2, backend="threading")(delayed(3)(x) for x in range(4))
    with pytest.raises(NameError, match="not_defined_anywhere"):
        Parallel(n_jobs=2, backend="threading")(
            delayed(not_defined_anywhere)(x) for x in range(4))  # noqa: F821


def test_an_error_of_the_iterated_input_reaches_the_caller():
    def numbers():
        yield from range(500)
        raise KeyError("input broke")

    with pytest.raises(KeyError, match="input broke"):
        Parallel(n_jobs=2, backend="threading")(delayed(double)(x) for x in numbers())


@pytest.mark.parametrize("options", [{"timeout": 30}, {"insights": True}],
                         ids=["timeout", "insights"])
def test_recognised_batches_run_with_a_tracker_or_a_recording(options):
    out = Parallel(n_jobs=2, backend="threading", **options)(
        delayed(double)(x) for x in range(2000))
    assert out == [2 * i for i in range(2000)]


def test_an_infinite_input_is_read_within_the_bound():
    source = Counted()
    out = Parallel(n_jobs=2, backend="threading", return_as="generator")(
        delayed(double)(x) for x in source)
    assert list(itertools.islice(out, 1000)) == [2 * i for i in range(1000)]
    out.close()
    assert source.read <= 1000 + 5 * MAX_AUTO_BATCH


def test_a_first_batch_sized_from_an_earlier_call_puts_back_what_it_read_ahead():
    Parallel(n_jobs=2, backend="threading")(delayed(add)(i) for i in range(5000))
    backend = recording(ThreadingBackend)()
    out = Parallel(n_jobs=2, backend=backend)(delayed(add)(i) for i in range(7))
    assert out == list(range(7))
    assert backend.sizes == [4, 3]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_tasks=st.integers(0, 300), batch_size=st.one_of(st.just("auto"), st.integers(1, 40)),
       pre_dispatch=st.one_of(st.just("all"), st.integers(1, 10)),
       return_as=st.sampled_from(["list", "generator", "generator_unordered"]))
def test_recognised_calls_match_a_list_comprehension(n_tasks, batch_size, pre_dispatch,
                                                     return_as):
    source = Counted(n_tasks)
    out = Parallel(n_jobs=2, backend="threading", batch_size=batch_size,
                   pre_dispatch=pre_dispatch, return_as=return_as)(
        delayed(double)(x) for x in source)
    results = list(out)
    expected = [2 * i for i in range(n_tasks)]
    assert (sorted(results) if return_as == "generator_unordered" else results) == expected
    assert source.read == n_tasks


def stop_at_3(x):
    if x == 3:
        raise StopIteration
    return x


@pytest.mark.parametrize("backend", ["threading", "processes"])
@pytest.mark.parametrize("form", ["expression", "list"])
def test_a_task_raising_stop_iteration_fails_the_call_naming_it(backend, form):
    """map() would take it for the end of the batch and drop the rest silently."""
    tasks = (delayed(stop_at_3)(x) for x in range(6))
    with pytest.raises(RuntimeError, match="StopIteration") as info:
        Parallel(n_jobs=2, backend=backend, batch_size=2)(
            tasks if form == "expression" else list(tasks))
    assert "task 3: stop_at_3(3)" in "\n".join(info.value.__notes__)


@pytest.mark.parametrize("watch", [{}, {"verbose": 1}, {"progress": lambda done, total: None},
                                   {"insights": True}])
@pytest.mark.parametrize("form", ["expression", "list"])
def test_with_n_jobs_1_a_task_raising_stop_iteration_is_an_error_as_in_a_loop(watch, form):
    def tasks():
        made = (delayed(stop_at_3)(x) for x in range(6))
        return made if form == "expression" else list(made)

    with pytest.raises(StopIteration):  # itself, watched or not
        Parallel(n_jobs=1, **watch)(tasks())
    # a generator cannot raise it on (it would end the caller's loop): named instead,
    # as with workers, not Python's "generator raised StopIteration"
    with pytest.raises(RuntimeError, match="the task raised StopIteration") as info:
        list(Parallel(n_jobs=1, return_as="generator", **watch)(tasks()))
    assert "task 3: stop_at_3(3)" in "\n".join(info.value.__notes__)
    assert isinstance(info.value.__cause__, StopIteration)


def test_an_attribute_chain_is_not_evaluated_for_another_delayed():
    holder = Reads(lambda n: double)
    out = Parallel(n_jobs=2, backend="threading")(joblib.delayed(holder.value)(x) for x in range(3))
    assert out == [0, 2, 4]
    assert holder.reads == 3  # once per task, by the expression itself
