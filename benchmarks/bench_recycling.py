"""What worker recycling costs: 10,000 tasks of ~1 ms, recycling every 100 tasks vs none.

Usage: python benchmarks/bench_recycling.py [--reps 3] [--n 10000] [--every 100]

One interpreter runs both modes, interleaved (rep 1 of each, then rep 2, ...), on
``Parallel(n_jobs=2)`` with the process backend: ``none`` (no recycling) and
``recycling`` (``max_tasks_per_child=every``: 10,000 / 100 = 100 worker replacements).
The task is ``benchmarks.tasks.spin``, pure-Python CPU work calibrated to ~1 ms here.
Before timing, each mode runs once untimed (its pool starts; for recycling, the
forkserver that starts replacement workers once the caller has threads, a one-time cost
per process, is started too). Reported: the median wall time of each mode, and the
overhead of recycling in percent (target: < 10 %). Results also go to
benchmarks/results/recycling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.tasks import spin  # noqa: E402  (importable by the workers)
from parmap import Parallel, delayed  # noqa: E402


def calibrate(seconds: float = 0.001) -> int:
    loops = 10_000
    while True:
        t0 = time.perf_counter()
        spin(loops)
        took = time.perf_counter() - t0
        if took > 0.02:
            return max(1, int(loops * seconds / took))
        loops *= 2


def run(n: int, loops: int, every: int | None) -> float:
    options = {} if every is None else {"max_tasks_per_child": every}
    t0 = time.perf_counter()
    results = Parallel(n_jobs=2, **options)(delayed(spin)(loops) for _ in range(n))
    took = time.perf_counter() - t0
    assert len(results) == n
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    loops = calibrate()
    modes = {"none": None, "recycling": args.every}
    for every in modes.values():  # warm up: pools, forkserver, imports
        run(min(args.n, 20 * args.every), loops, every)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.reps):
        for mode, every in modes.items():
            times[mode].append(run(args.n, loops, every))
    medians = {mode: statistics.median(ts) for mode, ts in times.items()}
    overhead = 100 * (medians["recycling"] / medians["none"] - 1)
    print(f"{args.n} tasks of ~1 ms ({loops} loops of spin), n_jobs=2, median of "
          f"{args.reps}:")
    for mode, ts in times.items():
        print(f"  {mode:10} {medians[mode]:7.3f} s   (runs: "
              f"{', '.join(f'{t:.3f}' for t in ts)})")
    print(f"  recycling every {args.every} tasks ({args.n // args.every} replacements): "
          f"{overhead:+.1f} % (target < 10 %)")
    out = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "recycling.json"), "w") as f:
        json.dump({"n": args.n, "every": args.every, "loops": loops, "times": times,
                   "medians": medians, "overhead_percent": overhead}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
