"""What parmap changes in multiprocessing, for the processes it starts itself only.

Each change wraps a function of multiprocessing's once, and acts only while the thread
that calls it is inside parmap's own start (``spawning``, a per-thread flag that
``spawn.start_process`` and ``spawn.prestart`` set): processes that other code starts,
from other threads or at other times, are untouched.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["spawning", "skip_main_in_workers", "ignore_sigint_at_exec"]

#: per thread: ``active`` inside parmap's start of a process (or of the forkserver),
#: ``exec_ignoring`` while a Ctrl-C is held there (``ignore_sigint_at_exec``)
spawning = threading.local()


def skip_main_in_workers() -> None:
    """Make spawn/forkserver workers started by parmap skip re-running ``__main__``
    (installed before the first such start: ``prestart``, ``start_process``).

    multiprocessing re-imports the main script in every spawned child, which breaks
    scripts without an ``if __name__ == "__main__"`` guard. Our workers never need it:
    functions and classes from ``__main__`` travel by value (``byvalue``, cloudpickle).
    The wrapper changes nothing for processes other code starts (the flag is per thread,
    and set only around our own ``Process.start()``).
    """
    from multiprocessing import spawn

    original = spawn.get_preparation_data
    if getattr(original, "_parmap", False):
        return

    def get_preparation_data(name: str, *args: Any, **kwargs: Any) -> dict:
        data = original(name, *args, **kwargs)
        if getattr(spawning, "active", False):
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    get_preparation_data._parmap = True  # type: ignore[attr-defined]
    spawn.get_preparation_data = get_preparation_data


def ignore_sigint_at_exec() -> None:
    """Make the interpreters that ``start_process`` spawns (and the resource tracker it
    may start) exec with SIGINT ignored, for the few milliseconds of the fork and exec
    only: the whole start also writes the spawned process's data, which waits for the
    new interpreter (150 ms with a large initializer), and a Ctrl-C ignored then is lost.
    Other code's spawns are untouched (the flag is per thread, as in
    ``skip_main_in_workers``)."""
    from multiprocessing import util

    original = util.spawnv_passfds
    if getattr(original, "_parmap", False):
        return

    def spawnv_passfds(path: Any, args: Any, passfds: Any) -> int:
        if not getattr(spawning, "exec_ignoring", False):
            return original(path, args, passfds)
        held_by = signal.signal(signal.SIGINT, signal.SIG_IGN)  # start_process's
        try:
            return original(path, args, passfds)
        finally:
            signal.signal(signal.SIGINT, held_by)

    spawnv_passfds._parmap = True  # type: ignore[attr-defined]
    util.spawnv_passfds = spawnv_passfds
