"""On Linux, in the caller: a large array's own pages become its file's pages, and an
array so remapped and unchanged since goes to the next calls without a copy.

Remapping (``copy_and_remap``): the array is written to its file 64 MB at a time, and
each chunk of the file written is mapped over the array's pages
(``mmap(MAP_FIXED | MAP_PRIVATE)``). The array keeps its address and contents; a write
by the caller is copy-on-write and never reaches the file.

Reuse across calls::

    a call ends        -> for each array it remapped, a read-only descriptor of the file
                          is kept (``keep``) before the file is unlinked, as every call's
                          files are; it is closed when the array dies
    a later call       -> the same array, at the same address: if /proc/self/pagemap
                          shows no page of it written since (no page private to the
                          caller, none swapped), the workers map the kept file again
                          through /proc/<caller>/fd/<n> (``reusable``): no copy. Else the
                          descriptor is closed and the array placed anew
    a worker cannot open it (a /proc it may not read), or finds another file there (a
                          descriptor number reused: it checks device and inode):
                          ``shm.NotInherited``, and the batch comes again with the
                          array placed the ordinary way

An 800 MB array cost every call ~0.5 s to write again, and ~0.2 s more to free the
previous call's file; the check reads 1.6 MB of page flags (~7 ms). Memory is unchanged:
the caller's mapping held the file's pages alive already.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import weakref
from typing import Any

__all__ = ["REMAP_MIN_BYTES", "WRITE_CHUNK", "can_remap", "copy_and_remap", "write_all",
           "keep", "reusable", "forget", "disable"]

#: arrays at least this big are remapped in place, if they have a mapping of their own
#: (``_own_mapping``: the pages around them then belong to no other object)
REMAP_MIN_BYTES = 32 * 1024 ** 2
WRITE_CHUNK = 64 * 1024 ** 2
#: /proc/self/pagemap entry bits: page present, swapped, file-backed (or shared)
_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61

_libc: Any = None


def write_all(fd: int, data: memoryview, offset: int) -> None:
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + WRITE_CHUNK], offset + done)


def _mmap_fn() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        _libc = libc
    return _libc.mmap


def can_remap(root: Any) -> bool:
    return (sys.platform.startswith("linux") and root.flags.owndata
            and root.nbytes >= REMAP_MIN_BYTES and os.environ.get("PARMAP_NO_REMAP") is None
            and _own_mapping(root.__array_interface__["data"][0], root.nbytes))


def _own_mapping(address: int, nbytes: int) -> bool:
    """Whether the buffer at ``address`` is a glibc chunk with a mapping of its own (as
    large allocations usually are): 16 bytes into a page, after a size word with the
    IS_MMAPPED bit. A large buffer can also come from the heap, after many small objects
    were freed; its first and last pages then hold other objects, whose writes between
    a chunk's copy and its remap would be lost, and the heap would keep the file mapped
    after the array is freed. Other allocators: no remap (the call holds two copies)."""
    if address % mmap.PAGESIZE != 16:
        return False
    size = ctypes.c_size_t.from_address(address - 8).value  # same page: readable
    return bool(size & 2) and (size & ~7) >= nbytes + 16


def copy_and_remap(fd: int, start: int, end: int) -> None:
    """Copy [start, end) into the file and map the file over it, one chunk at a time, so
    the caller never holds both copies of more than one chunk."""
    map_fixed = 0x10
    mmap_fn = _mmap_fn()
    for offset in range(0, end - start, WRITE_CHUNK):
        length = min(WRITE_CHUNK, end - start - offset)
        chunk = (ctypes.c_char * length).from_address(start + offset)
        write_all(fd, memoryview(chunk), offset)
        got = mmap_fn(start + offset, length, mmap.PROT_READ | mmap.PROT_WRITE,
                      mmap.MAP_PRIVATE | map_fixed, fd, offset)
        if got != start + offset:  # cannot happen with MAP_FIXED; the data is intact
            raise OSError(ctypes.get_errno(), "parmap: mmap(MAP_FIXED) failed")


# ---------------------------------------------------------------------- reuse

#: id(array) -> (its finalizer, which closes the descriptor; descriptor; start; end;
#: the file's (device, inode))
_kept: dict[int, tuple[weakref.finalize, int, int, int, tuple[int, int]]] = {}
#: reentrant: a garbage collection while it is held may run an array's finalizer (_close)
_lock = threading.RLock()
#: cleared once a worker could not map a kept file (a /proc closed to it): from then on
#: every call copies, rather than every call paying a retry first
_enabled = [True]


def keep(root: Any, path: str, start: int, end: int) -> None:
    """``root`` was remapped onto the file at ``path`` over [start, end): keep the file
    open for later calls (see the module doc); the caller unlinks it as usual."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
    except OSError:
        return
    identity = (st.st_dev, st.st_ino)
    if not _mapped_onto(start, end, identity):  # a later call remapped it elsewhere since
        os.close(fd)
        return
    finalizer = weakref.finalize(root, _close, id(root), fd)
    finalizer.atexit = False
    entry = (finalizer, fd, start, end, identity)
    with _lock:
        old = _kept.pop(id(root), None)
        _kept[id(root)] = entry
    if old is not None:
        old[0]()


