"""Core overhead benchmarks for parmap, run side by side in one process.

Usage: python benchmarks/bench_core.py [--quick]

1. Threading backend, N=100,000 tiny calls ``abs(-i)`` with n_jobs=2:
   parmap ``Parallel(backend="threading")`` vs ``ThreadPoolExecutor(2).map``
   (pool created inside the timed region) vs joblib's threading backend
   (skipped if joblib is missing).  Target: parmap / ThreadPoolExecutor <= 1.0.
   joblib takes ~6-14 s per run; with --quick it runs at N=10,000 and its time
   is scaled x10 (marked "scaled" in the output).
2. Sequential backend per-task overhead, N=200,000 calls of a tiny pure-Python
   ``f``: ``Parallel(n_jobs=1)`` vs ``[f(x) for x in xs]``, plus
   ``[delayed(f)(x) for x in xs]`` alone (the cost of building task tuples; keeping
   200k tuples+dicts alive also triggers cyclic-GC passes) and the same tuples built
   and dropped at once, as Parallel consumes them (the task-building share of its time),
   and the same ``delayed`` tasks run by a bare ``for`` loop (the floor for any
   ``Parallel(...)(delayed(f)(x) for x in xs)`` API, joblib's included).
   Target: parmap / list comprehension <= 3.0.

Repetitions (5, or 3 with --quick) are interleaved across contenders (rep 1 of
each, then rep 2 of each, ...) after one small untimed warm-up that also checks
results; medians are reported.  Results also go to benchmarks/results/core.json.
"""
import json
import os
import platform
import statistics
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from parmap import Parallel, delayed  # noqa: E402

try:
    import joblib
except ImportError:
    joblib = None


def f(x):
    return x * 2 + 1


# Each contender: (name, fn(n) -> result list, n used when timed, scale factor).
def threading_contenders(n, quick):
    cs = [
        ("parmap threading", lambda n: Parallel(n_jobs=2, backend="threading")(
            delayed(abs)(-i) for i in range(n)), n, 1),
        ("ThreadPoolExecutor.map", lambda n: list(
            ThreadPoolExecutor(2).map(abs, (-i for i in range(n)))), n, 1),
    ]
    if joblib is not None:
        jn = n // 10 if quick else n
        cs.append(("joblib threading", lambda n: joblib.Parallel(n_jobs=2, backend="threading")(
            joblib.delayed(abs)(-i) for i in range(n)), jn, n / jn))
    return cs, [abs(-i) for i in range(n)]


def sequential_contenders(n):
    xs = list(range(n))
    head = lambda n: xs if n == len(xs) else xs[:n]  # no copy in the timed runs
    cs = [
        ("parmap n_jobs=1", lambda n: Parallel(n_jobs=1)(delayed(f)(x) for x in head(n)), n, 1),
        ("list comprehension", lambda n: [f(x) for x in head(n)], n, 1),
        # The floor for any joblib-style API: the same delayed() tasks, run by a bare loop.
        ("same tasks, bare loop", lambda n: [fn(*a, **k) for fn, a, k in
                                             (delayed(f)(x) for x in head(n))], n, 1),
        ("[delayed(f)(x)] only", lambda n: [delayed(f)(x) for x in head(n)], n, 1),
        # Same tasks built but dropped at once, as Parallel consumes them (no GC pressure).
        ("delayed(f)(x) discarded", lambda n: deque(
            (delayed(f)(x) for x in head(n)), maxlen=0), n, 1),
    ]
    return cs, [f(x) for x in xs]


def run_group(contenders, expected, reps):
    for name, fn, n, _ in contenders:  # warm-up + correctness check
        if "delayed(f)" in name:
            continue  # builds tasks only, no results to check
        got = fn(1000)
        assert list(got) == expected[:1000], f"{name} returned wrong results"
    times = {name: [] for name, *_ in contenders}
    for _ in range(reps):
        for name, fn, n, scale in contenders:
            t0 = time.perf_counter()
            fn(n)
            times[name].append((time.perf_counter() - t0) * scale)
    out = {}
    for name, fn, n, scale in contenders:
        out[name] = {"n": n, "scaled_x": scale, "times_s": times[name],
                     "median_s": statistics.median(times[name])}
    return out


def print_table(title, res, baseline):
    base = res[baseline]["median_s"]
    print(f"\n{title}")
    print(f"  {'contender':<25}{'median s':>10}{'min s':>10}{'us/task':>10}{'vs ' + baseline:>28}")
    for name, r in res.items():
        n_full = r["n"] * r["scaled_x"]
        note = f"  (scaled from N={r['n']})" if r["scaled_x"] != 1 else ""
        print(f"  {name:<25}{r['median_s']:>10.4f}{min(r['times_s']):>10.4f}"
              f"{r['median_s'] / n_full * 1e6:>10.2f}{r['median_s'] / base:>27.2f}x{note}")


def main():
    quick = "--quick" in sys.argv[1:]
    reps = 3 if quick else 5
    n_thr, n_seq = 100_000, 200_000
    print(f"parmap core benchmarks: reps={reps} (interleaved), quick={quick}, "
          f"python {platform.python_version()}, cpu_count={os.cpu_count()}")
    if joblib is None:
        print("joblib not importable: skipping joblib contender")

    cs, exp = threading_contenders(n_thr, quick)
    thr = run_group(cs, exp, reps)
    print_table(f"1. threading backend, N={n_thr:,} x abs(-i), n_jobs=2", thr,
                "ThreadPoolExecutor.map")
    cs, exp = sequential_contenders(n_seq)
    seq = run_group(cs, exp, reps)
    print_table(f"2. sequential backend, N={n_seq:,} x f(x)=x*2+1", seq, "list comprehension")

    r_thr = thr["parmap threading"]["median_s"] / thr["ThreadPoolExecutor.map"]["median_s"]
    r_seq = seq["parmap n_jobs=1"]["median_s"] / seq["list comprehension"]["median_s"]
    print("\nTargets:")
    print(f"  parmap threading / ThreadPoolExecutor = {r_thr:.2f}x (target <= 1.0): "
          f"{'OK' if r_thr <= 1.0 else 'MISSED'}")
    print(f"  parmap n_jobs=1 / list comprehension  = {r_seq:.2f}x (target <= 3.0): "
          f"{'OK' if r_seq <= 3.0 else 'MISSED'}")
    r_floor = seq["parmap n_jobs=1"]["median_s"] / seq["same tasks, bare loop"]["median_s"]
    print(f"  parmap n_jobs=1 / same tasks in a bare loop = {r_floor:.2f}x")

    result = {
        "machine": {"platform": platform.platform(), "python": sys.version,
                    "implementation": platform.python_implementation(),
                    "cpu_count": os.cpu_count()},
        "config": {"reps": reps, "quick": quick, "interleaved": True,
                   "joblib": getattr(joblib, "__version__", None)},
        "threading": thr, "sequential": seq,
        "ratios": {"threading_parmap_vs_threadpool": r_thr, "threading_target": 1.0,
                   "sequential_parmap_vs_listcomp": r_seq, "sequential_target": 3.0,
                   "sequential_parmap_vs_bare_loop": r_floor},
    }
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "core.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"\nwrote {os.path.relpath(path, os.getcwd())}")


if __name__ == "__main__":
    main()
