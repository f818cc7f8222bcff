"""What parmap changes in multiprocessing, for the processes it starts itself only.

Each change wraps a function of multiprocessing's once, and acts only while the thread
that calls it is inside parmap's own start (``spawning``, a per-thread flag that
``spawn.start_process`` and ``spawn.prestart`` set): processes that other code starts,
from other threads or at other times, are untouched. One process outlives the start
that launched it and serves the whole program: multiprocessing's resource tracker, which
then runs without ``site`` (see ``patch_exec``) for other code too.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

__all__ = ["spawning", "skip_main_in_workers", "patch_exec"]

#: per thread: ``active`` inside parmap's start of a process (or of the forkserver),
#: ``exec_ignoring`` while a Ctrl-C is held there (``patch_exec``)
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


def patch_exec() -> None:
    """Wrap multiprocessing's fork and exec of a new interpreter (``spawnv_passfds``) for
    the starts of parmap's own (installed before the first: ``prestart``,
    ``start_process``). Two changes, each for those starts only:

    * SIGINT ignored for the few milliseconds of the fork and exec of a spawned worker
      (``spawning.exec_ignoring``), which it inherits: it ignores Ctrl-C from birth. Not
      for the whole start, which also writes the spawned process's data and waits for
      the new interpreter (150 ms with a large initializer): a Ctrl-C ignored then is
      lost; ``spawn.start_process`` holds it instead.
    * multiprocessing's resource tracker, when one of these starts launches it (the
      forkserver's and spawn's do), exec'd without ``site`` (``-S``): it runs only
      multiprocessing's own module, which needs nothing from site-packages, and ``site``
      with its ``.pth`` files was most of its start (60 of 75 ms of CPU here, where one
      imports ``certifi``; ~4 ms in a clean venv), on the same cores as the forkserver
      the first workers wait for. With ``-P`` too: the modules ``site`` imported before
      the current directory joined ``sys.path`` are imported after, where a file of
      that directory named like one (``stat.py``) would be run instead. So from Python
      3.11 (``-P``), not in a frozen program (it reads its own command line), nor with
      an executable other than this interpreter (``multiprocessing.set_executable``).

    Other code's spawns are untouched (the flags are per thread, as in
    ``skip_main_in_workers``)."""
    from multiprocessing import util

    original = util.spawnv_passfds
    if getattr(original, "_parmap", False):
        return

    def spawnv_passfds(path: Any, args: Any, passfds: Any) -> int:
        if getattr(spawning, "active", False) and _is_tracker(path, args):
            args = [args[0], "-P", "-S", *args[1:]]
        if not getattr(spawning, "exec_ignoring", False):
            return original(path, args, passfds)
        held_by = signal.signal(signal.SIGINT, signal.SIG_IGN)  # start_process's
        try:
            return original(path, args, passfds)
        finally:
            signal.signal(signal.SIGINT, held_by)

    spawnv_passfds._parmap = True  # type: ignore[attr-defined]
    util.spawnv_passfds = spawnv_passfds


#: the command multiprocessing's resource tracker is started with (3.10 to 3.13)
_TRACKER_COMMAND = "from multiprocessing.resource_tracker import main;"


def _is_tracker(path: Any, args: Any) -> bool:
    """Whether ``args`` start multiprocessing's resource tracker with this interpreter,
    which may go without ``site`` (see ``patch_exec``)."""
    try:
        words = [os.fsdecode(word) for word in args]
        return (sys.version_info >= (3, 11) and len(words) >= 3 and words[-2] == "-c"
                and words[-1].startswith(_TRACKER_COMMAND) and "-S" not in words[1:-2]
                and os.fsdecode(path) == sys.executable
                and not getattr(sys, "frozen", False))
    except (TypeError, ValueError):
        return False
