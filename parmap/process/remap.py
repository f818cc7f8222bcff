"""On Linux, in the caller: a large array's own pages become its file's pages, and an
array so remapped and unchanged since goes to the next calls without a copy.

Remapping (``copy_and_remap``): the array is written to its files 64 MB at a time, and
each chunk written is mapped over the array's pages (``mmap(MAP_FIXED | MAP_PRIVATE)``).
The array keeps its address and contents; a write by the caller is copy-on-write and
never reaches the files. From 64 MB, the array is cut into up to four parts (``parts``),
one file each, written by as many threads (tmpfs writes one file at a time); a worker
maps them end to end in one region (``map_parts``).

Reuse across calls::

    a call ends        -> for each array it remapped, a read-only descriptor of each of
                          its files is kept (``keep``) before the files are unlinked, as
                          every call's files are; they are closed when the array dies
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

__all__ = ["REMAP_MIN_BYTES", "WRITE_CHUNK", "can_remap", "parts", "copy_and_remap",
           "map_parts", "write_all", "keep", "reusable", "forget", "disable"]

#: arrays at least this big are remapped in place, if they have a mapping of their own
#: (``_own_mapping``: the pages around them then belong to no other object)
REMAP_MIN_BYTES = 32 * 1024 ** 2
WRITE_CHUNK = 64 * 1024 ** 2
#: /proc/self/pagemap entry bits: page present, swapped, file-backed (or shared)
_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61
_MAP_FIXED = 0x10  # not in the mmap module

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


def parts(nbytes: int, cpus: int | None = None) -> list[tuple[int, int]]:
    """How a remapped array's [0, nbytes) is cut into files written side by side: tmpfs
    writes one file at a time (the inode's lock), so 800 MB took ~0.5 s as one file and
    ~0.28 s as two, written by two threads. Up to 4 parts of at least REMAP_MIN_BYTES,
    page-aligned, one per CPU."""
    count = max(1, min(4, cpus or os.cpu_count() or 1, nbytes // REMAP_MIN_BYTES))
    cut = [nbytes * i // count // mmap.PAGESIZE * mmap.PAGESIZE for i in range(count)]
    return list(zip(cut, cut[1:] + [nbytes]))


def copy_and_remap(paths: list[str], start: int, bounds: list[tuple[int, int]]) -> None:
    """Create each file of ``paths``, copy its part of the memory at ``start`` into it
    and map it over that memory, one chunk at a time (the caller never holds both copies
    of more than a chunk per part); the parts side by side, on threads."""
    errors: list[BaseException] = []

    def one(path: str, lo: int, hi: int, done: threading.Event | None = None) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, hi - lo)
                _copy_and_remap(fd, start + lo, start + hi)
            finally:
                os.close(fd)
        except BaseException as exc:
            errors.append(exc)
        finally:
            if done is not None:
                done.set()

    dones = [threading.Event() for _ in paths[1:]]
    for path, (lo, hi), done in zip(paths[1:], bounds[1:], dones):
        threading.Thread(target=one, args=(path, lo, hi, done), name="parmap-copy",
                         daemon=True).start()
    interrupted: BaseException | None = None
    try:
        one(paths[0], *bounds[0])
    finally:
        # never return while a helper may still mmap(MAP_FIXED) over the caller's memory
        # (freed after a Ctrl-C, and perhaps another array's by then); not Thread.join:
        # interrupted, it may mark a thread that still runs as stopped (Python 3.11)
        for done in dones:
            while not done.is_set():
                try:
                    done.wait()
                except BaseException as exc:
                    interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted
    if errors:
        raise errors[0]


def _copy_and_remap(fd: int, start: int, end: int) -> None:
    mmap_fn = _mmap_fn()
    for offset in range(0, end - start, WRITE_CHUNK):
        length = min(WRITE_CHUNK, end - start - offset)
        chunk = (ctypes.c_char * length).from_address(start + offset)
        write_all(fd, memoryview(chunk), offset)
        got = mmap_fn(start + offset, length, mmap.PROT_READ | mmap.PROT_WRITE,
                      mmap.MAP_PRIVATE | _MAP_FIXED, fd, offset)
        if got != start + offset:  # cannot happen with MAP_FIXED; the data is intact
            raise OSError(ctypes.get_errno(), "parmap: mmap(MAP_FIXED) failed")


def map_parts(fds: list[int], sizes: list[int], mode: str) -> mmap.mmap:
    """In a worker: the files of a remapped array's parts, mapped end to end in one
    region (an anonymous mapping's, whose object unmaps it all when it goes)."""
    import numpy as np  # a worker rebuilding arrays has it

    # read-only for "r": no view of it can be made writeable (the pages are PROT_READ)
    region = mmap.mmap(-1, sum(sizes),
                       access=mmap.ACCESS_READ if mode == "r" else mmap.ACCESS_WRITE)
    base = np.frombuffer(region, np.uint8, count=1).__array_interface__["data"][0]
    prot = mmap.PROT_READ | (0 if mode == "r" else mmap.PROT_WRITE)
    flags = (mmap.MAP_PRIVATE if mode == "c" else mmap.MAP_SHARED) | _MAP_FIXED
    mmap_fn = _mmap_fn()
    offset = 0
    for fd, size in zip(fds, sizes):
        if mmap_fn(base + offset, size, prot, flags, fd, 0) != base + offset:
            region.close()
            raise OSError(ctypes.get_errno(), "parmap: mmap(MAP_FIXED) failed")
        offset += size
    return region


# ---------------------------------------------------------------------- reuse

#: a part of a remapped array: (first address, end address, its file's (device, inode))
_Part = tuple[int, int, tuple[int, int]]
#: id(array) -> (its finalizer, which closes the descriptors; descriptors; the parts)
_kept: dict[int, tuple[weakref.finalize, tuple[int, ...], tuple[_Part, ...]]] = {}
#: reentrant: a garbage collection while it is held may run an array's finalizer (_close)
_lock = threading.RLock()
#: cleared once a worker could not map a kept file (a /proc closed to it): from then on
#: every call copies, rather than every call paying a retry first
_enabled = [True]


def keep(root: Any, paths: list[str], start: int, bounds: list[tuple[int, int]]) -> None:
    """``root`` was remapped onto the files ``paths``, each over its ``bounds`` from
    ``start``: keep them open for later calls (see the module doc); the caller unlinks
    them as usual."""
    fds: list[int] = []
    parts: list[_Part] = []
    try:
        for path, (lo, hi) in zip(paths, bounds):
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            st = os.fstat(fds[-1])
            parts.append((start + lo, start + hi, (st.st_dev, st.st_ino)))
    except OSError:
        parts = []
    if not parts or not _mapped_onto(parts):  # a later call remapped it elsewhere since
        _close_all(fds)
        return
    finalizer = weakref.finalize(root, _close, id(root), tuple(fds))
    finalizer.atexit = False
    entry = (finalizer, tuple(fds), tuple(parts))
    with _lock:
        old = _kept.pop(id(root), None)
        _kept[id(root)] = entry
    if old is not None:
        old[0]()


def reusable(root: Any, start: int, end: int) -> tuple[Any, Any] | None:
    """What workers map for ``root`` and what they check it is, if an earlier call
    remapped it over [start, end) and none of its pages was written since: one file's
    path and (device, inode), or for several parts a tuple of (path, size) and one of
    (device, inode). Else None (and the descriptors, if any, are closed)."""
    with _lock:
        entry = _kept.get(id(root))
    if entry is None:
        return None
    finalizer, fds, parts = entry
    alive = finalizer.peek()
    if not _enabled[0] or alive is None or alive[0] is not root \
            or (parts[0][0], parts[-1][1]) != (start, end) \
            or not _mapped_onto(parts) or not _unchanged(start, end):
        forget(root)
        return None
    paths = [f"/proc/{os.getpid()}/fd/{fd}" for fd in fds]
    if len(parts) == 1:
        return paths[0], parts[0][2]
    return (tuple((path, hi - lo) for path, (lo, hi, _) in zip(paths, parts)),
            tuple(identity for _, _, identity in parts))


def disable() -> None:
    """A worker could not map a kept file: stop offering them (see ``_enabled``)."""
    _enabled[0] = False


def forget(root: Any) -> None:
    """Close the descriptors kept for ``root``, if any."""
    with _lock:
        entry = _kept.pop(id(root), None)
    if entry is not None:
        entry[0]()


def _close(key: int, fds: tuple[int, ...]) -> None:
    with _lock:
        entry = _kept.get(key)
        if entry is not None and entry[1] == fds:
            del _kept[key]
    _close_all(fds)


def _close_all(fds: Any) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _mapped_onto(parts: Any) -> bool:
    """Whether each part's addresses are mapped, all of them, onto its file (device,
    inode) at their offset from the part's start (/proc/self/maps). Another call may
    have remapped the array onto newer files meanwhile: their pages are file pages too,
    and only this tells the files apart."""
    try:
        with open("/proc/self/maps") as maps:
            lines = [line.split(maxsplit=5) for line in maps]
        ranges = [(*(int(x, 16) for x in f[0].split("-")), int(f[2], 16), f[3], int(f[4]))
                  for f in lines]
    except (OSError, ValueError, IndexError):
        return False
    for start, end, (dev, ino) in parts:
        want_dev = f"{os.major(dev):02x}:{os.minor(dev):02x}"
        covered = start
        for low, high, offset, device, inode in ranges:
            if high <= covered or low >= end:
                continue
            if low > covered or device != want_dev or inode != ino or offset != low - start:
                return False
            covered = high
            if covered >= end:
                break
        if covered < end:
            return False
    return True


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
    for finalizer, fds, *_ in list(_kept.values()):
        finalizer.detach()
        _close_all(fds)
    _kept.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
