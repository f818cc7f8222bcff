"""Long runs: replacing workers after ``max_tasks_per_child`` tasks or above
``max_memory_per_child`` bytes, the worker's memory reports, and its finalizer.

Pool side (every method of :class:`Recycler` runs with the pool lock held)::

    assigning a job  -> the worker's task budget shrinks by the job's size; when what is
                        left could not take another job of that size, the worker is
                        retired at once: STOP is queued behind the job, so it finishes
                        what it holds and exits, while its replacement starts *now*
    a reply arrives  -> the worker published its RSS before replying; above the limit,
                        it is retired the same way (and counted for the call's warning)
    retired          -> its id waits in ``replacing``; the pool's launcher thread (``launcher.py``) starts
                        the replacement outside the pool lock and off the manager thread
                        (neither the caller nor the results wait for a process to start:
                        ~10 ms with forkserver) and only then gives it work

A worker never runs more than ``max_tasks_per_child`` tasks: it takes only jobs that fit
its budget (the dispatcher keeps batches no larger than the limit), and a retired
worker's queued jobs are ones it had room for. No job moves: nothing is lost or repeated.

Worker side: :class:`RssProbe` reads the resident set size (``/proc/self/statm``, ~3 µs,
without the pages of argument files kept mapped;
``resource.getrusage``'s peak elsewhere) into the worker's shared status after each
batch, so the pool sees it with the reply and still knows it when the worker is killed
(the crash message quotes it). :func:`run_finalizer` runs the user's finalizer when the
worker leaves its loop normally.
"""
from __future__ import annotations

import os
import pickle
import sys
from math import inf
from typing import Any, Protocol, Sequence

from . import arg_maps

__all__ = ["Recycler", "RssProbe", "RSS", "run_finalizer", "format_bytes"]

#: the slot of a worker's shared status array that holds its RSS (bytes; 0: unknown)
RSS = 2


class Slot(Protocol):
    """What the recycler needs of a worker record (``scheduler.WorkerSlot``)."""

    budget: float
    dead: bool
    status: Sequence[float]


class Recycler:
    """The pool's recycling limits and bookkeeping."""

    __slots__ = ("max_tasks", "max_memory", "replacing", "memory")

    def __init__(self, max_tasks: int | None, max_memory: int | None):
        self.max_tasks = max_tasks
        self.max_memory = max_memory
        #: ids of retired workers whose replacements are still to be started
        self.replacing: list[int] = []
        #: per call (job owner): the RSS of each worker replaced for its memory
        self.memory: dict[object, list[float]] = {}

    @property
    def budget(self) -> float:
        """The task budget of a new worker."""
        return self.max_tasks or inf

    @staticmethod
    def assigned(worker: Slot, n_tasks: int, next_tasks: int) -> bool:
        """``worker`` got a job of ``n_tasks``: whether it should retire after it (what
        its budget has left could not take another job of that size, nor the next
        pending job, of ``next_tasks``: its replacement then starts now, not when it
        falls idle)."""
        worker.budget -= n_tasks
        return worker.budget < max(n_tasks, next_tasks)

    def over_memory(self, worker: Slot, owner: object) -> bool:
        """A reply from ``worker`` for a job of ``owner`` arrived: whether its RSS is
        above the limit (then counted against the call)."""
        if self.max_memory is None or worker.dead:
            return False
        rss = worker.status[RSS]
        if rss <= self.max_memory:
            return False
        if owner is not None:  # None: a cancelled batch, whose call is not listening
            self.memory.setdefault(owner, []).append(rss)
        return True

    def memory_report(self, owner: object) -> str | None:
        """The warning for a call whose workers went over the memory limit (once)."""
        found = self.memory.pop(owner, None)
        if not found:
            return None
        times = "once" if len(found) == 1 else f"{len(found)} times"
        return (f"parmap: a worker went over max_memory_per_child="
                f"{format_bytes(self.max_memory or 0)} after a batch and was replaced "
                f"{times} during this call (largest RSS {format_bytes(max(found))}). If this "
                f"is frequent, the tasks probably leak memory (or keep caches): fix the "
                f"leak, or raise the limit if the workers simply need more.")


def format_bytes(n: float) -> str:
    for unit, size in (("GB", 1024 ** 3), ("MB", 1024 ** 2), ("kB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


class RssProbe:
    """In the worker: its resident set size in bytes, cheaply (0 when unknown).

    The pages of argument files that ``arg_maps`` keeps mapped between batches are left
    out: they are the caller's memory, and counted in each worker they would retire
    workers that only read a large array. What is left out is the growth of shared
    pages since the worker started, up to the size of those mappings, so the worker's
    own shared memory (a leak through ``mmap(-1)`` or its own /dev/shm files) counts."""

    __slots__ = ("fd", "page", "shared0")

    def __init__(self) -> None:
        self.page = 4096
        self.shared0 = 0
        try:
            self.fd: int | None = os.open("/proc/self/statm", os.O_RDONLY)
            self.page = os.sysconf("SC_PAGE_SIZE")
            self.shared0 = int(os.pread(self.fd, 128, 0).split()[2])
        except (OSError, ValueError, AttributeError, IndexError):
            self.fd = None

    def __call__(self) -> float:
        if self.fd is not None:
            try:
                fields = os.pread(self.fd, 128, 0).split()
                resident, shared = int(fields[1]), int(fields[2])
                kept = arg_maps.mapped_bytes() // self.page
                return float((resident - min(max(0, shared - self.shared0), kept))
                             * self.page)
            except (OSError, ValueError, IndexError):
                self.fd = None
        return _peak_rss()


_resource: list = []  # [the resource module, or None where it does not exist]


def _peak_rss() -> float:
    """The process's peak RSS in bytes, from ``getrusage`` (0.0: unknown)."""
    if not _resource:  # imported once, only where /proc/self/statm is not read (~0.3 ms)
        try:
            import resource  # stdlib
        except ImportError:  # Windows
            _resource.append(None)
        else:
            _resource.append(resource)
    resource = _resource[0]
    if resource is None:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the peak, not now
    return float(peak if sys.platform == "darwin" else peak * 1024)


def run_finalizer(finalizer: bytes | None) -> None:
    """Run the pool's finalizer (pickle or cloudpickle bytes: ``pickle.loads`` reads
    both, importing cloudpickle only for the latter) as the worker exits normally; its
    exception is printed to the worker's stderr (the worker exits anyway)."""
    if finalizer is None:
        return
    try:
        function: Any = pickle.loads(finalizer)
        function()
    except BaseException:
        import traceback  # stdlib, but ~8 ms: only when a finalizer failed

        sys.stderr.write("parmap: the worker's finalizer raised:\n")
        traceback.print_exc()
