"""``shared_array``: a numpy array that lives in shared memory from the start.

An ordinary array argument above ``max_nbytes`` is copied into shared memory once per
call when the workers cannot inherit it (they already run, or come from the forkserver
because the caller has threads): about 0.5 s for 800 MB on a small VM, most of it the
kernel handing out fresh pages. An array made by :func:`shared_array` is an ``np.memmap``
over a file in ``/dev/shm`` already; the process backend sends workers a reference to
that file (as for any ``np.memmap``), so nothing is copied, whatever the start method.

The file is removed when the array (and every view of it) is garbage collected, at
interpreter exit, and by multiprocessing's resource tracker if the process is killed.
numpy is imported on the first call only: ``import parmap`` stays light.
"""
from __future__ import annotations

import itertools
import math
import operator
import os
import sys
import weakref
from typing import Any, cast

from ._public import public
from ._shm_files import SHM_DIR, shm_has_room, track

__all__ = ["shared_array"]

_counter = itertools.count()


@public
def shared_array(shape: int | tuple[int, ...] | list[int], dtype: Any = "float64") -> Any:
    """A new zero-filled, writable array of ``shape`` and ``dtype`` in shared memory.

    Fill it as any numpy array (``arr[:] = data``, or compute into it); pass it to
    tasks of the process backend and every worker maps the same memory: no copy at any
    size, with any start method. Workers get read-only views with the default
    ``mmap_mode="r"``, writable ones with ``mmap_mode="r+"`` (tasks writing their share
    of one output array). The result is an ``np.memmap``; its file (in ``/dev/shm``, or
    in the temp folder when ``/dev/shm`` lacks room) is removed with the array.
    """
    import numpy as np  # third party, ~0.1 s: only for those who call this

    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise TypeError(f"shared_array(dtype=...): {dtype} holds Python objects, which "
                        f"cannot live in shared memory; use a numeric or fixed-size dtype")
    try:
        dims = tuple(operator.index(n) for n in shape) if isinstance(shape, (tuple, list)) \
            else (operator.index(shape),)
    except TypeError:
        raise TypeError(f"shared_array(shape=...): expected an int or a tuple of ints, got "
                        f"{shape!r:.60}") from None
    if any(n < 0 for n in dims):
        raise ValueError(f"shared_array(shape=...): negative dimensions in {dims}")
    nbytes = math.prod(dims) * dtype.itemsize
    if nbytes > sys.maxsize:
        raise ValueError(f"shared_array(shape=...): so many elements of {dtype} take more "
                         f"bytes than a file can hold (sys.maxsize)")
    path = _new_file(max(nbytes, 1))  # mmap cannot map an empty file
    owner = os.getpid()
    try:
        arr = np.memmap(path, dtype=dtype, mode="r+", shape=dims)
    except BaseException:
        _remove(path, owner)
        raise
    weakref.finalize(cast(Any, arr)._mmap, _remove, path, owner)  # (not in numpy's types)
    return arr


def _new_file(nbytes: int) -> str:
    name = f"parmap_{os.getpid()}_shared_{os.urandom(4).hex()}_{next(_counter)}"
    folder = SHM_DIR if shm_has_room(nbytes) else _temp_dir()
    path = os.path.join(folder, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    track(path, register=True)
    return path


def _temp_dir() -> str:
    import tempfile  # stdlib; only when /dev/shm lacks room

    return tempfile.gettempdir()


def _remove(path: str, owner: int) -> None:
    """The array is gone: remove its file (only in the process that made it: a forked
    child holds a copy of the finalizer, and must not remove the parent's file)."""
    if os.getpid() != owner:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    track(path, register=False)
