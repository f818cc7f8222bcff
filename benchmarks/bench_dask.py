"""parmap's dask backend against joblib's, on the same Dask cluster in the same run.

Usage: python benchmarks/bench_dask.py [--quick] [--reps N]

One ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` serves both
libraries; each runs ``Parallel(n_jobs=-1)`` inside its own
``parallel_config(backend="dask")``. Workloads:

1. tiny:  1,000 x ``abs(-i)``: pure overhead; batching decides it.
2. 20ms:  64 x ``time.sleep(0.02)``: short tasks; the ideal is 64 x 20 ms / 2 = 0.64 s.
   (sleep, not a CPU loop: on a 2-core machine a spinning task would fight the client and
   the scheduler for the CPUs and measure that instead.)
3. 200MB: 16 x ``slice_sum(array, i)`` with the same 200 MB float64 array in every task:
   both libraries scatter it to the cluster once per call.

After one untimed warm-up call per contender and workload (which also checks the results),
repetitions are interleaved (parmap then joblib, then joblib then parmap, ...) and the
medians compared. Results also go to benchmarks/results/dask.json.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # before the cluster starts: its workers copy sys.path

import numpy as np  # noqa: E402

import parmap  # noqa: E402
from benchmarks.tasks import slice_sum  # noqa: E402

try:
    import joblib
except ImportError:
    joblib = None


def run_parmap(tasks: list) -> list:
    with parmap.parallel_config(backend="dask"):
        return parmap.Parallel(n_jobs=-1)(parmap.delayed(f)(*args) for f, args in tasks)


def run_joblib(tasks: list) -> list:
    with joblib.parallel_config(backend="dask"):
        return joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(*args) for f, args in tasks)


def workloads(array: np.ndarray) -> list[tuple[str, list, list]]:
    """(name, tasks as (function, args), expected results)."""
    return [
        ("tiny: 1,000 x abs(-i)", [(abs, (-i,)) for i in range(1000)], list(range(1000))),
        ("20ms: 64 x sleep(0.02)", [(time.sleep, (0.02,)) for _ in range(64)], [None] * 64),
        ("200MB: 16 x slice_sum(a, i)", [(slice_sum, (array, i)) for i in range(16)],
         [slice_sum(array, i) for i in range(16)]),
    ]


def measure(contenders: dict, tasks: list, expected: list, reps: int) -> dict:
    for name, run in contenders.items():  # warm-up, and the results must be right
        got = run(tasks)
        # sums of a received array may differ in the last bit: SIMD paths follow alignment
        assert len(got) == len(expected) and all(
            g == e or np.isclose(g, e, rtol=1e-12) for g, e in zip(got, expected)), \
            f"{name} returned wrong results"
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for rep in range(reps):
        for name in (order if rep % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            contenders[name](tasks)
            times[name].append(time.perf_counter() - t0)
    return {name: {"times_s": t, "median_s": statistics.median(t)} for name, t in times.items()}


def main() -> None:
    from distributed import Client, LocalCluster

    quick = "--quick" in sys.argv[1:]
    reps = 3 if quick else 7
    if "--reps" in sys.argv[1:]:
        reps = int(sys.argv[sys.argv.index("--reps") + 1])
    import dask
    import distributed

    print(f"dask backend benchmark: reps={reps} (interleaved), python "
          f"{platform.python_version()}, cpu_count={os.cpu_count()}, dask "
          f"{dask.__version__}, distributed {distributed.__version__}, joblib "
          f"{getattr(joblib, '__version__', None)}")
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None, host="127.0.0.1",
                           # the scheduler serves /health even without a dashboard: any port
                           scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
    client = Client(cluster)
    results: dict = {}
    try:
        contenders = {"parmap": run_parmap}
        if joblib is not None:
            contenders["joblib"] = run_joblib
        else:
            print("joblib is not installed: parmap alone")
        array = np.random.default_rng(0).random(25_000_000)  # 200 MB
        print(f"\n  {'workload':<30}{'parmap s':>10}{'joblib s':>10}{'parmap/joblib':>15}")
        for name, tasks, expected in workloads(array):
            res = measure(contenders, tasks, expected, reps)
            results[name] = res
            p = res["parmap"]["median_s"]
            j = res["joblib"]["median_s"] if "joblib" in res else float("nan")
            print(f"  {name:<30}{p:>10.3f}{j:>10.3f}{p / j:>14.2f}x", flush=True)
    finally:
        client.close()
        cluster.close()
    out = {"machine": {"platform": platform.platform(), "python": sys.version,
                       "cpu_count": os.cpu_count()},
           "config": {"reps": reps, "interleaved": True, "n_workers": 2,
                      "threads_per_worker": 1, "dask": dask.__version__,
                      "joblib": getattr(joblib, "__version__", None)},
           "workloads": results}
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "dask.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"\nwrote {os.path.relpath(path, os.getcwd())}")


if __name__ == "__main__":
    main()
