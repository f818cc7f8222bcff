"""Auto batching: how many tasks go in the next batch.

A batch should run for about the backend's ``target_batch_duration`` in a worker: long
enough that the per-batch overhead (pickling, a pipe round trip, a thread hand-off)
is small against the work, short enough that every worker gets a share and a slow
consumer is not handed huge chunks. The sizer learns the per-task time from the batches
that complete (measured in the worker, so transport is not counted) and remembers it per
function for the next call.
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["AutoBatchSizer", "MAX_GROWTH", "MAX_AUTO_BATCH", "MAX_PRIMED", "remember"]

#: auto batching never grows a batch by more than this factor at once: one fast first
#: task must not make the second batch take seconds
MAX_GROWTH = 16
#: and never beyond this many tasks (the memory held per batch stays bounded)
MAX_AUTO_BATCH = 10_000
#: the first batch, sized from an earlier call's measurement, holds at most this many
MAX_PRIMED = MAX_GROWTH ** 2


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
        self._cap = MAX_AUTO_BATCH
        self.n_tasks = n_tasks or None
        if n_tasks:
            self._cap = max(1, min(MAX_AUTO_BATCH, math.ceil(n_tasks / (4 * n_jobs))))

    def observe(self, n_tasks: int, duration: float, func: Any = None) -> None:
        if n_tasks <= 0:
            return
        per_task = max(duration / n_tasks, 1e-8)
        if self._per_task is None:
            self._per_task = per_task
        else:  # weight by the evidence: a big batch says more than a single task
            weight = min(1.0, n_tasks / (n_tasks + self.size))
            self._per_task += weight * (per_task - self._per_task)
        if func is not None:
            remember(func, self._per_task)
        self._resize()

    def prime(self, func: Any, n_tasks: int | None) -> None:
        """Before the first batch: start from what earlier calls measured for ``func``.

        A call whose tasks all fit in one target duration is split into ``n_jobs``
        equal batches (the usual ``Parallel`` call of a handful of tiny tasks: 2 batches
        instead of 4 round trips); otherwise batches start at the learnt size.
        """
        key = _func_key(func)
        per_task = _learnt.get(key) if key is not None else None
        if per_task is None or self._per_task is not None:
            return
        self._per_task = per_task
        if n_tasks and n_tasks * per_task <= self.target:
            self.size = max(1, min(math.ceil(n_tasks / self.n_jobs), MAX_AUTO_BATCH))
        else:  # a guess from another call: trust it only so far
            self.size = min(max(1, int(self.target / per_task)), self._cap, MAX_PRIMED)

    def next_size(self, dispatched: int) -> int:
        """The size of the next batch, ``dispatched`` tasks in. When the number of tasks
        is known, batches shrink towards the end (at most 1/(2·n_jobs) of what is left)
        so that the workers finish together."""
        if self.n_tasks is None:
            return self.size
        left = self.n_tasks - dispatched
        if self._per_task is not None and left * self._per_task <= self.target:
            return self.size  # what is left is quick: balance no longer matters
        return max(1, min(self.size, math.ceil(left / (2 * self.n_jobs))))

    @property
    def per_task(self) -> float | None:
        """Seconds per task, as measured so far (None before any measurement)."""
        return self._per_task

    def _resize(self) -> None:
        assert self._per_task is not None  # called after a measurement
        ideal = int(self.target / self._per_task)
        self.size = max(1, min(ideal, self.size * MAX_GROWTH, self._cap))


#: per-task seconds measured by earlier calls, by function (see AutoBatchSizer.prime)
_learnt: dict[tuple, float] = {}
_LEARNT_MAX = 256


def _func_key(func: Any) -> tuple | None:
    qualname = getattr(func, "__qualname__", None)
    module = getattr(func, "__module__", None)
    if not isinstance(qualname, str) or not isinstance(module, (str, type(None))):
        return None
    return module, qualname


def remember(func: Any, per_task: float) -> None:
    key = _func_key(func)
    if key is not None:
        if len(_learnt) >= _LEARNT_MAX and key not in _learnt:
            _learnt.clear()
        _learnt[key] = per_task
