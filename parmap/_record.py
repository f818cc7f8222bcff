"""What a batch measures about itself when a call's insights are on: the batch record.

A leaf module (it imports only ``_errors``), because a record is filled in three places
that must not depend on the front end: the caller (dispatch and transfer), the batch
itself wherever it runs (``_delayed.Batch`` runs :func:`run_observed` instead of its fast
loop when ``batch.record`` is set), and a worker process (unpickling and pickling).

::

    caller      submitted ─ pickle_s, request_bytes ─────────────────┐   (process backend)
    worker      received ─ worker_unpickle_s ─ began ══ tasks ══ ended ─ worker_pickle_s ─ sent
    caller      arrived ─ reply_bytes, unpickle_s ─ collected                          <──┘

Timestamps are epoch seconds (``time.time()``), so that records made by different
processes, or by different machines for a remote backend, share one clock; durations are
``perf_counter`` differences. A backend that runs batches elsewhere ships the batch with
its record, and merges the record that comes back with :meth:`BatchRecord.absorb` (what the
process backend does in ``protocol.decode_reply``).

Per-task figures are kept small: sums, a log-scale histogram of task times (four bins per
octave) and the few slowest tasks with their call repr, made where the task ran.
"""
from __future__ import annotations

import os
import sys
import threading
from math import floor, log2
from time import monotonic, perf_counter, process_time, thread_time, time
from typing import Any, Callable

from ._errors import call_repr
from ._worker_state import process_slot

__all__ = ["BatchRecord", "run_observed", "memory", "lanes", "BINS_PER_OCTAVE",
           "SLOWEST_KEPT", "PIPE_BUFFER", "bin_of", "bin_seconds"]

#: histogram resolution: bin edges 2**(k/4) seconds apart, about 19 % wide
BINS_PER_OCTAVE = 4
#: the slowest tasks each batch reports (with their call repr)
SLOWEST_KEPT = 5
#: a reply bigger than this (a pipe's buffer on Linux) keeps the worker sending it until the
#: caller has read it
PIPE_BUFFER = 64 * 1024
#: bin of a task that took no measurable time
_ZERO_BIN = -30 * BINS_PER_OCTAVE  # 2**-30 s, about a nanosecond
_HOST = os.uname().nodename if hasattr(os, "uname") else ""

#: (seconds, cpu seconds, task index, call repr)
Slow = tuple[float, float, int, str]


def bin_of(seconds: float) -> int:
    return floor(log2(seconds) * BINS_PER_OCTAVE) if seconds > 1e-9 else _ZERO_BIN


def bin_seconds(index: int) -> float:
    """The middle of a histogram bin, in seconds (geometric)."""
    return float(2.0 ** ((index + 0.5) / BINS_PER_OCTAVE))


