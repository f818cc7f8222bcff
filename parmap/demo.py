"""A tour of parmap in a few seconds: ``python -m parmap.demo``."""
from __future__ import annotations

import math
import time

from . import Parallel, cpu_count, delayed


def slow_square(x: int) -> int:
    """About 20 ms of pure-Python work."""
    deadline = time.perf_counter() + 0.02
    while time.perf_counter() < deadline:
        math.sqrt(x)
    return x * x


def check_positive(x: int) -> int:
    if x < 0:
        raise ValueError(f"expected a positive number, got {x}")
    return x


def main() -> None:
    n_jobs = min(cpu_count(), 4)
    print(f"parmap demo on {cpu_count()} CPU(s)")

    t0 = time.perf_counter()
    sequential = [slow_square(i) for i in range(40)]
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    parallel = Parallel(n_jobs=n_jobs)(delayed(slow_square)(i) for i in range(40))
    t_par = time.perf_counter() - t0
    assert parallel == sequential
    print(f"1. 40 x 20 ms tasks: plain loop {t_seq:.2f} s, Parallel(n_jobs={n_jobs}) "
          f"{t_par:.2f} s ({t_seq / t_par:.1f}x)")

    t0 = time.perf_counter()
    tiny = Parallel(n_jobs=n_jobs)(delayed(abs)(-i) for i in range(100_000))
    print(f"2. 100,000 tiny calls in {time.perf_counter() - t0:.2f} s "
          f"(auto batching), last result {tiny[-1]}")

    results = Parallel(n_jobs=n_jobs, return_as="generator")(
        delayed(slow_square)(i) for i in range(6))
    print("3. results as they are ready:", " ".join(str(r) for r in results))

    try:
        Parallel(n_jobs=n_jobs)(delayed(check_positive)(x) for x in [3, 1, -4, 1])
    except ValueError as exc:
        notes = "; ".join(getattr(exc, "__notes__", []))
        print(f"4. a failing task raises its own exception: ValueError({exc}) [{notes}]")
    print("done")


if __name__ == "__main__":
    main()
