"""Starting worker processes: the start method, thread caps, and the process itself.

Start method: ``fork`` when the caller is the main thread and no other Python thread
exists (no lock can be held by a thread that does not exist, so fork is safe and costs
~10 ms), and GNU OpenMP has no thread pool here (it hangs a forked child, unless the
child caps it to one thread: then it is forked and capped); otherwise ``forkserver`` (POSIX) or ``spawn``. The forkserver preloads
``parmap.process.worker`` (and numpy, if the caller has imported it), so its children
start in milliseconds once it runs; it is started as soon as a call configures its pool
(:func:`prestart`), so that its own start overlaps the caller's work. Threads that C
libraries start (OpenBLAS) are not visible to Python; they manage fork themselves with
``pthread_atfork``. ``start_method=`` or ``PARMAP_START_METHOD`` override the choice.
"""
from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import warnings
import weakref
from contextlib import nullcontext
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from .._errors import PoolError
from . import worker
from .byvalue import token_main_caches
from .lifetime import hand_over_ctrl_c
from .mp_patches import patch_exec, skip_main_in_workers, spawning
from .protocol import STATUS_SLOTS
from .shm_results import caller_tag

__all__ = ["THREAD_CAP_VARS", "choose_start_method", "start_worker", "exit_description",
           "prestart", "start_process", "setup_bytes", "thread_caps", "forkserver_context",
           "keep_from_forks", "hand", "handed", "pool_pipe", "start_lock",
           "start_failed"]

THREAD_CAP_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                   "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
                   "NUMBA_NUM_THREADS")


def choose_start_method(requested: str | None = None, openmp_threads: int | None = None
                        ) -> str:
    """The start method for a worker; ``openmp_threads`` is the OpenMP thread count it
    will get (1: a forked child may keep a caller's GNU OpenMP, capped to one thread)."""
    method = requested or os.environ.get("PARMAP_START_METHOD") or "auto"
    available = mp.get_all_start_methods()
    if method != "auto":
        if method not in available:
            where = "start_method" if requested else "the PARMAP_START_METHOD variable"
            raise ValueError(f"{where} must be 'auto' or one of {available}, got "
                             f"{method!r}")
        return method
    if (sys.platform.startswith("linux") and threading.active_count() == 1
            and threading.current_thread() is threading.main_thread()
            and (openmp_threads == 1 or not _openmp_pool_running())):
        return "fork"
    if "forkserver" in available and sys.platform != "darwin":
        return "forkserver"
    return "spawn"


_gomp_seen = [False, -1]  # libgomp found loaded; len(sys.modules) when last looked


def _openmp_pool_running() -> bool:
    """Whether GNU OpenMP (libgomp) may have a thread pool in this process: a forked
    child would hang at its first parallel region (the pool's threads do not exist
    there and libgomp has no fork handler). Seen with scikit-learn's vendored libgomp
    after any OpenMP estimator ran. Native threads beyond Python's are the cheap first
    test (~15 us); the memory map is read only when the set of imported modules changed
    (libraries arrive with extension modules), and a found libgomp is remembered."""
    try:
        if len(os.listdir("/proc/self/task")) <= threading.active_count():
            return False
        if not _gomp_seen[0] and _gomp_seen[1] != len(sys.modules):
            _gomp_seen[1] = len(sys.modules)
            with open("/proc/self/maps", "rb") as maps:
                _gomp_seen[0] = b"/libgomp" in maps.read()
    except OSError:
        return False
    return bool(_gomp_seen[0])



