"""Make the real bar, report and timeline shown by docs/insights.rst, from one real run.

Usage (from the repository root): python docs/make_insights_figure.py

Writes docs/_static/insights_bar.txt (the final state of the tqdm bar),
docs/_static/insights_report.txt (``print(parallel.insights)``) and
docs/_static/insights_timeline.png (``parallel.insights.plot(...)``).

The run is a deliberately imperfect one, the kind the report is for: 400 tasks of about
half a millisecond on 2 process workers with batch_size=1, and one task that runs 250 ms,
near the end and needs 80 MB of memory while it runs.
"""
from __future__ import annotations

import io
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from parmap import Parallel, delayed  # noqa: E402

STATIC = os.path.join(HERE, "_static")


def simulate(step: int) -> bytes:
    """About 0.5 ms of pure-Python work, 10 kB of result; step 380 runs 250 ms and holds
    80 MB while it does."""
    scratch = np.ones(10_000_000) if step == 380 else None
    end = time.perf_counter() + (0.25 if step == 380 else 0.0005)
    x = 0
    while time.perf_counter() < end:
        x += 1
    del scratch
    return bytes(10_000)


class BufferedBar(tqdm):
    """tqdm writing to a buffer, so that its last state can be shown on the page."""

    monitor_interval = 0
    last: "BufferedBar | None" = None

    def __init__(self, *args, **kwargs):
        self.buffer = io.StringIO()
        super().__init__(*args, file=self.buffer, ncols=80, ascii=False, **kwargs)
        BufferedBar.last = self


def main() -> None:
    Parallel(n_jobs=2)(delayed(abs)(i) for i in range(4))  # the pool, started beforehand
    parallel = Parallel(n_jobs=2, batch_size=1, insights=True, progress=BufferedBar)
    results = parallel(delayed(simulate)(step) for step in range(400))
    assert len(results) == 400
    assert BufferedBar.last is not None
    bar = BufferedBar.last.buffer.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    with open(os.path.join(STATIC, "insights_bar.txt"), "w") as f:
        f.write(bar.strip() + "\n")
    with open(os.path.join(STATIC, "insights_report.txt"), "w") as f:
        f.write(str(parallel.insights) + "\n")
    parallel.insights.plot(os.path.join(STATIC, "insights_timeline.png"))
    print(bar)
    print(parallel.insights)


if __name__ == "__main__":
    main()
