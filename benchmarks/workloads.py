"""The workloads of the suite and, for each library, the code a user would write for them.

Each snippet is executed verbatim in a fresh interpreter by :mod:`benchmarks.child`, timed
from its first line (the library's import) to its last (results in hand, pool closed where
the library wants an explicit close).  Names available to a snippet: ``sqrt``, ``sleep``,
the functions of :mod:`benchmarks.tasks` (``spin``, ``numbers``, ``slice_sum``, ``full``)
and the workload's parameters (``N``, ``LOOPS``, ...).  ``setup`` (one string, or one per
library) runs before the timer,
``check`` after it; a failing ``check`` fails the run loudly.  Libraries listed in a
workload's ``optional`` run only when ``--libs`` names them; those in
``optional_with_thread`` likewise in the "with a background thread" situation. A
``script_only`` workload has no such situation (it starts no process).

Every library gets ``n_jobs=2`` workers.  Where a peer needs a chunk size from its user
(``ProcessPoolExecutor.map`` defaults to 1), it gets the stdlib ``Pool.map`` default,
``max(1, N // (4 * 2))`` for a sized input, and 256 for a generator.
"""

LIBS = ["parmap", "joblib", "joblib-threading", "mp.Pool", "ProcessPool", "ThreadPool",
        "mpire", "sequential"]
REFERENCES = {"sequential"}  # shown in the table, never counted as a peer

_P = "from parmap import Parallel, delayed\n"
_J = "from joblib import Parallel, delayed\n"
_MP = "import multiprocessing as mp\nwith mp.Pool(2) as pool:\n    "
_PPE = "from concurrent.futures import ProcessPoolExecutor\nwith ProcessPoolExecutor(2) as ex:\n    "
_TPE = "from concurrent.futures import ThreadPoolExecutor\nwith ThreadPoolExecutor(2) as ex:\n    "
_MPIRE = "from mpire import WorkerPool\nwith WorkerPool(n_jobs=2) as pool:\n    "
_THR = 'backend="threading"'
_SCRIPT_FN = ('import sys\n'
              'exec("def square(x):\\n    return x * x\\n", sys.modules["__main__"].__dict__)\n'
              'square = sys.modules["__main__"].square')