# ------------------------------------------------------- what a forked process keeps
# A forked child inherits every descriptor of its parent. One that belongs to a pool
# keeps that pool's pipes open where they should close: a dead worker's task pipe, still
# open for reading in another process, blocks the pool's next write to it instead of
# failing it (a call that never ends), and a zygote lives on while a copy of its socket
# does. So every process forked from this one, by any thread and by any code, closes
# them at once (``os.register_at_fork``): the pools' own ends, registered for their life
# (``keep_from_forks``), and the ends a thread hands to the process it is starting
# (``hand``), but those handed to itself. Each is known by its file (device, inode)
# too: another thread may have closed it just before the fork (the descriptor is gone,
# or already reused for something else, while the object still names it), and then the
# child leaves that descriptor alone. A pipe is made and registered under
# ``start_lock``, which parmap's own forks take: they never copy an end not registered
# yet (a fork by other code, at that very moment, can).

#: the pools' ends of their pipes and sockets (wake pipes, workers' pipes, zygotes) ->
#: their file
_pool_ends: weakref.WeakKeyDictionary[Any, tuple[int, int]] = weakref.WeakKeyDictionary()
#: thread id -> the ends it is handing to the process it starts, with their files
_handing: dict[int, list[tuple[Any, tuple[int, int]]]] = {}
#: in a forked child: ends that were closed in the parent as it forked, kept referenced
#: (a collected connection closes the descriptor number it names)
_stale: list[Any] = []
#: held to make and register a pool's pipes, and through the start of a worker forked
#: or spawned from here (multiprocessing's own pipes for the new process, its
#: sentinel's, are here meanwhile); a forkserver's or a zygote's answer may take long
#: (one stopped): they are waited for without it
start_lock = threading.Lock()


def _fd(end: Any) -> int:
    return end if isinstance(end, int) else end.fileno()


def _file(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


#: whether processes fork here (POSIX); on Windows a connection holds a handle, no fd
_FORKS = hasattr(os, "register_at_fork")


def keep_from_forks(*ends: Any) -> None:
    """``ends`` (connections, sockets) are a pool's: no forked process keeps them."""
    for end in ends if _FORKS else ():
        _pool_ends[end] = _file(_fd(end))


def hand(*ends: Any) -> None:
    """This thread hands ``ends`` (connections, sockets, descriptors) to a process it
    starts: a process that another thread forks until :func:`handed` closes them."""
    _handing[threading.get_ident()] = [(end, _file(_fd(end))) for end in ends] \
        if _FORKS else []


def handed() -> None:
    """The ends this thread handed are closed here (the process started, or failed to)."""
    _handing.pop(threading.get_ident(), None)


def pool_pipe() -> tuple[Connection, Connection]:
    """A pipe whose two ends stay a pool's (its wake pipe): no forked process keeps them."""
    with start_lock:
        read, write = mp.Pipe(duplex=False)
        keep_from_forks(read, write)
    return read, write


def _close_in_forked_child() -> None:
    own = _handing.pop(threading.get_ident(), [])  # the forking thread's own start
    kept = {_fd(end) for end, _ in own}
    for end, file in [*_pool_ends.items(), *(pair for ends in _handing.values()
                                             for pair in ends)]:
        try:
            fd = _fd(end)
            stale = fd in kept or fd < 0 or _file(fd) != file
        except OSError:  # a connection closed meanwhile
            stale = True
        if stale:  # closed by another thread before the fork (its number maybe reused):
            _stale.append(end)  # its object must never close that number here
        else:
            os.close(fd) if isinstance(end, int) else end.close()
    _pool_ends.clear()
    _handing.clear()
    if start_lock.locked():  # held by a thread that does not exist here
        start_lock.release()


if _FORKS:
    os.register_at_fork(after_in_child=_close_in_forked_child)


def exit_description(exitcode: int | None) -> str:
    if exitcode is None:
        return "an unknown status"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name} (exit code {exitcode})"
        except ValueError:
            return f"signal {-exitcode} (exit code {exitcode})"
    return f"exit code {exitcode}"


def start_failed(exc: OSError) -> PoolError:
    """The error of calls that need a worker the system would not start."""
    return PoolError(
        f"parmap could not start a worker process ({type(exc).__name__}: {exc}). The "
        f"system's limit on processes or open files may be reached (see `ulimit -u` and "
        f"`ulimit -n`, or a container's process limit): use fewer workers (n_jobs), close "
        f"what holds files, or raise the limit. The next call tries again.")


