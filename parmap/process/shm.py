"""Large numpy arrays cross to and from worker processes through shared memory files.

Arguments (caller -> workers)::

    array > max_nbytes ──> its root buffer is written once per call to a file in
                           /dev/shm (or the temp folder); workers get
                           (path, offset, dtype, shape, strides) and map the file
    np.memmap          ──> (its own file, offset, ...) at any size: no copy at all

On Linux, a root array that owns a large buffer is then *remapped* (``remap``): the pages
under the caller's array are replaced, in place, by a private mapping of the file just
written (``mmap(MAP_FIXED | MAP_PRIVATE)``), chunk by chunk. The array keeps its address
and contents and stays private to the caller (writes are copy-on-write), but its memory
is now the same physical pages the workers read: one copy of the data in the whole
process tree instead of two. Later calls send it again without a copy while none of its
pages changed.

Results (workers -> caller), in ``shm_results``::

    array > max_nbytes ──> the worker writes it to /dev/shm/parmap_<caller>_w<worker>_<n>
                           and sends the name; the caller maps the file, unlinks it at
                           once, and returns an ordinary ndarray whose memory is released
                           with it. Nothing is pickled, and the caller never copies.

Cleanup, however a call ends: argument files are unlinked when the call ends (normally,
by an exception, Ctrl-C, a crash, a timeout or a closed generator), at interpreter exit
for calls still open, and — for /dev/shm files — by multiprocessing's resource tracker if
the caller is killed. Result files are unlinked as soon as they are mapped; those of a
cancelled batch or a crashed worker are swept by the pool. Folders elsewhere than
/dev/shm left by a killed caller are swept the next time parmap places a file there
(``folders``).
"""
from __future__ import annotations

import atexit
import itertools
import mmap
import os
import shutil
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

from .._shm_files import SHM_DIR, shm_has_room, track
from . import arg_maps, remap
from .folders import choose_folder
from .remap import write_all

__all__ = ["ArgumentPlacer", "NotInherited", "rebuild_array", "rebuild_inherited",
           "byte_view", "dtype_spec", "track", "unlink", "write_all", "shm_has_room",
           "SHM_DIR"]

_counter = itertools.count()
_open_placers: weakref.WeakSet = weakref.WeakSet()


