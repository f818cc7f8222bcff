"""scikit-learn on parmap's joblib backend against joblib's loky and multiprocessing.

Run: ``python benchmarks/bench_sklearn.py [--reps N] [--n-jobs K]``.

The workload: ``GridSearchCV(SVC(), 12-point grid, cv=5)`` on the digits data set (60
fits of 1797 x 64 floats, a few tens of milliseconds each), under
``joblib.parallel_config(backend=B, n_jobs=K)``. Each run is a fresh interpreter that
imports scikit-learn (not timed), then times

* cold   the first fit: for parmap this includes ``import parmap.joblib`` and
         ``register_parmap()``; for every backend, starting its workers
* warm   a second fit in the same process (parmap and loky reuse their workers; joblib's
         multiprocessing backend starts a new pool for every call)
* tiny   then ``Parallel()(delayed(math.sqrt)(i) for i in range(200_000))``: the cost
         per task of the backend (and of joblib's own machinery)

Runs are interleaved (each repetition runs every backend, in a rotated order) so that
the machine's background load hits all of them alike; the table shows medians and the
ratio to loky (below 1: faster than loky), the best (least disturbed) run, and the CPU
seconds the whole process tree used (psutil; less sensitive than wall time to other
programs running meanwhile). ``--profile B`` prints where the caller's main thread
spends a warm fit with backend B instead.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("parmap", "loky", "multiprocessing")
GRID = {"C": [1, 10, 100, 1000], "gamma": [1e-2, 1e-3, 1e-4]}  # 12 points
TINY = 200_000


def child(backend: str, n_jobs: int, profile: bool = False) -> dict:
    """One run in this (fresh) interpreter: time a cold and a warm fit."""
    import time

    import joblib
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = load_digits(return_X_y=True)

    def fit() -> tuple[float, float, list]:
        cpu0, t0 = tree_cpu(), time.perf_counter()
        if backend == "parmap":
            import parmap.joblib

            parmap.joblib.register_parmap()
        with joblib.parallel_config(backend=backend, n_jobs=n_jobs):
            search = GridSearchCV(SVC(), GRID, cv=5).fit(X, y)
        wall = time.perf_counter() - t0
        return wall, tree_cpu() - cpu0, list(search.cv_results_["mean_test_score"])

    cold, cold_cpu, scores = fit()
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        warm, warm_cpu, again = fit()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    else:
        warm, warm_cpu, again = fit()
    assert again == scores, "the two fits disagree"
    import math

    t0 = time.perf_counter()  # per-task overhead: many tiny tasks, on the warm workers
    with joblib.parallel_config(backend=backend, n_jobs=n_jobs):
        roots = joblib.Parallel()(joblib.delayed(math.sqrt)(i) for i in range(TINY))
    tiny = time.perf_counter() - t0
    assert roots[-1] == math.sqrt(TINY - 1)
    if backend == "loky":  # leave nothing behind
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)
    return {"cold": cold, "warm": warm, "cold_cpu": cold_cpu, "warm_cpu": warm_cpu,
            "tiny": tiny, "scores": scores}


def tree_cpu() -> float:
    """CPU seconds used so far by this process, its live descendants (psutil) and the
    children it has reaped. Less sensitive than wall time to other programs' load."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for proc in me.children(recursive=True):
        try:
            total += sum(proc.cpu_times()[:2])
        except psutil.Error:  # exited meanwhile
            pass
    reaped = os.times()
    return total + reaped.children_user + reaped.children_system


def run_child(backend: str, n_jobs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", backend,
                          "--n-jobs", str(n_jobs)], env=env, capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the {backend} run failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--profile", metavar="BACKEND")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.n_jobs)))
        return 0
    if args.profile:
        child(args.profile, args.n_jobs, profile=True)
        return 0
    backends = args.backends.split(",")
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for rep in range(args.reps):
        order = backends[rep % len(backends):] + backends[:rep % len(backends)]
        for backend in order:
            runs[backend].append(run_child(backend, args.n_jobs))
            last = runs[backend][-1]
            print(f"rep {rep + 1}/{args.reps} {backend:16s} cold {last['cold']:.3f} s "
                  f"({last['cold_cpu']:.2f} CPU)  warm {last['warm']:.3f} s "
                  f"({last['warm_cpu']:.2f} CPU)", file=sys.stderr)
    first = runs[backends[0]][0]["scores"]
    assert all(r["scores"] == first for rs in runs.values() for r in rs), \
        "backends disagree on the scores"
    keys = ("cold", "warm", "cold_cpu", "warm_cpu", "tiny")
    median = {b: {k: statistics.median(r[k] for r in rs) for k in keys}
              for b, rs in runs.items()}
    best = {b: {k: min(r[k] for r in rs) for k in keys} for b, rs in runs.items()}
    print(f"GridSearchCV(SVC(), 12-point grid, cv=5) on digits, n_jobs={args.n_jobs}: "
          f"{args.reps} interleaved runs, each a fresh interpreter; seconds, and the ratio "
          f"to loky (below 1: faster)")
    columns = ("cold median", "cold best", "warm median", "warm best", "cold CPU",
               "warm CPU", "tiny tasks")
    header = "".join(f" {h:>15s}" for h in columns)
    print(f"{'backend':16s}{header}")
    for backend in backends:
        cells = []
        for stat, key in ((median, "cold"), (best, "cold"), (median, "warm"), (best, "warm"),
                          (median, "cold_cpu"), (median, "warm_cpu"), (median, "tiny")):
            value = stat[backend][key]
            ratio = value / stat["loky"][key] if "loky" in stat else float("nan")
            cells.append(f" {value:7.2f} ({ratio:4.2f})")
        print(f"{backend:16s}{''.join(cells)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
