"""Where a call's argument files go when they do not go to /dev/shm, and the sweep of
folders that killed callers left behind.

A call that places arrays in the temp folder (``temp_folder``, ``$PARMAP_TEMP_FOLDER``,
or the system's when /dev/shm has no room) makes a private folder there, removed when
the call ends. A caller killed with SIGKILL cannot remove it, so the next call that makes
a folder in the same place removes those whose owner is gone.

"Gone" is asked of this machine's processes, in this PID namespace: a folder's name says
which caller made it, ``parmap_<pid>_<origin>_<random>``, where the origin stands for the
host name and the PID namespace. Only folders of our origin are swept. A temp folder on a
file system other machines or containers share (NFS, a volume mounted in several
containers) holds folders whose pid means nothing here: they are left to their owners.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import zlib

from .._shm_files import SHM_DIR, shm_has_room
from .lifetime import pid_alive

__all__ = ["choose_folder", "origin"]

_origin: str | None = None


def origin() -> str:
    """Eight hex digits standing for this host and PID namespace (the same in every
    process of both)."""
    global _origin
    if _origin is None:
        try:
            namespace = os.readlink("/proc/self/ns/pid")
        except OSError:  # not Linux, or no /proc: the host alone
            namespace = ""
        # (crc32: zlib is loaded by then, where hashlib would cost the cold start ~6 ms)
        seed = f"{socket.gethostname()}\0{namespace}".encode()
        _origin = f"{zlib.crc32(seed):08x}"
    return _origin


def choose_folder(temp_folder: str | None, nbytes: int) -> str:
    """Where a call's files go: ``temp_folder`` (the setting, which $PARMAP_TEMP_FOLDER
    sets too), /dev/shm if it has room, else the system temp dir. Returns /dev/shm
    itself, or a fresh 0700 folder."""
    base = temp_folder
    if base is None:
        if shm_has_room(nbytes):
            return SHM_DIR
        base = tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    _sweep_stale_folders(base)
    return tempfile.mkdtemp(prefix=f"parmap_{os.getpid()}_{origin()}_", dir=base)


def _sweep_stale_folders(base: str) -> None:
    """Remove the folders of our origin whose owner process no longer exists."""
    try:
        entries = os.listdir(base)
    except OSError:
        return
    mine = origin()
    for entry in entries:
        parts = entry.split("_")
        if len(parts) >= 4 and parts[0] == "parmap" and parts[1].isdigit() and \
                parts[2] == mine and not pid_alive(int(parts[1])):
            shutil.rmtree(os.path.join(base, entry), ignore_errors=True)