class BatchRecord:
    """One batch's measurements (see the module doc for who fills which field)."""

    __slots__ = (
        # caller
        "submitted", "pickle_s", "request_bytes", "arrived", "unpickle_s", "reply_bytes",
        "collected",
        # where the batch ran
        "host", "pid", "slot", "thread", "cpu_clock", "worker_since", "received",
        "worker_unpickle_s", "began", "ended", "worker_pickle_s", "sent", "shm_bytes",
        "n_tasks", "task_s", "task_cpu_s", "hist", "slowest", "rss", "peak_rss")

    def __init__(self, submitted: float = 0.0, cpu_clock: str = "thread"):
        self.submitted = submitted
        self.pickle_s = 0.0
        self.request_bytes = 0
        self.arrived = 0.0  # the reply's bytes were read by the caller (process backend)
        self.unpickle_s = 0.0
        self.reply_bytes = 0
        self.collected = 0.0
        self.host = ""
        self.pid = 0
        self.slot: int | None = None  # a pool's worker id, in its process workers
        self.thread = ""
        #: "thread": a task's CPU time is its thread's (threads, the caller); "process":
        #: the whole process's (a worker process, where a task may start threads of its own)
        self.cpu_clock = cpu_clock
        self.worker_since: float | None = None  # when the worker became ready, if known
        self.received = 0.0
        self.worker_unpickle_s = 0.0
        self.began = 0.0
        self.ended = 0.0
        self.worker_pickle_s = 0.0
        self.sent = 0.0
        self.shm_bytes = 0  # result arrays that came back through /dev/shm
        self.n_tasks = 0
        self.task_s = 0.0
        self.task_cpu_s = 0.0
        self.hist: dict[int, int] | None = {}
        self.slowest: list[Slow] = []
        self.rss: int | None = None
        self.peak_rss: int | None = None

    # compact pickling: values only, in slot order (a record crosses a pipe per batch)
    def __getstate__(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state: tuple) -> None:
        for name, value in zip(self.__slots__, state):
            setattr(self, name, value)

    def __repr__(self) -> str:
        return (f"<BatchRecord {self.n_tasks} tasks on {self.worker} "
                f"{self.ended - self.began:.4f}s>")

    @property
    def worker(self) -> str:
        """Who ran the batch: a process id, or a thread name in the caller's process."""
        if self.host and self.host != _HOST:
            return f"{self.host} pid {self.pid}"
        return f"pid {self.pid}" if self.pid != os.getpid() else self.thread

    def busy_until(self, next_received: float) -> float:
        """When the worker was free again: once its reply was sent, or, for a reply too
        big for the pipe, once the caller had read it (or the next batch began)."""
        if self.arrived and self.reply_bytes > PIPE_BUFFER:
            return max(self.sent, min(self.arrived, next_received))
        return self.sent

    def absorb(self, remote: BatchRecord) -> None:
        """Take the fields measured where the batch ran from ``remote`` (a copy of this
        record that travelled with the batch and came back)."""
        for name in _REMOTE_FIELDS:
            setattr(self, name, getattr(remote, name))

    # ------------------------------------------------------------------ measuring
    def start(self) -> None:
        """Where the batch runs, just before its first task."""
        self.host, self.pid = _HOST, os.getpid()
        # a process worker's own batch (not one of threads that a task started there)
        self.slot = process_slot() if self.cpu_clock == "process" else None
        self.thread = threading.current_thread().name
        self.began = time()
        if not self.received:
            self.received = self.began

    def run(self, index: int, func: Callable[..., Any], args: tuple,
            kwargs: dict | None) -> Any:
        """Run one task, counting its wall and CPU time."""
        cpu_clock = process_time if self.cpu_clock == "process" else thread_time
        c0 = cpu_clock()
        t0 = perf_counter()
        try:
            return func(*args, **kwargs) if kwargs else func(*args)
        finally:
            seconds = perf_counter() - t0
            cpu = cpu_clock() - c0
            self.n_tasks += 1
            self.task_s += seconds
            self.task_cpu_s += cpu
            hist = self.hist
            if hist is not None:
                key = bin_of(seconds)
                hist[key] = hist.get(key, 0) + 1
            slowest = self.slowest  # unordered; no heapq: it would cost import parmap
            if len(slowest) < SLOWEST_KEPT:
                slowest.append((seconds, cpu, index, ""))
            else:
                fastest = min(slowest)
                if seconds > fastest[0]:
                    slowest[slowest.index(fastest)] = (seconds, cpu, index, "")

    def finish(self, task: Callable[[int], tuple]) -> None:
        """After the last task: name the slowest tasks (``task(index)`` gives the
        ``(func, args, kwargs)`` of a task) and read the memory of this process."""
        self.ended = self.sent = time()
        self.slowest = sorted(((s, c, i, call_repr(*task(i))) for s, c, i, _ in self.slowest),
                              reverse=True)
        self.rss, self.peak_rss = memory()


_REMOTE_FIELDS = ("host", "pid", "slot", "thread", "cpu_clock", "worker_since", "received",
                  "worker_unpickle_s", "began", "ended", "worker_pickle_s", "sent",
                  "shm_bytes", "n_tasks", "task_s", "task_cpu_s", "hist", "slowest", "rss",
                  "peak_rss")


def lanes(records: list[BatchRecord]) -> dict[str, list[tuple[BatchRecord, float]]]:
    """Records by worker, in the order each ran them, with when the worker was free
    again after each (see :meth:`BatchRecord.busy_until`). A pool's worker is its slot:
    the processes that replace one another in it (recycling) make one lane."""
    by_worker: dict[Any, list[BatchRecord]] = {}
    for record in records:
        key = record.worker if record.slot is None else (record.host, record.slot)
        by_worker.setdefault(key, []).append(record)
    out = {}
    for own in by_worker.values():
        own.sort(key=lambda r: r.received)
        after = [r.received for r in own[1:]] + [float("inf")]
        processes = len({r.pid for r in own})
        name = own[0].worker if processes == 1 else \
            f"worker {own[0].slot} ({processes} procs)"
        out[name] = [(r, r.busy_until(nxt)) for r, nxt in zip(own, after)]
    return out


def run_observed(batch: Any, out: list) -> None:
    """The instrumented loop of ``Batch.__call__``: every task timed into ``batch.record``.

    Same semantics as the batch's general loop (tracker, transform, keywords); only runs
    when insights are on, so the fast loop stays free of measurement.
    """
    record: BatchRecord = batch.record
    append, tracker, transform = out.append, batch.tracker, batch.transform
    func, start = batch.func, batch.start
    tasks = batch.tasks if func is None else [(func, args, None) for args in batch.tasks]
    run = record.run
    record.start()
    index = start
    try:
        for func, args, kwargs in tasks:
            if tracker is not None:
                tracker.mark(index, monotonic())
            result = run(index, func, args, kwargs)
            append(result if transform is None else transform(result))
            index += 1
    finally:
        record.finish(lambda i: batch.task(i - start))


def memory() -> tuple[int | None, int | None]:
    """(resident set size, its peak since the process started), in bytes, of this process:
    /proc/self/status on Linux, else the peak from ``getrusage`` (None when unknown)."""
    try:
        with open("/proc/self/status", "rb") as f:
            status = f.read()
    except OSError:
        return None, _peak_from_rusage()
    rss = peak = None
    for line in status.splitlines():
        if line.startswith(b"VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith(b"VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return rss, peak if peak is not None else _peak_from_rusage()


def _peak_from_rusage() -> int | None:
    try:
        import resource  # stdlib, POSIX only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes vs KiB
