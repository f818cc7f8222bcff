"""Large result arrays travel from workers to the caller through /dev/shm files.

::

    task returns an array > max_nbytes
        └─> the worker writes it to /dev/shm/parmap_<caller>_w<worker>_<n> as the task
            returns (``early_placement``), and the reply carries the file's name
    caller: ``rebuild_result`` maps the file, unlinks it at once, and returns an ordinary
            ndarray whose memory is released with it. Nothing is pickled, nothing copied.

Files of a batch that failed, was cancelled, or whose worker crashed are unlinked by the
worker (failure) or swept by the pool (``sweep_worker_results``). Only workers that share
the caller's resource tracker place results, so a killed caller's files are cleaned too.

``<caller>`` is the caller's pid and a random tag (``caller_tag``): /dev/shm may be
shared by processes of other PID namespaces (containers run with ``--ipc=host``, those
of a Kubernetes pod), where the same pids name other callers and workers, whose files
must neither collide with ours nor be swept by us.
"""
from __future__ import annotations

import itertools
import mmap
import os
from typing import Any

from .shm import SHM_DIR, byte_view, dtype_spec, shm_has_room, track, unlink, write_all

__all__ = ["ResultPlacer", "caller_tag", "early_placement", "rebuild_result",
           "sweep_worker_results", "discard_results"]

_counter = itertools.count()
_tags: dict[int, str] = {}  # pid -> its tag (a forked child has a pid, so a tag, of its own)
if hasattr(os, "register_at_fork"):  # (a child whose pid an ancestor had must not reuse
    os.register_at_fork(after_in_child=_tags.clear)  # that ancestor's tag)


def caller_tag() -> str:
    """``<pid>_<random>``, this process's part of its workers' result file names. The
    first of two threads asking at once sets it for both (``setdefault`` is atomic)."""
    pid = os.getpid()
    tag = _tags.get(pid)
    if tag is None:
        tag = _tags.setdefault(pid, f"{pid}_{os.urandom(4).hex()}")
    return tag


class ResultPlacer:
    """In a worker: puts large result arrays in /dev/shm files for the caller to map."""

    def __init__(self, max_nbytes: int, caller: str):
        self.max_nbytes = max_nbytes
        self.prefix = os.path.join(SHM_DIR, f"parmap_{caller}_w{os.getpid()}_")
        self.created: list[str] = []

    def reduce(self, arr: Any) -> tuple | None:
        import numpy as np

        if (arr.dtype.hasobject or arr.nbytes <= self.max_nbytes
                or not shm_has_room(arr.nbytes)):
            if isinstance(arr, np.memmap):  # a slice of a task's argument (a view on its
                # file): a plain, writeable ndarray, as every other result, not a memmap
                # of no file
                return np.array(arr, subok=False).__reduce_ex__(5)  # type: ignore[return-value]
            return None
        # (np.ascontiguousarray would make a 0-d array 1-d)
        data: Any = arr if arr.flags.c_contiguous else arr.copy(order="C")
        path = f"{self.prefix}{next(_counter)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.created.append(path)
        track(path, register=True)
        try:
            os.ftruncate(fd, data.nbytes)
            write_all(fd, byte_view(data), 0)
        except OSError:  # /dev/shm filled up meanwhile (other workers' results): pickle it
            self.created.remove(path)
            unlink(path)
            return None
        finally:
            os.close(fd)
        return rebuild_result, (path, dtype_spec(data.dtype), data.shape)


class _Placed:
    """A result array already written to its file: pickles as the file's reference."""

    __slots__ = ("reduced",)

    def __init__(self, reduced: tuple):
        self.reduced = reduced

    def __reduce__(self) -> tuple:
        return self.reduced


def early_placement(placer: ResultPlacer, limit: int) -> Any:
    """A ``Batch.transform`` that writes each large result array to its file as soon as
    its task returns, so that a worker never holds a batch of them twice (the array and
    its copy in /dev/shm) while the batch runs."""
    import numpy as np

    ndarray = np.ndarray

    def place(result: Any) -> Any:
        if type(result) is ndarray and result.nbytes > limit:
            reduced = placer.reduce(result)
            if reduced is not None:
                return _Placed(reduced)
        return result

    return place


def rebuild_result(path: str, dtype: str, shape: tuple) -> Any:
    """In the caller: map a worker's result file, unlink it, return a plain ndarray."""
    import numpy as np

    try:
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_WRITE) if size else b""
    finally:
        unlink(path)
    if not size:
        return np.empty(shape, dtype=np.dtype(dtype))
    return np.ndarray(shape, dtype=np.dtype(dtype), buffer=mm)


def sweep_worker_results(worker_pid: int) -> None:
    """Remove result files a dead worker of ours had not handed over."""
    prefix = f"parmap_{caller_tag()}_w{worker_pid}_"
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return
    for entry in entries:
        if entry.startswith(prefix):
            path = os.path.join(SHM_DIR, entry)
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue  # removed (and unregistered) by whoever removed it
            # the worker may have been killed between creating the file and registering
            # it: register it here too (a second registration changes nothing), so that
            # the tracker knows the name it is told to forget (else it prints a KeyError)
            track(path, register=True)
            track(path, register=False)


def discard_results(paths: list) -> None:
    for path in paths:
        unlink(path)
