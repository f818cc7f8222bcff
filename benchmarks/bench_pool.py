"""Figures for the process pool: cold start, warm per-call overhead, crash and Ctrl-C latency.

Run: ``python benchmarks/bench_pool.py [--reps N]``. Each figure is measured in a fresh
interpreter (so the cold start is real) and reported as the median of N runs:

* cold start   first ``Parallel(n_jobs=2)`` call of 2 tiny tasks in a new process
               (starting the pool included); also with the forkserver and spawn methods;
               and, for reference, ``multiprocessing.Pool(2)`` start + ``map`` + close
* warm call    one call of 4 tiny tasks on the warm pool, averaged over 300 calls
* crash        time from a worker's ``os._exit`` to ``WorkerCrashedError`` in the caller
* Ctrl-C       time from SIGINT to the parent process's exit, two workers mid-task
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}

COLD = """
import time, sys
t0 = time.perf_counter()
from parmap import Parallel, delayed
Parallel(n_jobs=2, start_method={method!r})(delayed(abs)(-i) for i in range(2))
print(time.perf_counter() - t0)
"""
COLD_POOL = """
import time
t0 = time.perf_counter()
import multiprocessing as mp
with mp.Pool(2) as pool:
    pool.map(abs, range(2))
print(time.perf_counter() - t0)
"""
WARM = """
import time
from parmap import Parallel, delayed
Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(4))
t0 = time.perf_counter()
for _ in range(300):
    Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(4))
print((time.perf_counter() - t0) / 300)
"""
CRASH = """
import os, time
from parmap import Parallel, delayed, WorkerCrashedError
def die(t):
    if t:
        with open({stamp!r}, "w") as f:
            f.write(repr(time.time()))
        os._exit(3)
    return t
Parallel(n_jobs=2)(delayed(die)(0) for _ in range(2))
try:
    Parallel(n_jobs=2, batch_size=1)(delayed(die)(i == 1) for i in range(4))
except WorkerCrashedError:
    print(time.time() - float(open({stamp!r}).read()))
"""
CTRL_C = """
import time
from parmap import Parallel, delayed
print("ready", flush=True)
Parallel(n_jobs=2, batch_size=1)(delayed(time.sleep)(30) for _ in range(10))
"""


def run_script(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True,
                         text=True, timeout=120)
    return float(out.stdout.strip().splitlines()[-1])


def ctrl_c() -> float:
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    proc.stdout.readline()
    time.sleep(0.5)  # let the workers get into their tasks
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    proc.stdout.close()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=7)
    reps = parser.parse_args().reps
    stamp = f"/tmp/parmap-bench-crash-{os.getpid()}"
    figures = {
        "cold start, auto (fork)": lambda: run_script(COLD.format(method=None)),
        "cold start, forkserver": lambda: run_script(COLD.format(method="forkserver")),
        "cold start, spawn": lambda: run_script(COLD.format(method="spawn")),
        "cold start, multiprocessing.Pool": lambda: run_script(COLD_POOL),
        "warm call of 4 tiny tasks": lambda: run_script(WARM),
        "crash to WorkerCrashedError": lambda: run_script(CRASH.format(stamp=stamp)),
        "Ctrl-C to parent exit": ctrl_c,
    }
    samples: dict[str, list[float]] = {name: [] for name in figures}
    for _ in range(reps):  # interleaved, so machine noise spreads over every figure
        for name, measure in figures.items():
            samples[name].append(measure())
    if os.path.exists(stamp):
        os.unlink(stamp)
    print(f"parmap pool figures, median of {reps} fresh interpreters, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    for name, values in samples.items():
        print(f"  {name:36s} {statistics.median(values) * 1000:9.2f} ms")
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "pool.json"), "w") as f:
        json.dump(samples, f, indent=1)


if __name__ == "__main__":
    main()
