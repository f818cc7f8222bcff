"""In a worker: the mappings of argument files, kept from one batch to the next.

A large array argument reaches a worker as a file to map (``shm.rebuild_array``). Mapped
anew for every batch, it was unmapped again when the batch's arguments were dropped,
just before the reply went out: for a task that read 50 MB of an 800 MB array that
munmap took 4-14 ms, on the path from one batch to the next, every batch. So a
read-only mapping is kept::

    decoding a request   -> each file it names is mapped once (or found here: same
                            device, inode, size and change time), and marked used
    request decoded      -> the mappings it did not use are dropped (an earlier call's)
    waiting for the next -> after IDLE_RELEASE seconds without one, all are dropped: a
                            caller's file is unlinked when its call ends, and its memory
                            is freed only once no worker maps it

Only ``mmap_mode="r"`` mappings are kept: a copy-on-write one (``"c"``) holds what its
tasks wrote, and each batch must start from the file. Dropping a mapping only forgets it
here: it is unmapped when no array of a task or result still uses it. A kept mapping's
pages are resident in the worker; ``recycling.RssProbe`` leaves them (at most
``mapped_bytes()``) out of the worker's own memory.
"""
from __future__ import annotations

import mmap
import os
from typing import Any

from . import remap

__all__ = ["mapping", "keep_only_used", "release", "holding", "mapped_bytes", "IDLE_RELEASE"]

#: seconds a worker waits for its next batch before it drops its argument mappings
IDLE_RELEASE = 0.1

#: path, or parts (see ``mapping``) -> ((device, inode, size, change time) of each file,
#: the mapping)
_kept: dict[Any, tuple[tuple[tuple[int, int, int, int], ...], mmap.mmap]] = {}
_used: set[Any] = set()
_ACCESS = {"r": mmap.ACCESS_READ, "r+": mmap.ACCESS_WRITE, "c": mmap.ACCESS_COPY}


def mapping(files: Any, mode: str, expected: Any = None) -> mmap.mmap:
    """The whole file at ``files`` (a path), or the files of a remapped array's parts
    (((path, size), ...): ``remap.map_parts``), mapped with ``mode`` ("r", "r+" or "c");
    read-only mappings are kept on POSIX (see the module doc; Windows cannot delete a
    mapped file). ``expected``: the (device, inode) of the file, or of each part's,
    checked before it is opened (a reused descriptor number may name a pipe, whose open
    would block), or OSError."""
    paths = [files] if isinstance(files, str) else [path for path, _size in files]
    wanted = [None] * len(paths) if expected is None else \
        [expected] if isinstance(files, str) else list(expected)
    for path, identity in zip(paths, wanted):
        if identity is not None and _identity(os.stat(path))[:2] != tuple(identity):
            raise OSError(f"{path} is not the file the caller sent")
    flags = (os.O_RDWR if mode == "r+" else os.O_RDONLY) | getattr(os, "O_BINARY", 0)
    fds: list[int] = []
    found: list[tuple[int, int, int, int]] = []
    try:
        for path, identity in zip(paths, wanted):
            fds.append(os.open(path, flags))
            found.append(_identity(os.fstat(fds[-1])))
            if identity is not None and found[-1][:2] != tuple(identity):
                raise OSError(f"{path} is not the file the caller sent")
        if mode == "r" and os.name == "posix":
            entry = _kept.get(files)
            if entry is not None and entry[0] == tuple(found):  # the same files as before
                _used.add(files)
                return entry[1]
        if isinstance(files, str):
            made = mmap.mmap(fds[0], 0, access=_ACCESS[mode])
        else:
            made = remap.map_parts(fds, [size for _path, size in files], mode)
    finally:
        for fd in fds:
            os.close(fd)
    if mode == "r" and os.name == "posix":
        _kept[files] = (tuple(found), made)
        _used.add(files)
    return made


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns


def keep_only_used() -> None:
    """A request was decoded: forget the mappings it did not use."""
    for path in [p for p in _kept if p not in _used]:
        del _kept[path]
    _used.clear()


def release() -> None:
    """Forget every kept mapping (the worker is idle, or stopping)."""
    _kept.clear()
    _used.clear()


def holding() -> bool:
    return bool(_kept)


def mapped_bytes() -> int:
    """The size of the kept mappings: at most that much of the worker's resident memory
    is theirs (``recycling.RssProbe``)."""
    return sum(len(mm) for _identity, mm in _kept.values())
