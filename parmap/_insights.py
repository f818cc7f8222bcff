"""``Parallel(insights=True)``: what one call did, measured, and where its time went.

Data flow::

    Dispatcher ── submitting(batch) ──> a BatchRecord on the batch (``_record``)
        the batch fills it where it runs (thread, caller, worker process, remote machine)
    backend callback ── completed(batch, outcome) ──> records; task figures merged
    inline calls (n_jobs=1): ``_monitor`` fills one record per ~20 ms of tasks
    parallel.insights ──> to_dict(): the figures ──> str(): ``_report`` words them
                     └──> plot(): ``_timeline`` draws them

Nothing here runs when insights are off: the dispatcher has no observer, batches carry no
record and run their fast loop, and replies carry no record.

Time accounting, per worker, over the call's wall time (call start to call end)::

    |-- start-up --|== batch ==|- between -|== batch ==| ... |== batch ==|-- at the end --|
    a batch: unpickling (transfer) | tasks (compute) | in-batch overhead | pickling (transfer)

The workers' time (capacity) is ``n_workers x wall``; each share in ``to_dict()["time"]``
is a fraction of it.
"""
from __future__ import annotations

import threading
from time import time
from typing import Any

from ._delayed import Batch
from ._record import SLOWEST_KEPT, BatchRecord, bin_seconds, lanes
from ._report import advise, report
from ._timeline import plot

__all__ = ["Insights"]


class Insights:
    """What one ``Parallel`` call did: ``print()`` it for a report with advice,
    ``to_dict()`` for the figures, ``plot(path)`` for a timeline picture.

    Read it during the call for the figures so far. Memory: about 300 bytes per batch.
    """

    def __init__(self, backend: str, n_workers: int, started: float):
        self.backend = backend
        self.n_workers = n_workers
        self.started = started  #: epoch seconds: the call began
        self.ended: float | None = None  #: epoch seconds: the call ended (None: running)
        self.finished = False  #: every task ran (not failed or cancelled)
        self.input_s = 0.0  #: reading the input and making batches, in the caller
        self.consumer_s = 0.0  #: the caller's own loop over the results (generator modes)
        self.records: list[BatchRecord] = []  #: one per completed batch
        self._hist: dict[int, int] = {}
        self._slowest: list = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ collecting
    def submitting(self, batch: Batch, read_s: float) -> None:
        """Dispatcher hook (the ``Observer`` protocol)."""
        self.input_s += read_s
        batch.record = BatchRecord(time())

    def completed(self, batch: Batch, outcome: Any) -> None:
        """Dispatcher hook, from any thread: keep the record of a batch that succeeded."""
        record = batch.record
        if record is not None and isinstance(outcome, list):
            record.collected = time()
            self.add(record)

    def add(self, record: BatchRecord) -> None:
        """Keep a finished record; its task histogram and slowest tasks are merged."""
        with self._lock:
            hist, record.hist = record.hist or {}, None
            for key, count in hist.items():
                self._hist[key] = self._hist.get(key, 0) + count
            self._slowest = sorted(self._slowest + record.slowest, reverse=True)[:SLOWEST_KEPT]
            record.slowest = []
            self.records.append(record)

    def close(self, finished: bool) -> None:
        self.ended = time()
        self.finished = finished

    # ------------------------------------------------------------------ results
    def __str__(self) -> str:
        return report(self.to_dict())

    def __repr__(self) -> str:
        data = self.to_dict()
        return (f"<Insights: {data['n_tasks']} tasks in {data['wall_s']:.3f}s on "
                f"{data['n_workers']} {self.backend} workers; print() it for the report>")

    def plot(self, path: Any = None, title: str | None = None) -> Any:
        """Draw the timeline (one lane per worker, a bar per batch, idle gaps blank) and
        each worker's memory; save it to ``path`` (PNG, SVG, PDF: by its suffix) when
        given. Returns the matplotlib ``Figure``. Needs matplotlib
        (``pip install "parmap[plot]"``)."""
        return plot(self, path, title)

    def to_dict(self) -> dict[str, Any]:
        """Every figure of the report, as plain numbers (seconds, bytes, fractions)."""
        with self._lock:
            records = list(self.records)
            hist = dict(self._hist)
            slowest = list(self._slowest)
        end = self.ended if self.ended is not None else time()
        wall = max(end - self.started, 1e-9)
        workers = _workers(records, self.started, end)
        n_workers = max(self.n_workers, len(workers))
        n_tasks = sum(r.n_tasks for r in records)
        task_s = sum(r.task_s for r in records)
        task_cpu_s = sum(r.task_cpu_s for r in records)
        waits = [max(0.0, r.received - r.submitted - r.pickle_s) for r in records]
        began = [r.began for r in records]
        data = {
            "backend": self.backend,
            "n_workers": n_workers,
            "finished": self.finished,
            "running": self.ended is None,
            "wall_s": wall,
            "n_tasks": n_tasks,
            "n_batches": len(records),
            "tasks": _task_figures(n_tasks, task_s, task_cpu_s, hist, slowest),
            "transfer": {
                "to_workers_bytes": sum(r.request_bytes for r in records),
                "from_workers_bytes": sum(r.reply_bytes for r in records),
                "shm_result_bytes": sum(r.shm_bytes for r in records),
                "caller_pickle_s": sum(r.pickle_s for r in records),
                "caller_unpickle_s": sum(r.unpickle_s for r in records),
                "worker_unpickle_s": sum(r.worker_unpickle_s for r in records),
                "worker_pickle_s": sum(r.worker_pickle_s for r in records),
                "worker_send_s": sum(w["send_s"] for w in workers),
            },
            "queue_wait_s": {"total": sum(waits), "mean": sum(waits) / len(waits) if waits
                             else 0.0, "max": max(waits, default=0.0)},
            "caller": {"input_s": self.input_s, "consumer_s": self.consumer_s},
            "startup": {"first_task_s": min(began) - self.started if began else None,
                        "new_workers": sum(1 for w in workers if w["new"]),
                        "replaced_workers": sum(w["processes"] - 1 for w in workers)},
            "workers": workers,
            "time": _time_shares(workers, n_workers, wall, task_s),
        }
        data["advice"] = advise(data)
        return data