WORKLOADS = {
    "tiny": {
        "title": "N calls of math.sqrt",
        "params": {"N": 100_000}, "quick": {"N": 10_000},
        "code": {
            "parmap": _P + "result = Parallel(n_jobs=2)(delayed(sqrt)(i) for i in range(N))",
            "joblib": _J + "result = Parallel(n_jobs=2)(delayed(sqrt)(i) for i in range(N))",
            "mp.Pool": _MP + "result = pool.map(sqrt, range(N))",
            "ProcessPool": _PPE + "result = list(ex.map(sqrt, range(N), chunksize=max(1, N // 8)))",
            "mpire": _MPIRE + "result = pool.map(sqrt, range(N))",
        },
        "check": "assert list(result) == [sqrt(i) for i in range(N)]",
    },
    "script-fn": {
        "title": "N calls of a function the script defines (x * x)",
        "params": {"N": 100_000}, "quick": {"N": 10_000},
        # defined in __main__ before the timer, as a script's own function is: the
        # workers cannot import it by name (spawn, forkserver), so libraries that pickle
        # functions by value (parmap, joblib) send it that way; forked peers need not
        "setup": _SCRIPT_FN,
        "code": {
            "parmap": _P + "result = Parallel(n_jobs=2)(delayed(square)(i) for i in range(N))",
            "joblib": _J + "result = Parallel(n_jobs=2)(delayed(square)(i) for i in range(N))",
            "mp.Pool": _MP + "result = pool.map(square, range(N))",
            "ProcessPool": _PPE + "result = list(ex.map(square, range(N), chunksize=max(1, N // 8)))",
            "mpire": _MPIRE + "result = pool.map(square, range(N))",
        },
        "check": "assert list(result) == [i * i for i in range(N)]",
    },
    "generator": {
        "title": "N calls of math.sqrt fed from a generator",
        "params": {"N": 200_000}, "quick": {"N": 20_000},
        "code": {
            "parmap": _P + "result = Parallel(n_jobs=2)(delayed(sqrt)(x) for x in numbers(N))",
            "joblib": _J + "result = Parallel(n_jobs=2)(delayed(sqrt)(x) for x in numbers(N))",
            "mp.Pool": _MP + "result = list(pool.imap(sqrt, numbers(N), chunksize=256))",
            "ProcessPool": _PPE + "result = list(ex.map(sqrt, numbers(N), chunksize=256))",
            "mpire": _MPIRE + "result = pool.map(sqrt, numbers(N), chunk_size=256)",
        },
        "check": "assert list(result) == [sqrt(i) for i in range(N)]",
    },
    "cpu": {
        "title": "N pure-Python CPU tasks of ~5 ms (spin(LOOPS))",
        "params": {"N": 400}, "quick": {"N": 40},  # LOOPS is calibrated by the suite
        "code": {
            "parmap": _P + "result = Parallel(n_jobs=2)(delayed(spin)(LOOPS) for _ in range(N))",
            "joblib": _J + "result = Parallel(n_jobs=2)(delayed(spin)(LOOPS) for _ in range(N))",
            "mp.Pool": _MP + "result = pool.map(spin, [LOOPS] * N)",
            "ProcessPool": _PPE + "result = list(ex.map(spin, [LOOPS] * N, chunksize=max(1, N // 8)))",
            "mpire": _MPIRE + "result = pool.map(spin, [LOOPS] * N)",
        },
        "check": "assert list(result) == [LOOPS * (LOOPS - 1) // 2] * N",
    },
    "sleep": {
        "title": "N x time.sleep(0.01)",
        "params": {"N": 200}, "quick": {"N": 40},
        "code": {
            "parmap": _P + "result = Parallel(n_jobs=2)(delayed(sleep)(0.01) for _ in range(N))",
            "joblib": _J + "result = Parallel(n_jobs=2)(delayed(sleep)(0.01) for _ in range(N))",
            "joblib-threading": _J + f"result = Parallel(n_jobs=2, {_THR})"
                                     "(delayed(sleep)(0.01) for _ in range(N))",
            "mp.Pool": _MP + "result = pool.map(sleep, [0.01] * N)",
            "ProcessPool": _PPE + "result = list(ex.map(sleep, [0.01] * N, chunksize=max(1, N // 8)))",
            "ThreadPool": _TPE + "result = list(ex.map(sleep, [0.01] * N))",
            "mpire": _MPIRE + "result = pool.map(sleep, [0.01] * N)",
        },
        "check": "assert list(result) == [None] * N",
    },
    "repeated": {
        "title": "CALLS separate parallel calls of 4 tiny tasks (pool reuse)",
        "params": {"CALLS": 300}, "quick": {"CALLS": 30},
        "code": {
            "parmap": _P + "result = [Parallel(n_jobs=2)(delayed(sqrt)(i) for i in range(4))\n"
                           "          for _ in range(CALLS)]",
            "joblib": _J + "result = [Parallel(n_jobs=2)(delayed(sqrt)(i) for i in range(4))\n"
                           "          for _ in range(CALLS)]",
            "joblib-threading": _J + f"result = [Parallel(n_jobs=2, {_THR})"
                                     "(delayed(sqrt)(i) for i in range(4))\n"
                                     "          for _ in range(CALLS)]",
            "mp.Pool": _MP + "result = [pool.map(sqrt, range(4)) for _ in range(CALLS)]",
            "ProcessPool": _PPE + "result = [list(ex.map(sqrt, range(4))) for _ in range(CALLS)]",
            "ThreadPool": _TPE + "result = [list(ex.map(sqrt, range(4))) for _ in range(CALLS)]",
            "mpire": _MPIRE.replace("n_jobs=2", "n_jobs=2, keep_alive=True")
                     + "result = [pool.map(sqrt, range(4)) for _ in range(CALLS)]",
        },
        "check": "assert [list(r) for r in result] == [[sqrt(i) for i in range(4)]] * CALLS",
    },
    "numpy-args": {
        "title": "16 tasks, each summing 1/16 of ONE array passed to every task",
        "params": {"SIZE": 100_000_000}, "quick": {"SIZE": 10_000_000},
        "setup": "import numpy as np\narr = np.random.default_rng(0).random(SIZE)",
        "code": {
            "parmap": _P + "result = Parallel(n_jobs=2)(delayed(slice_sum)(arr, i) for i in range(16))",
            "joblib": _J + "result = Parallel(n_jobs=2)(delayed(slice_sum)(arr, i) for i in range(16))",
            "mp.Pool": _MP + "result = pool.starmap(slice_sum, [(arr, i) for i in range(16)])",
            "ProcessPool": _PPE + "result = list(ex.map(slice_sum, [arr] * 16, range(16), chunksize=2))",
            "mpire": _MPIRE + "result = pool.map(slice_sum, [(arr, i) for i in range(16)])",
        },
        # mpire ~90 s a run here, mp.Pool and ProcessPool 40-75 s (they pickle the
        # array for every task): only when --libs names them
        "optional": ["mpire", "mp.Pool", "ProcessPool"],
        "check": "expected = [slice_sum(arr, i) for i in range(16)]\n"
                 "assert len(result) == 16 and np.allclose(result, expected, rtol=1e-9, atol=0)",
    },
    "numpy-shared": {
        "title": "numpy-args, parmap's array made by parmap.shared_array (opt-in: no copy)",
        "params": {"SIZE": 100_000_000}, "quick": {"SIZE": 10_000_000},
        "setup": {
            # filled in place: no second 800 MB array in the set-up's memory peak
            "parmap": "import numpy as np\nfrom parmap import shared_array\n"
                      "arr = shared_array(SIZE)\nnp.random.default_rng(0).random(out=arr)",
            "joblib": "import numpy as np\narr = np.random.default_rng(0).random(SIZE)",
        },
        "code": {
            "parmap": _P + "result = Parallel(n_jobs=2)(delayed(slice_sum)(arr, i) for i in range(16))",
            "joblib": _J + "result = Parallel(n_jobs=2)(delayed(slice_sum)(arr, i) for i in range(16))",
        },
        "check": "expected = [slice_sum(arr, i) for i in range(16)]\n"
                 "assert len(result) == 16 and np.allclose(result, expected, rtol=1e-9, atol=0)",
    },
    "numpy-again": {
        "title": "numpy-args once more: a second call over the same, unchanged array",
        "params": {"SIZE": 100_000_000}, "quick": {"SIZE": 10_000_000},
        # the first call (pool start included) is part of the set-up, before the timer
        "setup": {
            lib: "import numpy as np\narr = np.random.default_rng(0).random(SIZE)\n" + imp
            + "Parallel(n_jobs=2)(delayed(slice_sum)(arr, i) for i in range(16))"
            for lib, imp in (("parmap", _P), ("joblib", _J))},
        "code": {
            "parmap": _P + "result = Parallel(n_jobs=2)(delayed(slice_sum)(arr, i) for i in range(16))",
            "joblib": _J + "result = Parallel(n_jobs=2)(delayed(slice_sum)(arr, i) for i in range(16))",
        },
        "check": "expected = [slice_sum(arr, i) for i in range(16)]\n"
                 "assert len(result) == 16 and np.allclose(result, expected, rtol=1e-9, atol=0)",
    },
    "numpy-results": {
        "title": "N tasks, each returning a new 16 MB float64 array",
        "params": {"N": 32, "SIZE": 2_000_000}, "quick": {"N": 8, "SIZE": 2_000_000},
        "setup": "import numpy as np",
        "code": {
            "parmap": _P + "result = Parallel(n_jobs=2)(delayed(full)(i, SIZE) for i in range(N))",
            "joblib": _J + "result = Parallel(n_jobs=2)(delayed(full)(i, SIZE) for i in range(N))",
            "mp.Pool": _MP + "result = pool.starmap(full, [(i, SIZE) for i in range(N)])",
            "ProcessPool": _PPE + "result = list(ex.map(full, range(N), [SIZE] * N, chunksize=max(1, N // 8)))",
            "mpire": _MPIRE + "result = pool.map(full, [(i, SIZE) for i in range(N)],\n"
                              "                      concatenate_numpy_output=False)",
            "sequential": "result = [full(i, SIZE) for i in range(N)]",
        },
        "check": "assert len(result) == N\n"
                 "for i, r in enumerate(result):\n"
                 "    assert r.dtype == np.float64 and r.shape == (SIZE,), (i, r.dtype, r.shape)\n"
                 "    assert r[0] == r[-1] == i and float(r.sum()) == i * SIZE, i",
    },
    "n_jobs=1": {
        "title": "N calls of math.sqrt with n_jobs=1, against a list comprehension",
        "params": {"N": 100_000}, "quick": {"N": 10_000},
        # the per-task cost only: the library is imported before the timer
        "setup": {"parmap": _P, "joblib": _J},
        "code": {
            "parmap": "result = Parallel(n_jobs=1)(delayed(sqrt)(i) for i in range(N))",
            "joblib": "result = Parallel(n_jobs=1)(delayed(sqrt)(i) for i in range(N))",
            "sequential": "result = [sqrt(i) for i in range(N)]",
        },
        "script_only": True,  # no process is started
        "check": "assert list(result) == [sqrt(i) for i in range(N)]",
    },
    "threading": {
        "title": "N calls of math.sqrt on 2 threads",
        "params": {"N": 100_000}, "quick": {"N": 10_000},
        "code": {
            "parmap": _P + f"result = Parallel(n_jobs=2, {_THR})(delayed(sqrt)(i) for i in range(N))",
            "joblib-threading": _J + f"result = Parallel(n_jobs=2, {_THR})"
                                     "(delayed(sqrt)(i) for i in range(N))",
            "ThreadPool": _TPE + "result = list(ex.map(sqrt, range(N)))",
        },
        "script_only": True,  # no process is started
        "check": "assert list(result) == [sqrt(i) for i in range(N)]",
    },
}


def params(workload, quick, loops):
    """The parameters a workload's snippets see."""
    w = WORKLOADS[workload]
    p = dict(w["quick"] if quick else w["params"])
    if workload == "cpu":
        p["LOOPS"] = loops
    return p