def _preload(cloudpickle: bool = False) -> list[str]:
    """What the forkserver imports once for all its children: the worker module, the
    two multiprocessing modules every child needs (12 -> 5 ms of a child's start), numpy
    when the caller uses it (its arrays, arguments or results, need it in every worker:
    ~0.1 s per worker otherwise, paid after the worker starts), and cloudpickle when
    asked (see :func:`prestart`)."""
    return ["parmap.process.worker", "multiprocessing.sharedctypes",
            "multiprocessing.popen_forkserver"] + (
        ["numpy"] if "numpy" in sys.modules else []) + (["cloudpickle"] if cloudpickle else [])


def forkserver_context(cloudpickle: bool = False) -> Any:
    """multiprocessing's forkserver context, with parmap's preload (see :func:`prestart`)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_preload(cloudpickle))
    return ctx


def prestart(start_method: str | None, cloudpickle: bool = False) -> None:
    """Start the forkserver now if the workers will come from it, without waiting for it.

    It takes a fresh interpreter and the preload (100-200 ms); started when a call
    configures its pool rather than when its first batch is ready, that start-up overlaps
    the caller's own work (reading and pickling tasks, copying large arrays into shared
    memory). ``forkserver.ensure_running`` only launches the process and returns.

    ``cloudpickle``: the server imports cloudpickle too, for pools whose workers come
    again and again (recycling) or unpickle an initializer. Classes of a script or a
    notebook, and lambdas and closures of modules, arrive through cloudpickle, and
    unpickling them imports it: ~25 ms of CPU in each new worker, which made the pause
    at each recycling switch ~35 ms instead of ~4. Other pools leave it out: their
    workers start once, and importable functions and those of ``__main__`` (``byvalue``)
    never need it (the server would start ~25 ms later).
    Whichever pool starts the server decides, for the life of the process.
    """
    if choose_start_method(start_method) != "forkserver":
        return
    forkserver_context(cloudpickle)
    from multiprocessing import forkserver

    skip_main_in_workers()
    patch_exec()  # (its resource tracker starts without site)
    spawning.active = True  # the server must not import __main__ either
    try:
        forkserver.ensure_running()
    finally:
        spawning.active = False


def thread_caps(pool_size: int, cpus: int, inner_max_num_threads: int | None
                ) -> dict[str, str]:
    """The thread-pool variables of a worker: its share of the CPUs. The caller's own
    values win, unless ``inner_max_num_threads`` is given (as in joblib)."""
    caps = str(inner_max_num_threads or max(cpus // pool_size, 1))
    return {var: os.environ[var] if var in os.environ and not inner_max_num_threads else caps
            for var in THREAD_CAP_VARS}


def start_worker(start_method: str | None, pool_size: int, cpus: int,
                 inner_max_num_threads: int | None, initializer: bytes | None,
                 wid: int = 0, finalizer: bytes | None = None,
                 cloudpickle: bool = False, steady_thread: bool = False
                 ) -> tuple[BaseProcess, Connection, Connection, Any]:
    """Start one worker process; return (process, task pipe end, result pipe end, status).

    A forked worker keeps none of the pools' pipe ends, its own pool's included (see
    ``keep_from_forks``): it holds only its own two. ``wid`` is the worker's id
    (``parmap.worker_id()``), ``finalizer`` cloudpickle bytes it runs when it stops;
    ``cloudpickle`` as for :func:`prestart`. ``cpus``: the CPU count, which the pool
    reads once (the cgroup quota is ~0.7 ms to read, again for every recycled worker).
    ``steady_thread``: the calling thread lives as long as the pool (one of the pool's
    own); a worker forked or spawned by another thread than that or the main thread
    does without the death signal (see ``lifetime``).
    """
    env = thread_caps(pool_size, cpus, inner_max_num_threads)
    one_thread = env["OMP_NUM_THREADS"] == "1"
    method = choose_start_method(start_method, 1 if one_thread else None)
    ctx: Any = mp.get_context(method)  # a context of any start method
    if method == "forkserver":
        ctx = forkserver_context(cloudpickle)
    elif method == "fork" and "numpy" in sys.modules and os.name == "posix":
        # workers must share our resource tracker to send arrays through /dev/shm
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    # (task index, start time) for timeouts; RSS; messages read (protocol.STATUS_SLOTS).
    # A forked child inherits an anonymous shared mapping; other children get a
    # RawArray, which pickles (sharedctypes and ctypes cost the caller ~4 ms of imports,
    # and each array ~0.5 ms)
    status = memoryview(mmap.mmap(-1, 8 * STATUS_SLOTS)).cast("d") if method == "fork" \
        else ctx.RawArray("d", STATUS_SLOTS)
    if method == "fork":  # the worker will know the script's caches it inherits
        token_main_caches()
    # a forked child keeps a GNU OpenMP pool's state but not its threads: it must be
    # capped to one thread by a call (its variable is read only when libgomp loads)
    cap_openmp = method == "fork" and one_thread and _openmp_pool_running()
    # a forkserver's child has the environment of the server's start: give it the
    # caller's current one, as fork and spawn do (thread caps on top)
    environ = None if method == "fork" else {**os.environ, **env}
    setup = setup_bytes(environ or env, initializer, cap_openmp, wid, finalizer,
                        environ is not None)
    death_signal = method == "forkserver" or steady_thread or \
        threading.current_thread() is threading.main_thread()
    with start_lock:
        task_r, task_w = ctx.Pipe(duplex=False)
        result_r, result_w = ctx.Pipe(duplex=False)
        keep_from_forks(task_w, result_r)
        hand(task_r, result_w)
    try:
        with start_lock if method != "forkserver" else nullcontext():
            process = start_process(ctx, worker.worker_main, "parmap-worker", (
                task_r, result_w, status, os.getpid(), setup, None, death_signal))
    finally:
        task_r.close()
        result_w.close()
        handed()
    return process, task_w, result_r, status


def setup_bytes(environ: dict[str, str], initializer: bytes | None, cap_openmp: bool,
                wid: int, finalizer: bytes | None, whole: bool) -> bytes:
    """A worker's set-up, as ``worker.worker_main`` reads it."""
    return pickle.dumps((environ, initializer, cap_openmp, (wid, finalizer), whole,
                         caller_tag()))


