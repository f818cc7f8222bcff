"""joblib-style progress lines for ``verbose``: on stderr, on stdout above 50.

``verbose`` 1-9 prints when the number of finished tasks doubles (1, 2, 4, 8, ...),
10 and above after every batch; every level prints a closing line. The total is unknown
for a generator until it is exhausted, so remaining time is only estimated once it is.
"""
from __future__ import annotations

import sys
from time import monotonic
from typing import Protocol

__all__ = ["Progress"]


class _Counts(Protocol):
    """What the dispatcher tells about a call in progress."""

    n_completed: int
    n_tasks: int | None


def _fmt(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


class Progress:
    def __init__(self, verbose: float, n_jobs: int, backend_name: str):
        self.verbose = verbose
        self.prefix = f"[Parallel(n_jobs={n_jobs}, backend={backend_name})]"
        self.start = monotonic()
        self._next_report = 1

    def _write(self, text: str) -> None:
        stream = sys.stdout if self.verbose > 50 else sys.stderr
        print(f"{self.prefix}: {text}", file=stream, flush=True)

    def update(self, done: int, total: int | None) -> None:
        if self.verbose < 10 and done < self._next_report:
            return
        while self._next_report <= done:
            self._next_report *= 2
        elapsed = monotonic() - self.start
        if total:
            remaining = elapsed / done * (total - done) if done else 0.0
            self._write(f"Done {done} of {total} tasks | elapsed: {_fmt(elapsed)} | "
                        f"remaining: {_fmt(remaining)}")
        else:
            self._write(f"Done {done} tasks | elapsed: {_fmt(elapsed)}")

    def finish(self, done: int) -> None:
        self._write(f"Done {done} of {done} tasks | elapsed: {_fmt(monotonic() - self.start)} "
                    f"| finished")

    def __call__(self, dispatcher: _Counts) -> None:
        """Dispatcher hook: called in the consumer's thread after each completed batch."""
        self.update(dispatcher.n_completed, dispatcher.n_tasks)
