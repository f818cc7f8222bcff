"""``parallel.insights.plot()``: the timeline picture of one call (matplotlib).

::

    worker lanes   one per worker: per batch, unpickling its tasks (transfer), running
                   them (compute), pickling the results (transfer); blank = idle
    memory panel   each worker's resident memory after each batch, and its peak

matplotlib is optional (``pip install "parmap[plot]"``) and imported only here, when a
picture is asked for; the figure is drawn without pyplot, so no window opens and no
global state changes.
"""
from __future__ import annotations

import os
from time import time
from typing import Any

from ._record import lanes

__all__ = ["plot", "COMPUTE", "TRANSFER"]

COMPUTE = "#4c72b0"
TRANSFER = "#dd8452"
MiB = 1024 ** 2


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("Insights.plot() draws with matplotlib, which is not installed: "
                          "pip install \"parmap[plot]\" (or pip install matplotlib)") from exc
    return Figure


def plot(insights: Any, path: str | os.PathLike | None = None, title: str | None = None) -> Any:
    """Draw ``insights`` (an ``Insights``); save to ``path`` if given; return the Figure."""
    figure_class = _figure_class()
    data = insights.to_dict()
    records = list(insights.records)
    t0 = insights.started
    end = (insights.ended if insights.ended is not None else time()) - t0
    by_worker = lanes(records)
    names = sorted(by_worker) or ["(no batch yet)"]
    height = 2.2 + 0.42 * len(names) + 2.0
    fig = figure_class(figsize=(10, height), layout="constrained")
    grid = fig.add_gridspec(2, 1, height_ratios=[max(len(names) * 0.42 + 0.6, 1.2), 2.0])
    ax = fig.add_subplot(grid[0])
    memory = fig.add_subplot(grid[1], sharex=ax)

    compute: list[list[tuple[float, float]]] = [[] for _ in names]
    transfer: list[list[tuple[float, float]]] = [[] for _ in names]
    for lane, name in enumerate(names):
        for r, until in by_worker.get(name, []):
            compute[lane].append((r.began - t0, r.ended - r.began))
            if r.began > r.received:
                transfer[lane].append((r.received - t0, r.began - r.received))
            if until > r.ended:
                transfer[lane].append((r.ended - t0, until - r.ended))
    # white edges part adjacent batches, unless the bars are too thin to show colour
    edge = {"edgecolor": "white", "linewidth": 0.4} if len(records) <= 40 * len(names) \
        else {}
    for lane in range(len(names)):
        ax.broken_barh(compute[lane], (lane - 0.36, 0.72), facecolors=COMPUTE, **edge)
        ax.broken_barh(transfer[lane], (lane - 0.36, 0.72), facecolors=TRANSFER)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(0, max(end, 1e-6))
    ax.tick_params(labelbottom=False)
    shares = data["time"]
    fig.suptitle(title or (
        f"{data['n_tasks']} tasks, {data['n_batches']} batches on {data['n_workers']} "
        f"{data['backend']} workers: compute {shares['compute']:.0%}, transfer "
        f"{shares['transfer']:.0%}, idle {shares['idle']:.0%}"), fontsize=10, x=0.01,
        ha="left")
    handles = [_patch(COMPUTE, "running tasks"), _patch(TRANSFER, "pickling, sending"),
               _patch("white", "idle", edge="#999999")]
    ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8,
              ncols=3, frameon=False, borderaxespad=0.2)

    for name in names:
        own = [r for r, _ in by_worker.get(name, [])]
        if not own or any(r.rss is None for r in own):
            continue  # the memory of this worker is not known
        times = [0.0] + [r.sent - t0 for r in own]
        rss = [r.rss / MiB for r in own]  # type: ignore[operator]
        line, = memory.step(times, rss[:1] + rss, where="post", label=name, linewidth=1.2)
        if all(r.peak_rss is not None for r in own):
            peak = [r.peak_rss / MiB for r in own]  # type: ignore[operator]
            memory.step(times, peak[:1] + peak, where="post", color=line.get_color(),
                        linestyle=":", linewidth=1.0)
            for r, before, after in zip(own[1:], peak, peak[1:]):
                if after > before * 1.02:  # the peak rose while this batch ran: show when
                    memory.fill_between([r.began - t0, r.sent - t0], before, after,
                                        color=line.get_color(), alpha=0.25, linewidth=0)
    memory.set_ylabel("resident memory (MiB)")
    memory.set_xlabel("seconds since the call began (dotted: each worker's peak so far; "
                      "shaded: the batch during which it rose)")
    peaks = [r.peak_rss or r.rss or 0 for r in records]
    memory.set_ylim(0, max(peaks, default=0) / MiB * 1.15 or 1.0)
    if len(names) <= 8 and records:
        memory.legend(fontsize=8, loc="lower right")
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _patch(color: str, label: str, edge: str | None = None) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=color, edgecolor=edge or color, label=label)