def _task_figures(n: int, total: float, cpu: float, hist: dict[int, int],
                  slowest: list) -> dict[str, Any]:
    most = slowest[0][0] if slowest else None

    def percentile(q: float) -> float | None:
        """From the histogram: the middle of the bin that holds it, about 9 % off at most."""
        if not n or not hist:
            return None
        seen, rank, key = 0, q * n, min(hist)
        for key in sorted(hist):
            seen += hist[key]
            if seen >= rank:
                break
        value = bin_seconds(key)
        return min(value, most) if most is not None else value

    return {
        "total_s": total, "cpu_s": cpu, "cpu_share": cpu / total if total > 0 else None,
        "mean_s": total / n if n else None,
        "p50_s": percentile(0.5), "p90_s": percentile(0.9), "p99_s": percentile(0.99),
        "max_s": most,
        "slowest": [{"index": index, "call": call, "wall_s": seconds, "cpu_s": cpu_s}
                    for seconds, cpu_s, index, call in sorted(slowest, reverse=True)],
    }


def _workers(records: list[BatchRecord], started: float, end: float) -> list[dict[str, Any]]:
    """Per worker: batches, tasks, busy time, utilisation, memory, idle time split."""
    wall = max(end - started, 1e-9)
    out = []
    for name, own in lanes(records).items():
        busy = sum(until - r.received for r, until in own)
        compute = sum(r.task_s for r, _ in own)
        send = sum(until - r.sent for r, until in own)  # big replies: until read
        transfer = sum(r.worker_unpickle_s + r.worker_pickle_s for r, _ in own) + send
        first = max(own[0][0].received - started, 0.0)
        last = max(end - max(until for _, until in own), 0.0)
        since = min((r.worker_since for r, _ in own if r.worker_since is not None),
                    default=None)
        peaks = [r.peak_rss for r, _ in own if r.peak_rss is not None]
        out.append({
            "worker": name, "batches": len(own), "tasks": sum(r.n_tasks for r, _ in own),
            "busy_s": busy, "compute_s": compute, "transfer_s": transfer, "send_s": send,
            "utilisation": min(busy / wall, 1.0),
            "startup_idle_s": first, "end_idle_s": last,
            "between_idle_s": max(wall - busy - first - last, 0.0),
            "new": since is not None and since >= started,
            "rss_bytes": own[-1][0].rss, "peak_rss_bytes": max(peaks, default=None),
            "processes": len({r.pid for r, _ in own}),  # more than 1: recycled
        })
    out.sort(key=lambda w: str(w["worker"]))
    return out


def _time_shares(workers: list[dict[str, Any]], n_workers: int, wall: float,
                 task_s: float) -> dict[str, float]:
    """Fractions of the workers' time (n_workers x wall); workers that never ran a batch
    count as idle from start to end."""
    capacity = n_workers * wall
    busy = sum(w["busy_s"] for w in workers)
    transfer = sum(w["transfer_s"] for w in workers)
    unseen = (n_workers - len(workers)) * wall
    return {
        "compute": task_s / capacity,
        "transfer": transfer / capacity,
        "in_batch_overhead": max(busy - task_s - transfer, 0.0) / capacity,
        "idle": max(capacity - busy, 0.0) / capacity,
        "idle_startup": (sum(w["startup_idle_s"] for w in workers) + unseen) / capacity,
        "idle_between": sum(w["between_idle_s"] for w in workers) / capacity,
        "idle_end": sum(w["end_idle_s"] for w in workers) / capacity,
    }