def reusable(root: Any, start: int, end: int) -> tuple[str, tuple[int, int]] | None:
    """The path through which workers can map ``root``'s file and the file's (device,
    inode), if an earlier call remapped it over [start, end) and none of its pages was
    written since; else None (and the descriptor, if any, is closed)."""
    with _lock:
        entry = _kept.get(id(root))
    if entry is None:
        return None
    finalizer, fd, kept_start, kept_end, identity = entry
    alive = finalizer.peek()
    if not _enabled[0] or alive is None or alive[0] is not root \
            or (kept_start, kept_end) != (start, end) \
            or not _mapped_onto(start, end, identity) or not _unchanged(start, end):
        forget(root)
        return None
    return f"/proc/{os.getpid()}/fd/{fd}", identity


def disable() -> None:
    """A worker could not map a kept file: stop offering them (see ``_enabled``)."""
    _enabled[0] = False


def forget(root: Any) -> None:
    """Close the descriptor kept for ``root``, if any."""
    with _lock:
        entry = _kept.pop(id(root), None)
    if entry is not None:
        entry[0]()


def _close(key: int, fd: int) -> None:
    with _lock:
        entry = _kept.get(key)
        if entry is not None and entry[1] == fd:
            del _kept[key]
    try:
        os.close(fd)
    except OSError:
        pass


def _mapped_onto(start: int, end: int, identity: tuple[int, int]) -> bool:
    """Whether [start, end) is mapped, all of it, onto the file ``identity`` (device,
    inode) at the offset of each address from ``start`` (/proc/self/maps). Another call
    may have remapped the array onto a newer file meanwhile: its pages are file pages
    too, and only this tells the two files apart."""
    dev, ino = identity
    want_dev = f"{os.major(dev):02x}:{os.minor(dev):02x}"
    covered = start
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if high <= covered or low >= end:
                    continue
                if low > covered or fields[3] != want_dev or int(fields[4]) != ino \
                        or int(fields[2], 16) != low - start:
                    return False
                covered = high
                if covered >= end:
                    return True
    except (OSError, ValueError, IndexError):
        return False
    return False


def _unchanged(start: int, end: int) -> bool:
    """Whether no page of [start, end) is private to this process (written since the
    remap, or swapped out, which only private pages are)."""
    import numpy as np  # the caller placing arrays has it

    n_pages = (end - start) // mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            pagemap.seek(start // mmap.PAGESIZE * 8)
            data = b""
            while len(data) < n_pages * 8:
                chunk = pagemap.read(n_pages * 8 - len(data))
                if not chunk:
                    return False
                data += chunk
    except OSError:
        return False
    flags = np.frombuffer(data, dtype=np.uint64)
    changed = ((flags & np.uint64(_SWAPPED)) != 0) | \
        ((flags & np.uint64(_PRESENT | _FILE)) == np.uint64(_PRESENT))
    return not bool(changed.any())


def _forget_in_child() -> None:
    """A forked child (a worker) must not hold the caller's files open: their memory
    would outlive the caller's arrays."""
    global _lock
    _lock = threading.RLock()  # another thread may have held it at the fork
    for finalizer, fd, *_ in list(_kept.values()):
        finalizer.detach()
        try:
            os.close(fd)
        except OSError:
            pass
    _kept.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
