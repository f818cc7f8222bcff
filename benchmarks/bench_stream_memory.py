"""Peak memory of a stream of big results: issue 12's case.

Usage: python benchmarks/bench_stream_memory.py [--n 2000] [--libs parmap,joblib] [--reps 3]

``Parallel(n_jobs=2, return_as="generator", batch_size="auto")`` over an endless
generator of tasks that each return ``bytes(1_000_000)``; the consumer takes ``--n``
results (2,000 by default: 2 GB passes through) and drops each at once. Each library runs
in a fresh interpreter; a thread there samples, every 10 ms, the PSS (proportional set
size: shared pages counted once across the processes) of the whole process tree — the
caller and every descendant, the workers included — with ``psutil``, and keeps the peak.
Reported: the peak of the tree (and of the caller alone), the baseline before the call,
and the wall time, as medians over ``--reps`` interleaved runs (each library once per
round). Target for parmap: a peak under 300 MB.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time

TARGET_MB = 300
INTERVAL = 0.01  # seconds between samples


def megabyte(i: int) -> bytes:
    return bytes(1_000_000)


def tree_pss(root) -> tuple[int, int]:
    """(PSS of ``root`` and all its descendants, PSS of ``root`` alone), in bytes."""
    import psutil

    total = own = 0
    for index, process in enumerate([root, *root.children(recursive=True)]):
        try:
            pss = process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total += pss
        if index == 0:
            own = pss
    return total, own


class Sampler(threading.Thread):
    def __init__(self) -> None:
        import psutil

        super().__init__(daemon=True, name="pss-sampler")
        self.root = psutil.Process()
        self.peak_tree = self.peak_own = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            tree, own = tree_pss(self.root)
            self.peak_tree, self.peak_own = max(self.peak_tree, tree), max(self.peak_own, own)
            self.stop.wait(INTERVAL)


def child(lib: str, n: int) -> dict:
    """One measurement, in this (fresh) interpreter."""
    if lib == "parmap":
        from parmap import Parallel, delayed
    else:
        from joblib import Parallel, delayed
    baseline, _ = tree_pss(Sampler().root)
    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    results = Parallel(n_jobs=2, return_as="generator", batch_size="auto")(
        delayed(megabyte)(i) for i in itertools.count())
    for _, result in zip(range(n), results):
        assert len(result) == 1_000_000
        del result
    results.close()
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    return {"lib": lib, "n": n, "baseline_mb": baseline / 1e6,
            "peak_tree_mb": sampler.peak_tree / 1e6, "peak_caller_mb": sampler.peak_own / 1e6,
            "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--libs", default="parmap,joblib")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n)))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    libs = args.libs.split(",")
    runs: dict[str, list[dict]] = {lib: [] for lib in libs}
    failed = False
    for _ in range(args.reps):
        for lib in libs:
            out = subprocess.run([sys.executable, __file__, "--child", lib, "--n", str(args.n)],
                                 capture_output=True, text=True, env=env, timeout=600)
            if out.returncode != 0:
                print(f"{lib}: failed\n{out.stderr[-2000:]}")
                failed = True
                continue
            runs[lib].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for lib, results in runs.items():
        if not results:
            continue
        r = {key: statistics.median(x[key] for x in results)
             for key in ("peak_tree_mb", "peak_caller_mb", "baseline_mb", "wall_s")}
        verdict = ""
        if lib == "parmap":
            verdict = "  (target < %d MB: %s)" % (
                TARGET_MB, "met" if r["peak_tree_mb"] < TARGET_MB else "MISSED")
            failed |= r["peak_tree_mb"] >= TARGET_MB
        peaks = ", ".join(f"{x['peak_tree_mb']:.0f}" for x in results)
        print(f"{lib:7s} {args.n} x 1 MB results: peak PSS of the process tree "
              f"{r['peak_tree_mb']:.0f} MB (median of {peaks}; caller alone "
              f"{r['peak_caller_mb']:.0f} MB, baseline {r['baseline_mb']:.0f} MB), "
              f"{r['wall_s']:.1f} s{verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