def start_process(ctx: Any, target: Any, name: str, args: tuple) -> BaseProcess:
    """Start a process of parmap's (a worker, a zygote) with ``ctx``, without
    multiprocessing's re-import of ``__main__``. A Ctrl-C in the main thread meanwhile
    is held (raised mid-start, it could leave a process no pool knows of; ignored, it was
    lost: a start from a forkserver still starting takes 0.4 s under load), then handed
    to the program's handler after the start. A spawned interpreter is exec'd with SIGINT
    ignored, which it inherits (``mp_patches``): it ignores Ctrl-C from birth."""
    process: BaseProcess = ctx.Process(target=target, name=name, daemon=False, args=args)
    method = ctx.get_start_method()
    if method != "fork":  # (fork: no multiprocessing.spawn import, ~0.6 ms)
        skip_main_in_workers()
        patch_exec()
    held: list[Any] = []  # the frame of each SIGINT held
    previous = signal.getsignal(signal.SIGINT) \
        if threading.current_thread() is threading.main_thread() else None
    if previous is not None:  # (None: another thread's start, or a handler set in C)
        signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    spawning.active = True
    spawning.exec_ignoring = previous is not None and method == "spawn"
    started = False
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork with C-level threads; see the module doc
            warnings.simplefilter("ignore", DeprecationWarning)
            process.start()
        started = True
    finally:
        spawning.active = spawning.exec_ignoring = False
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
            if held:
                hand_over_ctrl_c(previous, held, process if started else None)
    return process
