"""Files in ``/dev/shm``: where they go, whether there is room, and their registration
with multiprocessing's resource tracker (which removes them if this process is killed).

A leaf shared by the pool (``process/shm``: arguments and results) and by
``shared_array`` (``_shared``), which ``import parmap`` loads: so only ``os`` and ``sys``
here.
"""
from __future__ import annotations

import os
import sys

__all__ = ["SHM_DIR", "SHM_MARGIN", "track", "shm_has_room"]

SHM_DIR = "/dev/shm"
#: /dev/shm must keep this much room free after a file, or the temp folder is used
SHM_MARGIN = 64 * 1024 ** 2


def track(path: str, register: bool) -> None:
    """(Un)register a /dev/shm file with multiprocessing's resource tracker."""
    if os.path.dirname(path) != SHM_DIR:
        return
    from multiprocessing import resource_tracker  # stdlib; only once a file is made

    name = "/" + os.path.basename(path)
    try:
        if register:
            resource_tracker.register(name, "shared_memory")
        else:
            resource_tracker.unregister(name, "shared_memory")
    except Exception:  # the tracker is a safety net, never a reason to fail
        pass


def shm_has_room(nbytes: int) -> bool:
    """Whether /dev/shm can take ``nbytes`` more and keep ``SHM_MARGIN`` free."""
    if not sys.platform.startswith("linux"):
        return False  # elsewhere POSIX shared memory is not a folder of files
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize >= nbytes + SHM_MARGIN
