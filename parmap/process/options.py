"""The options of a worker pool: what makes two pools interchangeable (a leaf module, so
that the pool, its manager thread and its launcher thread all name them)."""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["PoolOptions"]


class PoolOptions(NamedTuple):
    """What makes two pools interchangeable (n_jobs is not: a pool resizes)."""

    start_method: str | None = None
    initializer: bytes | None = None  # cloudpickle of (initializer, initargs)
    inner_max_num_threads: int | None = None
    idle_timeout: float = 300.0
    finalizer: bytes | None = None  # pickle (or cloudpickle) of the finalizer
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None  # bytes of RSS

    @property
    def warm_cloudpickle(self) -> bool:
        """Whether the forkserver should import cloudpickle for these workers: they come
        again and again (recycling), or unpickle an initializer (see ``spawn.prestart``)."""
        return bool(self.max_tasks_per_child or self.max_memory_per_child or self.initializer)
