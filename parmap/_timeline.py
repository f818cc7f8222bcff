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
    edge = {"edgecolor": "white", "linewidth": 0.4} if len(records) <= 400 else {}
    for lane in range(len(names)):
        ax.broken_barh(compute[lane], (lane - 0.36, 0.72), facecolors=COMPUTE, **edge)
        ax.broken_barh(transfer[lane], (lane - 0.36, 0.72), facecolors=TRANSFER)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(0, max(end, 1e-6))
    ax.tick_params(labelbottom=False)
    shares = data["time"]
    ax.set_title(title or (
        f"{data['n_tasks']} tasks, {data['n_batches']} batches on {data['n_workers']} "
        f"{data['backend']} workers: compute {shares['compute']:.0%}, transfer "
        f"{shares['transfer']:.0%}, idle {shares['idle']:.0%}"), fontsize=10, loc="left")
    handles = [_patch(COMPUTE, "running tasks"), _patch(TRANSFER, "pickling, sending"),
               _patch("white", "idle", edge="#999999")]
    ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8,
              ncols=3, frameon=False, borderaxespad=0.2)

    for name in names:
        own = [r for r, _ in by_worker.get(name, [])]
        rss = [r.rss / MiB for r in own if r.rss is not None]
        if not rss or len(rss) != len(own):
            continue  # the memory of this worker is not known
        line, = memory.step([0.0] + [r.sent - t0 for r in own], rss[:1] + rss,
                            where="post", label=name, linewidth=1.2)
        peak = max((r.peak_rss or 0) for r in own)
        if peak:
            memory.axhline(peak / MiB, color=line.get_color(), linestyle=":", linewidth=0.8)
    memory.set_ylabel("resident memory (MiB)")
    memory.set_xlabel("seconds since the call began (dotted: each worker's peak)")
    memory.set_ylim(bottom=0)
    if len(names) <= 8 and records:
        memory.legend(fontsize=8, loc="lower right")
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _patch(color: str, label: str, edge: str | None = None) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=color, edgecolor=edge or color, label=label)
