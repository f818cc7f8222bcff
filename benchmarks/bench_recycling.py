"""What worker recycling costs: 10,000 tasks of ~1 ms, recycling every 100 tasks vs none.

Usage: python benchmarks/bench_recycling.py [--reps 7] [--n 10000] [--every 100]
                                           [--against-forkserver]

One interpreter runs both modes, interleaved (rep 1 of each, then rep 2, ...), on
``Parallel(n_jobs=2)`` with the process backend: ``none`` (no recycling) and
``recycling`` (``max_tasks_per_child=every``: 10,000 / 100 = 100 worker replacements).
The task is ``benchmarks.tasks.spin``, pure-Python CPU work calibrated to ~1 ms here.
Before timing, each mode runs once untimed (its pool starts; for recycling, the
forkserver that starts replacement workers once the caller has threads, a one-time cost
per process, is started too). The runs come in pairs, one of each mode, in alternating
order. Reported: the overhead of recycling in percent (target: < 10 %) as the median of
the pairs' ratios (the speed of a shared machine drifts by tens of percent within a
minute; within a pair, less); and as other views, the ratio of the modes' median and
best (minimum) times, and, on Linux, of the CPU time the whole machine spent per run
(from /proc/stat: the caller, the workers, the forkserver and the exits). Results also
go to benchmarks/results/recycling.json.

``--against-forkserver`` compares instead, in pairs again, recycling pools whose
replacements come from the pool's zygote (the default on Linux) and ones whose
replacements come from multiprocessing's forkserver, as before the zygote (the pool's
launcher is told that no zygote is usable); each run then starts a new pool, warmed up
by a short call first. Results go to benchmarks/results/recycling_zygote.json.
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
import parmap  # noqa: E402
import parmap.process.launcher as launcher  # noqa: E402  (--against-forkserver)
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


def machine_cpu() -> float:
    """Seconds of CPU time the whole machine has spent (Linux; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:8]]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def run(n: int, loops: int, every: int | None) -> tuple[float, float]:
    """(wall seconds, machine CPU seconds) of one call."""
    options = {} if every is None else {"max_tasks_per_child": every}
    c0, t0 = machine_cpu(), time.perf_counter()
    results = Parallel(n_jobs=2, **options)(delayed(spin)(loops) for _ in range(n))
    took, cpu = time.perf_counter() - t0, machine_cpu() - c0
    assert len(results) == n
    return took, cpu


def against_forkserver(args: argparse.Namespace, loops: int) -> int:
    """Pairs of recycling runs: replacements from the zygote, and from the forkserver."""
    usable = launcher.usable
    times: dict[str, list[float]] = {"zygote": [], "forkserver": []}
    cpus: dict[str, list[float]] = {"zygote": [], "forkserver": []}
    for rep in range(args.reps):
        for mode in (list(times) if rep % 2 == 0 else list(times)[::-1]):
            launcher.usable = usable if mode == "zygote" else (lambda method: False)
            parmap._shutdown_pools()  # a new pool, whose launcher sees the mode
            run(20 * args.every, loops, args.every)
            took, cpu = run(args.n, loops, args.every)
            times[mode].append(took)
            cpus[mode].append(cpu)
    launcher.usable = usable
    ratios = {"time": statistics.median(z / f for z, f in zip(*times.values())),
              "machine_cpu": statistics.median(z / f for z, f in zip(*cpus.values()))
              if all(cpus["forkserver"]) else None}
    print(f"{args.n} tasks of ~1 ms, n_jobs=2, recycling every {args.every} tasks, "
          f"replacements from the pool's zygote or from the forkserver, {args.reps} pairs:")
    for mode, ts in times.items():
        print(f"  {mode:10} {statistics.median(ts):7.3f} s   machine CPU "
              f"{statistics.median(cpus[mode]):.2f} s   (runs: "
              f"{', '.join(f'{t:.3f}' for t in ts)})")
    cpu_text = "unknown" if ratios["machine_cpu"] is None else \
        f"{100 * (ratios['machine_cpu'] - 1):+.1f} %"
    print(f"  zygote against forkserver (medians of the pairs' ratios): time "
          f"{100 * (ratios['time'] - 1):+.1f} %, machine CPU {cpu_text}")
    _save("recycling_zygote.json", {"n": args.n, "every": args.every, "loops": loops,
                                    "times": times, "machine_cpu": cpus, "ratios": ratios})
    return 0


def _save(name: str, data: dict) -> None:
    out = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        json.dump(data, f, indent=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--against-forkserver", action="store_true",
                        help="compare replacements from the zygote and the forkserver")
    args = parser.parse_args()
    loops = calibrate()
    if args.against_forkserver:
        return against_forkserver(args, loops)
    modes = {"none": None, "recycling": args.every}
    for every in modes.values():  # warm up: pools, forkserver, imports
        run(min(args.n, 20 * args.every), loops, every)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    cpus: dict[str, list[float]] = {mode: [] for mode in modes}
    for rep in range(args.reps):  # pairs, in alternating order: drift cancels out
        for mode in (list(modes) if rep % 2 == 0 else list(modes)[::-1]):
            took, cpu = run(args.n, loops, modes[mode])
            times[mode].append(took)
            cpus[mode].append(cpu)
    paired = statistics.median(
        100 * (r / n - 1) for r, n in zip(times["recycling"], times["none"]))
    medians = {mode: statistics.median(ts) for mode, ts in times.items()}
    cpu_medians = {mode: statistics.median(cs) for mode, cs in cpus.items()}
    overhead = 100 * (medians["recycling"] / medians["none"] - 1)
    best = 100 * (min(times["recycling"]) / min(times["none"]) - 1)
    cpu_overhead = 100 * (cpu_medians["recycling"] / cpu_medians["none"] - 1) \
        if cpu_medians["none"] else None  # no /proc/stat
    print(f"{args.n} tasks of ~1 ms ({loops} loops of spin), n_jobs=2, median of "
          f"{args.reps}:")
    for mode, ts in times.items():
        print(f"  {mode:10} {medians[mode]:7.3f} s   best {min(ts):.3f} s   machine CPU "
              f"{cpu_medians[mode]:.2f} s   (runs: {', '.join(f'{t:.3f}' for t in ts)})")
    print(f"  recycling every {args.every} tasks ({args.n // args.every} replacements): "
          f"{paired:+.1f} % (median of the {args.reps} pairs' ratios; target < 10 %)")
    cpu_text = "unknown" if cpu_overhead is None else f"{cpu_overhead:+.1f} %"
    print(f"  other views: medians {overhead:+.1f} %, best runs {best:+.1f} %, machine CPU "
          f"{cpu_text}")
    _save("recycling.json", {
        "n": args.n, "every": args.every, "loops": loops, "times": times,
        "machine_cpu": cpus, "medians": medians, "paired_overhead_percent": paired,
        "overhead_percent": overhead, "best_overhead_percent": best,
        "cpu_overhead_percent": cpu_overhead})
    return 0


if __name__ == "__main__":
    sys.exit(main())
