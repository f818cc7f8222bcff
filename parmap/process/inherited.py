"""In the caller: arrays that workers forked for an earlier call still hold, unchanged.

A cold pool's workers are forked after the first batch's arrays are pinned (``shm``):
they read those arrays where they are, shared copy-on-write with the caller. The next
call on the same pool would place the array in shared memory (an 800 MB copy, and the
workers still hold the old pages: twice the memory). Instead::

    the pinning call ends -> for each pinned array (``note``): its pages, if none is the
                             caller's alone (/proc/self/pagemap: every present page is
                             still shared, none swapped out) and the count of this
                             process's forks
    a later call          -> the same array at the same address, no fork since, and
                             still no page the caller's alone (a write by the caller
                             copies the page: it is then exclusive): the workers are
                             sent the old pin's key (``reusable``), and read their own
                             copy. A worker that lacks it (forked later, or by another
                             pool) asks again, and the array is placed

No fork since the note: a child forked after a write would share the written page,
which would then look unchanged. Workers that exited let their pages become the
caller's alone again: then the array is placed, as before. Not with KSM (merging
identical pages of other processes): a page it merged would look shared.
"""
from __future__ import annotations

import mmap
import os
import threading
import weakref
from typing import Any

from .remap import page_flags

__all__ = ["note", "reusable", "forget"]

#: /proc/self/pagemap bits: present, swapped, exclusively mapped (by this process alone)
_PRESENT, _SWAPPED, _EXCLUSIVE = 1 << 63, 1 << 62, 1 << 56

_forks = [0]  # forks of this process so far
#: id(array) -> (its finalizer, the pin's key, start, end, forks when noted)
_noted: dict[int, tuple[weakref.finalize, str, int, int, int]] = {}
_lock = threading.RLock()  # reentrant: an array's finalizer may run under it


def _span(root: Any) -> tuple[int, int]:
    address = root.__array_interface__["data"][0]
    start = address - address % mmap.PAGESIZE
    return start, -(-(address + root.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE


def note(root: Any, key: str) -> None:
    """The call that pinned ``root`` as ``key`` (its workers forked after) ends."""
    start, end = _span(root)
    if not _all_shared(start, end):
        return
    finalizer = weakref.finalize(root, _drop, id(root), key)
    finalizer.atexit = False
    entry = (finalizer, key, start, end, _forks[0])
    with _lock:
        old = _noted.pop(id(root), None)
        _noted[id(root)] = entry
    if old is not None:
        old[0].detach()


def reusable(root: Any) -> str | None:
    """The key under which the workers hold ``root`` unchanged, or None (see the
    module doc)."""
    with _lock:
        entry = _noted.get(id(root))
    if entry is None:
        return None
    finalizer, key, start, end, forks = entry
    alive = finalizer.peek()
    if alive is None or alive[0] is not root or _span(root) != (start, end) \
            or forks != _forks[0] or not _all_shared(start, end):
        forget(root)
        return None
    return key


def forget(root: Any) -> None:
    with _lock:
        entry = _noted.pop(id(root), None)
    if entry is not None:
        entry[0].detach()


def _drop(key_id: int, key: str) -> None:
    with _lock:
        entry = _noted.get(key_id)
        if entry is not None and entry[1] == key:
            del _noted[key_id]


def _all_shared(start: int, end: int) -> bool:
    import numpy as np  # the caller pinning arrays has it

    flags = page_flags(start, end)
    if flags is None:
        return False
    private = ((flags & np.uint64(_SWAPPED)) != 0) | \
        ((flags & np.uint64(_PRESENT | _EXCLUSIVE)) == np.uint64(_PRESENT | _EXCLUSIVE))
    return not bool(private.any())


def _count_fork() -> None:
    _forks[0] += 1


def _forget_in_child() -> None:
    global _lock
    _lock = threading.RLock()
    for entry in list(_noted.values()):
        entry[0].detach()
    _noted.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_count_fork, after_in_child=_forget_in_child)
