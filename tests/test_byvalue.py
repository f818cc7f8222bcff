"""Functions a script defines (in ``__main__``) reach the workers by value without
cloudpickle (``parmap.process.byvalue``), as cloudpickle would send them."""
from __future__ import annotations

import json
import pickle
import textwrap

import pytest

from parmap.process import protocol

from .conftest import run_script

SCRIPT = textwrap.dedent('''
    import functools, json, math, sys, traceback, types, typing
    import xml.dom.minidom
    import parmap
    from parmap import Parallel, delayed

    SCALE = 2

    def helper(x):
        return math.floor(x / 2)

    def scaled(x):
        return x * SCALE + helper(x)

    def fact(n):
        return 1 if n <= 1 else n * fact(n - 1)

    def with_defaults(x, k=3, *, m=4):
        return x + k + m

    def make_adder(n):
        def add(x):
            return x + n
        return add

    def shout(func):
        @functools.wraps(func)
        def wrapper(x):
            return func(x) * 100
        return wrapper

    @shout
    def one(x):
        "one's doc"
        return 1

    def described(_):
        return [one.__name__, one.__doc__, one.__wrapped__(0), described.__qualname__]

    def tag(x):  # a submodule reached as an attribute of its package
        return xml.dom.minidom.parseString(f"<t{x}/>").documentElement.tagName

    def times_k(self, x):
        return x * self.k

    bound = types.MethodType(times_k, types.SimpleNamespace(k=3))

    def via_bound(x):
        return bound(x)

    @functools.lru_cache(maxsize=None)
    def settings():  # "load once"
        return {"scale": 3}

    def uses_cache(x):
        return x * settings()["scale"]

    @functools.cache
    def fib(n):
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    def cache_of(x):
        return [fib.cache_parameters()["maxsize"], settings.__wrapped__.__name__]

    @functools.cache
    def connection():  # "load once" per worker: one cache for the worker's life
        state = parmap.worker_state()
        state["loads"] = state.get("loads", 0) + 1
        return "conn"

    def uses_connection(x):
        connection()
        return parmap.worker_state()["loads"]

    T = typing.TypeVar("T")

    def ident(x: T) -> T:
        return typing.cast(T, x)

    @functools.cache
    def warm():  # "load once", loaded here before the workers start
        return "loaded"

    warm()

    def warm_entries(x):  # entries before the task's own call: a forked worker has the
        before = warm.cache_info().currsize  # caller's cache, with its entry
        warm()
        return before

    def run(func, *args, **kwargs):
        return Parallel(n_jobs=2, start_method=sys.argv[1])(
            delayed(func)(i, *args, **kwargs) for i in range(4))

    @functools.lru_cache(maxsize=None)
    def cached_scaled(x):
        return x * SCALE

    def make_cached(k):
        @functools.lru_cache(maxsize=None)
        def times(x):
            return x * k
        return times

    twice, thrice = make_cached(2), make_cached(3)  # two caches of one code: two caches

    out = {"scaled": run(scaled), "cached scaled": run(cached_scaled)}
    SCALE = 10  # changed between two calls on the same (warm) workers: seen
    out["scaled again"] = run(scaled)
    out["cached scaled, new arguments"] = Parallel(n_jobs=2, start_method=sys.argv[1])(
        delayed(cached_scaled)(i) for i in range(10, 14))
    out["two caches, one call"] = Parallel(n_jobs=2, start_method=sys.argv[1], batch_size=1)(
        delayed(f)(x) for f, x in [(twice, 1), (thrice, 1), (twice, 5), (thrice, 5)] * 3)
    out["two caches, two calls"] = [run(twice), run(thrice)]
    # a cache made anew after the workers started, under the name of one they had
    exec("@functools.lru_cache(maxsize=None)\\ndef cached_scaled(x):\\n    return x * SCALE")
    out["cache made anew"] = run(cached_scaled)
    out["warm cache entries"] = min(run(warm_entries))
    out["returned cache"] = Parallel(n_jobs=2, start_method=sys.argv[1])(
        delayed(lambda x: fib if sys.argv[1] == "fork" else None)(i) for i in range(2))
    out["returned cache"] = [c is fib for c in out["returned cache"] if c is not None]
    out["fact"] = run(fact)
    out["defaults"] = run(with_defaults, m=1)
    out["closure"] = run(make_adder(5))
    out["lambda"] = run(lambda x, y=7: x * y)
    out["decorated"] = run(one)
    out["attributes"] = run(described)[0]
    out["submodule"] = run(tag)
    out["bound method"] = run(via_bound)
    out["cached"] = run(uses_cache)
    out["cached recursive"] = run(fib)
    out["cache kept"] = run(cache_of)[0]
    out["loads per worker"] = max(Parallel(n_jobs=2, start_method=sys.argv[1], batch_size=1)(
        delayed(uses_connection)(i) for i in range(12)))
    out["cloudpickle"] = "cloudpickle" in sys.modules

    class Point:  # a class of __main__: cloudpickle sends it, as before
        def __init__(self, x):
            self.x = x

    out["class"] = [p.x for p in run(Point)]
    out["cloudpickle after a class"] = "cloudpickle" in sys.modules
    out["typevar"] = run(ident)  # plain pickle would name it __main__.T: cloudpickle

    class Oops(ValueError):
        pass

    def cached_and_class(x):  # through cloudpickle, the function and its cache as above
        if x == 3:
            raise Oops(x)
        return Point(uses_cache(x)).x

    try:
        run(cached_and_class)
    except Oops as exc:  # the frame keeps the code's file and line, as in the caller
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        out["frame"] = [frame.filename == cached_and_class.__code__.co_filename,
                        frame.lineno == cached_and_class.__code__.co_firstlineno + 2]
        out["before the error"] = Parallel(n_jobs=2, start_method=sys.argv[1])(
            delayed(cached_and_class)(i) for i in range(3))
    print(json.dumps(out))
''')


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_functions_of_a_script_run_in_workers_without_cloudpickle(method):
    out = json.loads(run_script(SCRIPT, timeout=120, args=(method,)))
    assert out == {
        "scaled": [i * 2 + i // 2 for i in range(4)],
        "scaled again": [i * 10 + i // 2 for i in range(4)],
        "cached scaled": [i * 2 for i in range(4)],
        "cached scaled, new arguments": [i * 10 for i in range(10, 14)],
        "two caches, one call": [2, 3, 10, 15] * 3,
        "two caches, two calls": [[0, 2, 4, 6], [0, 3, 6, 9]],
        "cache made anew": [0, 10, 20, 30],
        "warm cache entries": 1 if method == "fork" else 0,
        "returned cache": [True, True] if method == "fork" else [],
        "fact": [1, 1, 2, 6],
        "defaults": [i + 3 + 1 for i in range(4)],
        "closure": [i + 5 for i in range(4)],
        "lambda": [i * 7 for i in range(4)],
        "decorated": [100] * 4,
        "attributes": ["one", "one's doc", 1, "described"],
        "submodule": ["t0", "t1", "t2", "t3"],
        "bound method": [0, 3, 6, 9],
        "cloudpickle": False,
        "class": [0, 1, 2, 3],
        "cloudpickle after a class": True,
        "typevar": [0, 1, 2, 3],
        "cached": [0, 3, 6, 9],
        "cached recursive": [0, 1, 1, 2],
        "cache kept": [None, "settings"],
        "loads per worker": 1,
        "frame": [True, True],
        "before the error": [0, 3, 6],
    }


def test_what_it_cannot_send_falls_back_to_cloudpickle():
    main = {"__name__": "__main__"}
    exec("class Local: pass\ndef uses_class(): return Local()", main)
    assert protocol.dumps_importable(main["uses_class"]) is None  # a class of __main__
    exec("import types\nmade = types.ModuleType('made')\ndef uses_made(): return made",
         main)
    assert protocol.dumps_importable(main["uses_made"]) is None  # not importable by name
    exec("import math\ndef root(x): return math.sqrt(x)", main)
    root = pickle.loads(protocol.dumps_importable(main["root"]))
    assert root(16) == 4.0 and root.__module__ == "__main__" and root is not main["root"]


def test_a_worker_keeps_the_caches_it_was_sent_most_recently(monkeypatch):
    # a caller that makes a new cache per task would otherwise fill the worker with them
    from parmap.process import byvalue

    monkeypatch.setattr(byvalue, "_caches", type(byvalue._caches)())

    def square(x):
        return x * x

    made = [byvalue.cached(("caller", i), square, None, False)
            for i in range(byvalue.KEPT_CACHES + 5)]
    assert made[-1](3) == 9 and made[-1].__wrapped__ is square
    assert byvalue.cached(("caller", 5), square, None, False) is made[5]  # used again:
    byvalue.cached(("caller", "new"), square, None, False)  # so it stays, and the oldest
    assert list(byvalue._caches)[:2] == [("caller", 7), ("caller", 8)]  # left goes
    assert len(byvalue._caches) == byvalue.KEPT_CACHES
