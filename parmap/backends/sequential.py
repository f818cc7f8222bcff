"""Runs every batch at once, in the thread that submits it.

``Parallel`` does not even go through this backend for ``n_jobs=1``: it runs each task
inline in the caller's thread (see ``_parallel``), so tracebacks and pdb are untouched.
The backend exists for explicit ``backend="sequential"`` configuration and as the
synchronous test double of the dispatcher.
"""
from __future__ import annotations

from .._delayed import Batch
from ._base import Callback, NestedSpec, Outcome, ParallelBackendBase

__all__ = ["SequentialBackend"]


class SequentialBackend(ParallelBackendBase):
    supports_sharedmem = True
    inline = True

    def effective_n_jobs(self, n_jobs: int) -> int:
        return 1

    def submit(self, batch: Batch, callback: Callback) -> None:
        try:
            outcome: Outcome = batch()
        except BaseException as exc:  # delivered to the caller through the dispatcher
            outcome = exc
        callback(outcome)

    def get_nested_backend(self) -> NestedSpec | None:
        """Tasks run in the caller: their nested calls see the caller's settings."""
        return None
