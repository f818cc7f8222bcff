"""Auto batching: how many tasks go in the next batch.

A batch should run for about the backend's ``target_batch_duration`` in a worker: long
enough that the per-batch overhead (pickling, a pipe round trip, a thread hand-off)
is small against the work, short enough that every worker gets a share and a slow
consumer is not handed huge chunks. The sizer learns the per-task time from the batches
that complete (measured in the worker) and remembers it per function for the next call.

It also learns how many bytes a task's result takes, and keeps a batch's results under
``MAX_BATCH_BYTES``: cheap tasks with big results (a stream of 1 MB results) would
otherwise make batches of thousands of tasks, and the ``pre_dispatch`` bound, counted in
batches, would no longer bound memory. Moving those bytes counts as time too
(``SECONDS_PER_BYTE``), so transfer-bound batches are not grown as if they were free.
"""
from __future__ import annotations

import math
import sys
from typing import Any

__all__ = ["AutoBatchSizer", "MAX_GROWTH", "MAX_AUTO_BATCH", "MAX_PRIMED", "MAX_BATCH_BYTES",
           "MIN_SPLIT", "remember", "estimate_nbytes", "fit_to_limit"]

#: auto batching never grows a batch by more than this factor at once: one fast first
#: task must not make the second batch take seconds
MAX_GROWTH = 16
#: and never beyond this many tasks (the memory held per batch stays bounded)
MAX_AUTO_BATCH = 10_000
#: the first batch, sized from an earlier call's measurement, holds at most this many
MAX_PRIMED = MAX_GROWTH ** 2
#: the results of one batch take at most about this many bytes (one task's may exceed it)
MAX_BATCH_BYTES = 8 * 1024 ** 2
#: batches shrinking towards the end of a call stop at about this many seconds of work
MIN_SPLIT = 0.002
#: the cost of moving a result byte to the caller (pickling, a pipe, unpickling): ~1 GB/s
SECONDS_PER_BYTE = 1e-9


