"""Time against the number of tiny tasks, 10 to 1,000,000, for parmap and its peers.

Usage: python -m benchmarks.bench_curve [--reps 3] [--max 1000000] [--png PATH] [--json PATH]

Each point is the *tiny* workload of the suite (``N`` calls of ``math.sqrt``, each
library's code as in ``benchmarks/workloads.py``) run in a fresh interpreter, timed from
the library's import to the results in hand, n_jobs=2; the median of ``--reps``
interleaved repetitions. "parmap +thread" is parmap in a process that already has one
idle background thread (its workers then come from the forkserver). The left end of each
curve is the library's fixed cost (imports, starting workers); its slope at the right,
the cost per task. joblib and mpire stop at 100,000 tasks (about 10 to 30 s a run at
1,000,000 here).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

from benchmarks.suite import CHILD, ROOT
from benchmarks.workloads import WORKLOADS

LINES = ["parmap", "parmap +thread", "joblib", "mp.Pool", "ProcessPool", "mpire"]
SLOW = {"joblib": 100_000, "mpire": 100_000}  # the largest N they run
SIZES = [10, 100, 1_000, 10_000, 100_000, 1_000_000]


def run_point(line, n, timeout=300.0):
    lib, thread = line.replace(" +thread", ""), line.endswith("+thread")
    w = WORKLOADS["tiny"]
    spec = {"workload": "tiny", "lib": lib, "params": {"N": n}, "code": w["code"][lib],
            "setup": "", "check": w["check"], "thread": thread}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{line} at N={n} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["time_s"]


def table(medians, sizes):
    head = f"{'N':>10}" + "".join(f"{line:>16}" for line in LINES) + f"{'parmap/best':>13}"
    rows = [head]
    for n in sizes:
        cells, peers = "", []
        for line in LINES:
            t = medians.get(line, {}).get(n)
            cells += f"{t:>16.3f}" if t is not None else f"{'-':>16}"
            if t is not None and not line.startswith("parmap"):
                peers.append(t)
        p = medians.get("parmap", {}).get(n)
        ratio = f"{p / min(peers):.2f}x" if p and peers else "-"
        rows.append(f"{n:>10,}{cells}{ratio:>13}")
    return "\n".join(rows)


def chart(medians, sizes, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for line in LINES:
        pts = sorted(medians.get(line, {}).items())
        if not pts:
            continue
        style = {"color": "#d62728", "lw": 2} if line == "parmap" else \
            {"color": "#d62728", "ls": "--"} if line == "parmap +thread" else {}
        ax.plot([n for n, _ in pts], [t for _, t in pts], marker="o", ms=3, label=line,
                **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tasks (calls of math.sqrt)")
    ax.set_ylabel("median wall time, s (fresh interpreter)")
    ax.set_title("Fixed cost, then cost per task (n_jobs=2)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_curve",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max", type=int, default=SIZES[-1], help="largest N (default 1M)")
    ap.add_argument("--png", default=os.path.join(ROOT, "docs", "_static", "curve.png"))
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "curve.json"))
    args = ap.parse_args(argv)
    sizes = [n for n in SIZES if n <= args.max]
    times = {line: {n: [] for n in sizes if n <= SLOW.get(line, n)} for line in LINES}
    for rep in range(args.reps):
        for n in sizes:
            order = LINES[rep % len(LINES):] + LINES[:rep % len(LINES)]
            for line in order:
                if n in times[line]:
                    times[line][n].append(run_point(line, n))
            print(f"  rep {rep + 1}/{args.reps}  N={n:,}: " + ", ".join(
                f"{line} {times[line][n][-1]:.3f}" for line in LINES if n in times[line]),
                flush=True)
    medians = {line: {n: statistics.median(ts) for n, ts in per.items()}
               for line, per in times.items()}
    print()
    print(table(medians, sizes))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"reps": args.reps, "sizes": sizes, "times_s": {
            line: {str(n): ts for n, ts in per.items()} for line, per in times.items()}}, fh,
            indent=1)
    if args.png:
        chart(medians, sizes, args.png)
    print(f"\nwrote {os.path.relpath(args.json)}" + (f" and {os.path.relpath(args.png)}"
                                                     if args.png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