def unlink(path: str, made_here: bool = False) -> None:
    """Remove one of our files; only the call that removed it tells the tracker, or,
    ``made_here``, the only one that removes it (a placer's, which registered its name
    before making it: a Ctrl-C between the two leaves a name of no file to forget)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        if not made_here:
            return  # removed (and unregistered) by whoever removed it
    track(path, register=False)


def byte_view(arr: Any) -> memoryview:
    """The bytes of a C-contiguous array, whatever its dtype (a memoryview of the array
    itself refuses datetimes, and some structured dtypes)."""
    return memoryview(arr.reshape(-1).view("u1"))


def dtype_spec(dtype: Any) -> Any:
    """What travels for ``dtype``: its short string, or the dtype itself where that
    string loses something (a structured dtype's ``.str`` is ``|V12``: no fields)."""
    return dtype if dtype.fields is not None else dtype.str


# ---------------------------------------------------------------------- arguments

#: arrays pinned for workers about to be forked (see ArgumentPlacer.can_inherit): a
#: forked worker finds them in its copy of this dict, at the same address, unchanged
_PINNED: dict[str, Any] = {}


class NotInherited(Exception):
    """Raised in a worker that was not forked after an array was pinned: the caller then
    sends the batch again with the array placed in shared memory."""


class ArgumentPlacer:
    """Places the large arrays of one call; ``close()`` removes every file it made.

    ``can_inherit`` (optional) says whether the workers are about to be forked from this
    process, after the current batch: the pool is cold and forks. The arrays of such a
    batch are not copied at all. They are *pinned*; the forked workers read them where
    they are, shared copy-on-write with the caller, and a worker that was not forked
    after the pin (a replacement, a forkserver) asks for the batch again, which is then
    placed the ordinary way (see ``stop_inheriting``).
    """

    def __init__(self, max_nbytes: int, mmap_mode: str, temp_folder: str | None = None,
                 can_inherit: Any = None):
        self.max_nbytes = max_nbytes
        self.mmap_mode = "r+" if mmap_mode == "w+" else mmap_mode
        self.temp_folder = temp_folder
        self.can_inherit = can_inherit if self.mmap_mode == "r" else None
        self.token = os.urandom(6).hex()
        #: id(root) -> (weak reference to root, path, base address, the file's (device,
        #: inode) when it is an earlier call's, which a worker checks: a descriptor's
        #: number may be reused)
        self._placed: dict[int, tuple] = {}
        #: view's geometry -> (weak reference to its root, C copy)
        self._copies: dict[tuple, tuple] = {}
        self._pins: dict[int, str] = {}  # id(root) -> its key in _PINNED
        self._files: list[str] = []
        #: (weak reference to the array, files, start, parts) of the arrays remapped onto
        #: their files (``remap``)
        self._remapped: list[tuple[Any, list[str], int, list[tuple[int, int]]]] = []
        #: the weak references above whose array died: its files go at the next reduce
        #: or at close. A call whose input makes a new array per task (a stream) kept
        #: every one of them, and its file, until it ended. An array that died is in no
        #: batch still running (a batch holds its tasks, so their arrays, and the arrays
        #: its encoding placed, ``held``, until it is done), and no later task names it.
        self._dead: list[Any] = []
        self.reuse = True  # may an array remapped by an earlier call go without a copy?
        self._folder: str | None = None
        self._lock = threading.Lock()
        self._local = threading.local()  # ``arrays``: see ``held``
        #: set by close (under the lock): a batch sent again after its call ended (a
        #: worker's late RETRY) must not place files that nobody would remove
        self.closed = False
        _open_placers.add(self)

    @contextmanager
    def held(self) -> Iterator[list]:
        """The arrays this thread reduces meanwhile (one batch's encoding), for the one
        who holds the batch until it is done to hold too: an array made only while the
        batch was pickled (an object's ``__reduce__`` that builds one) then outlives its
        file's use (see ``_dead``)."""
        arrays: list = []
        self._local.arrays = arrays
        try:
            yield arrays
        finally:
            self._local.arrays = None

    def reduce(self, arr: Any) -> tuple | None:
        """The pickle reduction of ``arr`` as a file reference, or None to pickle it."""
        import numpy as np

        if arr.dtype.hasobject:
            return None
        memmap_ref = _memmap_reference(arr)
        if memmap_ref is not None:
            path, offset = memmap_ref
        elif arr.nbytes <= self.max_nbytes or arr.nbytes == 0:
            return None
        else:
            held = getattr(self._local, "arrays", None)
            if held is not None:
                held.append(arr)  # (and so its root, their file)
            root = arr
            while isinstance(root.base, np.ndarray):
                root = root.base
            if root.base is not None or not root.flags.c_contiguous:
                # a foreign buffer, or another order: place a C copy of the view, made
                # once per call however many tasks get the array (a contiguous view of a
                # foreign buffer is its own copy, held weakly, as its root is)
                key = (id(root), arr.__array_interface__["data"][0], arr.shape,
                       arr.strides, arr.dtype.str)
                with self._lock:
                    self._release_dead()
                    copy = self._copies.get(key)
                    made = None if copy is None else \
                        copy[1]() if isinstance(copy[1], weakref.ref) else copy[1]
                    if made is None:  # (np.ascontiguousarray would make 0-d 1-d)
                        made = arr if arr.flags.c_contiguous else arr.copy(order="C")
                        self._copies[key] = (weakref.ref(root, self._dead.append),
                                             weakref.ref(made) if made is arr else made)
                if held is not None:
                    held.append(made)  # the copy whose file the batch names
                arr = root = made
            pinned = self._pin(root)
            if pinned is not None:
                offset = (arr.__array_interface__["data"][0]
                          - root.__array_interface__["data"][0])
                return rebuild_inherited, (pinned, offset, dtype_spec(arr.dtype),
                                           arr.shape, arr.strides)
            with self._lock:
                if self.closed:
                    raise RuntimeError("parmap: an array of a call that has ended was to "
                                       "be placed in shared memory (report this as a bug)")
                self._release_dead()
                entry = self._placed.get(id(root))
                if entry is None:
                    entry = self._placed[id(root)] = (weakref.ref(root, self._dead.append),
                                                      *self._place(root))
            path, offset = entry[1], arr.__array_interface__["data"][0] - entry[2]
            if entry[3] is not None:
                return rebuild_array, (path, offset, dtype_spec(arr.dtype), arr.shape,
                                       arr.strides, self.mmap_mode, entry[3])
        return rebuild_array, (path, offset, dtype_spec(arr.dtype), arr.shape, arr.strides,
                               self.mmap_mode)

    def _pin(self, root: Any) -> str | None:
        with self._lock:
            if self.can_inherit is None:
                return None
            key = self._pins.get(id(root))
            if key is None and self.can_inherit():
                key = self._pins[id(root)] = f"{self.token}_{next(_counter)}"
                _PINNED[key] = root
            return key

    def stop_inheriting(self) -> None:
        """From now on place every array: some worker did not inherit the pinned ones, or
        could not open an earlier call's file (``remap.reusable``)."""
        with self._lock:
            self.can_inherit = None
            self.reuse = False
            reused = [key for key, entry in self._placed.items() if entry[3] is not None]
            for key in reused:  # the worker may have failed on this file
                del self._placed[key]
            if reused:
                remap.disable()

    def _place(self, root: Any) -> tuple:
        """Place ``root``: (path, or parts as ((path, size), ...); the address the file
        starts at; the file's identity if it is an earlier call's). Lock held."""
        address = root.__array_interface__["data"][0]
        start = address - address % mmap.PAGESIZE
        end = -(-(address + root.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE
        # not with r+ (w+): the workers write to the file, and the caller's pages,
        # mapped privately onto it, would show some of their writes
        remapping = remap.can_remap(root) and self.mmap_mode != "r+"
        if remapping and self.reuse:
            kept = remap.reusable(root, start, end)
            if kept is not None:  # an earlier call's file, unchanged: no copy
                return kept[0], start, kept[1]
        if remapping:
            remap.forget(root)  # the files it was remapped onto before, if any
            bounds = remap.parts(end - start)
            paths = [self._new_path(end - start) for _ in bounds]  # room for all of it
            remap.copy_and_remap(paths, start, bounds)
            self._remapped.append((weakref.ref(root), paths, start, bounds))
            if len(paths) == 1:
                return paths[0], start, None
            return tuple((p, hi - lo) for p, (lo, hi) in zip(paths, bounds)), start, None
        path = self._new_path(end - start)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, end - start)
            write_all(fd, byte_view(root), address - start)
        finally:
            os.close(fd)
        return path, start, None

    def _release_dead(self) -> None:
        """Forget the arrays that died (``_dead``) and remove their files. Lock held."""
        while self._dead:
            ref = self._dead.pop()
            for geometry in [k for k, (root_ref, _) in self._copies.items() if root_ref is ref]:
                del self._copies[geometry]  # the copy dies: its reference comes here next
            for key in [k for k, entry in self._placed.items() if entry[0] is ref]:
                path, _start, identity = self._placed.pop(key)[1:]
                if identity is None:  # (else an earlier call's file: not this call's)
                    for name in [path] if isinstance(path, str) else [p for p, _ in path]:
                        self._files.remove(name)
                        unlink(name, made_here=True)
            self._remapped = [entry for entry in self._remapped if entry[0]() is not None]

    def _new_path(self, nbytes: int) -> str:
        if self._folder is None or self._folder == SHM_DIR and self.temp_folder is None \
                and not shm_has_room(nbytes):  # room is checked for each file
            self._folder = choose_folder(self.temp_folder, nbytes)
        path = os.path.join(self._folder, f"parmap_{os.getpid()}_{self.token}_{next(_counter)}")
        self._files.append(path)
        track(path, register=True)
        return path

    def close(self) -> None:
        with self._lock:
            self.closed = True
            files, self._files = self._files, []
            remapped, self._remapped = self._remapped, []
            self._placed.clear()
            self._copies.clear()
            self._dead.clear()
            self.can_inherit = None
            for key in self._pins.values():
                _PINNED.pop(key, None)  # the caller's array is the caller's again
            self._pins.clear()
            folder, self._folder = self._folder, None
        for root_ref, paths, start, bounds in remapped:  # before the files are unlinked
            root = root_ref()
            if root is not None:
                remap.keep(root, paths, start, bounds)
        for path in files:
            unlink(path, made_here=True)
        if folder is not None and folder != SHM_DIR:
            shutil.rmtree(folder, ignore_errors=True)
        _open_placers.discard(self)


def _memmap_reference(arr: Any) -> tuple[str, int] | None:
    """(file, offset of arr's first byte) for a view on an np.memmap's file, else None:
    also for a copy-on-write memmap (``mode="c"``: the caller's writes are not in the
    file) and one whose file is gone (a deleted scratch file), which are copied."""
    import numpy as np

    filename = getattr(arr, "filename", None)
    if not isinstance(arr, np.memmap) or filename is None or arr.mode == "c" \
            or not os.path.exists(filename):
        return None
    mm = getattr(arr, "_mmap", None)
    if mm is None:
        return None
    base: Any = arr
    while isinstance(base.base, np.ndarray):
        base = base.base
    # np.memmap maps from the allocation-granularity boundary below its offset
    map_start = base.offset - base.offset % mmap.ALLOCATIONGRANULARITY
    first = base.__array_interface__["data"][0] - (base.offset - map_start)
    return str(filename), map_start + arr.__array_interface__["data"][0] - first


class _InheritedPages:
    """The ``_mmap`` of a memmap over pages inherited through fork: nothing to flush."""

    def flush(self) -> None:
        pass


def _memmap_view(shape: tuple, dtype: str, buffer: Any, offset: int, strides: tuple,
                 mapping: Any, filename: str | None, mode: str) -> Any:
    """An ``np.memmap`` over ``buffer``: what joblib hands its workers, and what code
    written for joblib (scikit-learn among it) checks for. ``mapping`` is the memmap's
    ``_mmap``; numpy keeps the memmap type for slices only while it is set."""
    import numpy as np

    view: Any = np.ndarray.__new__(np.memmap, shape, dtype=np.dtype(dtype), buffer=buffer,
                                   offset=offset, strides=strides)
    view._mmap, view.filename, view.offset, view.mode = mapping, filename, offset, mode
    return view


def rebuild_inherited(key: str, offset: int, dtype: str, shape: tuple, strides: tuple) -> Any:
    """In a worker: a read-only memmap view of a pinned array inherited through fork."""
    root = _PINNED.get(key)
    if root is None:
        raise NotInherited(key)
    import numpy as np

    # over a read-only buffer: with the worker's writable root as its base, a task could
    # turn the view writeable and change the array for every later task of the worker
    frozen = np.frombuffer(memoryview(byte_view(root)).toreadonly(), dtype=np.uint8)
    return _memmap_view(shape, dtype, frozen, offset, strides, _InheritedPages(), None, "r")


def rebuild_array(path: Any, offset: int, dtype: str, shape: tuple, strides: tuple,
                  mode: str, identity: Any = None) -> Any:
    """In a worker: the array, as an ``np.memmap`` view on the mapped file (a read-only
    mapping is kept for the next batches: ``arg_maps``). ``path``: one file, or a
    remapped array's parts as ((path, size), ...), mapped end to end; ``identity``:
    what an earlier call's files must be (``remap.reusable``)."""
    try:
        mm = arg_maps.mapping(path, mode, identity)
    except OSError:
        if identity is not None:  # an earlier call's file (see ``remap``)
            raise NotInherited(str(path)) from None
        raise
    if isinstance(path, str):
        return _memmap_view(shape, dtype, mm, offset, strides, mm, path, mode)
    # parts: no one file holds the array, so the view names none (code that reopens a
    # memmap by its filename and offset, as joblib does, would find part 0's file)
    import numpy as np

    return _memmap_view(shape, dtype, np.frombuffer(mm, np.uint8), offset, strides, mm,
                        None, mode)


@atexit.register
def _close_open_placers() -> None:
    for placer in list(_open_placers):
        placer.close()