class AutoBatchSizer:
    """Picks batch sizes so that a batch runs for about ``target`` seconds.

    Starts at 1, learns the per-task time from completed batches (measured in the worker,
    so transport is not counted), and jumps straight to the size that fits the target,
    growing at most ``MAX_GROWTH``-fold per step. When the number of tasks is known, a
    batch never holds more than ``1/(4·n_jobs)`` of them, so every worker gets work.
    """

    def __init__(self, target: float, n_jobs: int, n_tasks: int | None = None):
        self.target = target
        self.n_jobs = n_jobs
        self.size = 1
        self._per_task: float | None = None
        self._bytes_per_task = 0.0
        self._shrunk = MAX_AUTO_BATCH  # the last size shrunk towards the end
        self._even = False  # split into n_jobs equal batches from the start (see prime)
        self._cap = MAX_AUTO_BATCH
        self.n_tasks = n_tasks or None
        if n_tasks:
            self._cap = max(1, min(MAX_AUTO_BATCH, math.ceil(n_tasks / (4 * n_jobs))))

    def observe(self, n_tasks: int, duration: float, func: Any = None,
                nbytes: int = 0) -> None:
        """A batch of ``n_tasks`` ran for ``duration`` seconds and its results take
        ``nbytes`` bytes."""
        if n_tasks <= 0:
            return
        bytes_per_task = nbytes / n_tasks
        per_task = max((duration + nbytes * SECONDS_PER_BYTE) / n_tasks, 1e-8)
        if self._per_task is None:
            self._per_task, self._bytes_per_task = per_task, bytes_per_task
        else:  # weight by the evidence: a big batch says more than a single task
            weight = min(1.0, n_tasks / (n_tasks + self.size))
            self._per_task += weight * (per_task - self._per_task)
            self._bytes_per_task += weight * (bytes_per_task - self._bytes_per_task)
        if func is not None:
            remember(func, self._per_task, self._bytes_per_task)
        self._resize()

    def prime(self, func: Any, n_tasks: int | None) -> None:
        """Before the first batch: start from what earlier calls measured for ``func``.

        A call whose tasks all fit in one target duration is split into ``n_jobs``
        equal batches (the usual ``Parallel`` call of a handful of tiny tasks: 2 batches
        instead of 4 round trips); otherwise batches start at the learnt size.
        """
        key = _func_key(func)
        learnt = _learnt.get(key) if key is not None else None
        if learnt is None or self._per_task is not None:
            return
        per_task, self._bytes_per_task = learnt
        self._per_task = per_task
        if n_tasks and n_tasks * per_task <= self.target:
            size = max(1, min(math.ceil(n_tasks / self.n_jobs), MAX_AUTO_BATCH))
            self._even = True
        else:  # a guess from another call: trust it only so far
            size = min(max(1, int(self.target / per_task)), self._cap, MAX_PRIMED)
        self.size = min(size, self._byte_cap())

    def next_size(self, dispatched: int) -> int:
        """The size of the next batch, ``dispatched`` tasks in. When the number of tasks
        is known, batches shrink towards the end (at most 1/(2·n_jobs) of what is left)
        so that the workers finish together: down to single tasks, but not below
        ``MIN_SPLIT`` seconds of work (splitting a shorter batch saves less waiting at
        the end than the extra round trip costs). Once shrunk, they never grow back
        (the last 4 sleeps of 10 ms after batches shrunk to 2 went to one worker)."""
        if self.n_tasks is None:
            return self.size
        left, per_task = self.n_tasks - dispatched, self._per_task
        cap = min(self.size, self._shrunk)
        if self._even and per_task is not None and left * per_task <= self.target:
            return cap  # still as quick as when it was split
        size = min(cap, math.ceil(left / (2 * self.n_jobs)))
        if per_task is not None:
            size = max(size, min(cap, round(MIN_SPLIT / per_task)))
        size = max(1, size)
        if size < self.size:
            self._shrunk = size
        return size

    @property
    def per_task(self) -> float | None:
        """Seconds per task, as measured so far (None before any measurement)."""
        return self._per_task

    def _resize(self) -> None:
        assert self._per_task is not None  # called after a measurement
        ideal = int(self.target / self._per_task)
        self.size = max(1, min(ideal, self.size * MAX_GROWTH, self._cap, self._byte_cap()))

    def _byte_cap(self) -> int:
        if self._bytes_per_task <= 0:
            return MAX_AUTO_BATCH
        return max(1, int(MAX_BATCH_BYTES / self._bytes_per_task))


def fit_to_limit(size: int, limit: int, current: int | None = None) -> int:
    """The batch size near ``size`` of which a whole number fills ``limit``
    (``max_tasks_per_child``): 30 under 100 gives 33 and 45 gives 50, so a worker runs
    3 or 2 whole batches rather than retiring with room left. The ``current`` size is
    kept while ``size`` stays within a factor 2 of it: measurements that wobble (a busy
    machine) must not make batches alternate between sizes that fill ``limit``
    differently, which would retire workers early."""
    if current is not None and current // 2 <= size <= 2 * current:
        return current
    if size >= limit:
        return limit
    return limit // max(1, round(limit / max(size, 1)))


#: (seconds, result bytes) per task measured by earlier calls, by function (see prime)
_learnt: dict[tuple, tuple[float, float]] = {}
_LEARNT_MAX = 256


def _func_key(func: Any) -> tuple | None:
    qualname = getattr(func, "__qualname__", None)
    module = getattr(func, "__module__", None)
    if not isinstance(qualname, str) or not isinstance(module, (str, type(None))):
        return None
    return module, qualname


def remember(func: Any, per_task: float, bytes_per_task: float = 0.0) -> None:
    key = _func_key(func)
    if key is not None:
        if len(_learnt) >= _LEARNT_MAX and key not in _learnt:
            _learnt.clear()
        _learnt[key] = (per_task, bytes_per_task)


#: results sampled per batch to estimate its size where nothing was serialised
_SAMPLE = 4


def estimate_nbytes(results: list) -> int:
    """About how many bytes ``results`` hold, from a few of them (``sys.getsizeof``:
    exact for bytes, str and numpy arrays that own their data; a floor for containers)."""
    n = len(results)
    if not n:
        return 0
    step = max(1, n // _SAMPLE)
    sample = results[::step][:_SAMPLE]
    return int(sum(map(sys.getsizeof, sample)) * n / len(sample))
