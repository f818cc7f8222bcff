"""What a progress bar (and insights) cost on 100,000 tiny tasks.

Usage: python benchmarks/bench_progress.py [--reps 5] [--n 100000]

Each measurement runs in a fresh interpreter, the modes interleaved (rep 1 of every mode,
then rep 2, ...), for the process backend (the default) and threads, n_jobs=2, tasks
``abs(-i)``. A child times two calls:

* cold: from ``import parmap`` to the results of the first call (the pool starts; the
  bar's first use imports tqdm);
* warm: a second, identical call in the same interpreter (pool and imports ready).

Modes: ``off``; ``imported`` (no bar, but tqdm imported before the timer: a program with
more live objects pays more for each garbage collection, and 100,000 task tuples trigger
several); ``tqdm`` (``progress=True`` with tqdm installed); ``plain``
(``progress=True`` without tqdm: the stderr bar); ``insights`` (``insights=True``, for
information: it measures every task, by design not free). The bar's output goes to
/dev/null. Reported: medians, and each mode's ratio to ``off`` (target for the bars: 1.0
within noise; for ``tqdm``, against ``imported`` too). Results also go to
benchmarks/results/progress.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ["off", "imported", "tqdm", "plain", "insights"]
BACKENDS = ["processes", "threading"]


def child(mode: str, backend: str, n: int) -> None:
    if mode == "plain":
        sys.modules["tqdm"] = None  # type: ignore[assignment]  # as if not installed
    if mode == "imported":
        import tqdm  # noqa: F401  (before the timer: what importing tqdm alone costs later)
    t0 = time.perf_counter()
    from parmap import Parallel, delayed

    options = {"off": {}, "imported": {}, "tqdm": {"progress": True}, "plain": {"progress": True},
               "insights": {"insights": True}}[mode]

    def run() -> list:
        return Parallel(n_jobs=2, backend=backend, **options)(  # type: ignore[arg-type]
            delayed(abs)(-i) for i in range(n))

    out = run()
    cold = time.perf_counter() - t0
    t1 = time.perf_counter()
    again = run()
    warm = time.perf_counter() - t1
    assert out == again == list(range(n)), "wrong results"
    print(json.dumps({"cold_s": cold, "warm_s": warm}), flush=True)


def measure(mode: str, backend: str, n: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, backend, str(n)],
                          cwd=ROOT, capture_output=False, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    if proc.returncode != 0:
        raise SystemExit(f"{mode}/{backend} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--child", nargs=3)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    times: dict = {(b, m): {"cold_s": [], "warm_s": []} for b in BACKENDS for m in MODES}
    for rep in range(args.reps):
        for backend in BACKENDS:
            for mode in MODES:
                result = measure(mode, backend, args.n)
                for key, value in result.items():
                    times[backend, mode][key].append(value)
        print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
    report = {}
    print(f"{args.n:,} tasks abs(-i), n_jobs=2, median of {args.reps} fresh interpreters")
    print(f"{'backend':10} {'mode':9} {'cold s':>8} {'ratio':>6} {'warm s':>8} {'ratio':>6}")
    for backend in BACKENDS:
        base = {key: statistics.median(v) for key, v in times[backend, "off"].items()}
        for mode in MODES:
            med = {key: statistics.median(v) for key, v in times[backend, mode].items()}
            ratio = {key: med[key] / base[key] for key in med}
            report[f"{backend}/{mode}"] = {"median": med, "ratio_to_off": ratio,
                                           "all": times[backend, mode]}
            print(f"{backend:10} {mode:9} {med['cold_s']:8.3f} {ratio['cold_s']:6.2f} "
                  f"{med['warm_s']:8.3f} {ratio['warm_s']:6.2f}")
    for backend in BACKENDS:
        tqdm_ = {k: statistics.median(v) for k, v in times[backend, "tqdm"].items()}
        imported = {k: statistics.median(v) for k, v in times[backend, "imported"].items()}
        print(f"{backend}: the tqdm bar against tqdm imported without a bar: cold "
              f"{tqdm_['cold_s'] / imported['cold_s']:.2f}, warm "
              f"{tqdm_['warm_s'] / imported['warm_s']:.2f}")
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "progress.json"), "w") as f:
        json.dump({"n": args.n, "reps": args.reps, "results": report}, f, indent=1)


if __name__ == "__main__":
    main()
