"""``Parallel``: settings and backend choice, and the lifecycle of a call.

::

    Parallel(**arguments) ── _settings.resolve ──> settings ── make_backend ──> backend
    parallel(iterable)
        one worker ──> _run_inline: every task in the caller's thread, unwrapped, so
                       exceptions, tracebacks and pdb behave exactly as in a plain loop
        otherwise  ──> backend.configure(n_jobs, CallOptions) ─> Dispatcher(iterable)
                       ─> result lists per batch, in submission or completion order
                       ─> a list, or a generator whose closing cancels the call

``with Parallel(...) as parallel:`` configures the backend once and keeps its workers
for every call in the block.
"""
from __future__ import annotations

import os
import threading
from itertools import chain
from operator import length_hint
from time import time
from types import GeneratorType, TracebackType
from typing import Any, Callable, Generator, Iterable, cast

from ._delayed import InlineStop, Task, stopped_error
from ._dispatch import Dispatcher
from ._inline import read_ahead, run_all, run_each, until_stopped, warn_unused
from ._insights import Insights
from ._monitor import Monitor
from ._progress import print_line
from ._public import public
from ._settings import DEFAULT, Default, parse_pre_dispatch, resolve, resolve_n_jobs
from .backends import (BackendSpec, CallOptions, ParallelBackendBase, default_is_processes,
                       make_backend)

__all__ = ["Parallel"]

_CLAIM = threading.Lock()  # held only to claim an instance for a call (_running)
_BUSY = ("This Parallel instance is already running: a call of it in another thread, or its "
         "generator, which was neither exhausted nor closed. Finish or close() that "
         "generator first, or use a separate Parallel instance for concurrent calls.")


@public
class Parallel:
    """Run ``delayed`` calls in parallel: ``Parallel(n_jobs=2)(delayed(f)(x) for x in xs)``.

    The signature and semantics follow ``joblib.Parallel``; each argument is described in
    the documentation's "Parallel loops" page (``docs/loops.rst``). Extra keyword arguments go to the backend (see its documentation); an
    unknown one is a ``TypeError``. Use it as a context manager to keep the same workers
    for several calls.
    """

    def __init__(self, n_jobs: int | str | None | Default = DEFAULT["n_jobs"],
                 backend: BackendSpec | Default = DEFAULT["backend"],
                 return_as: str | Default = DEFAULT["return_as"],
                 verbose: float | Default = DEFAULT["verbose"],
                 timeout: float | None | Default = DEFAULT["timeout"],
                 pre_dispatch: int | str | Default = DEFAULT["pre_dispatch"],
                 batch_size: int | str | Default = DEFAULT["batch_size"],
                 temp_folder: str | os.PathLike | None | Default = DEFAULT["temp_folder"],
                 max_nbytes: int | str | None | Default = DEFAULT["max_nbytes"],
                 mmap_mode: str | None | Default = DEFAULT["mmap_mode"],
                 prefer: str | None | Default = DEFAULT["prefer"],
                 require: str | None | Default = DEFAULT["require"],
                 progress: bool | Callable[..., Any] | Default = DEFAULT["progress"],
                 insights: bool | Default = DEFAULT["insights"],
                 **backend_kwargs: object):
        settings = resolve({
            "n_jobs": n_jobs, "backend": backend, "return_as": return_as, "verbose": verbose,
            "timeout": timeout, "pre_dispatch": pre_dispatch, "batch_size": batch_size,
            "temp_folder": temp_folder, "max_nbytes": max_nbytes, "mmap_mode": mmap_mode,
            "prefer": prefer, "require": require, "progress": progress,
            "insights": insights})
        self.n_jobs: int | None = settings["n_jobs"]
        self.return_as: str = settings["return_as"]
        self.verbose: float = settings["verbose"]
        self.timeout: float | None = settings["timeout"]
        self.pre_dispatch: int | str = settings["pre_dispatch"]
        self.batch_size: int | str = settings["batch_size"]
        self.temp_folder: str | None = settings["temp_folder"]
        self.max_nbytes: int | None = settings["max_nbytes"]
        self.mmap_mode: str | None = settings["mmap_mode"]
        self.prefer: str | None = settings["prefer"]
        self.require: str | None = settings["require"]
        self.inner_max_num_threads: int | None = settings["inner_max_num_threads"]
        # a bar per nested call would garble the caller's: only an explicit argument
        nested = settings["nesting_level"] > 0 and isinstance(progress, Default)
        self.progress: bool | Callable[..., Any] = False if nested else settings["progress"]
        self._observe: bool = settings["insights"]
        self._insights: Insights | None = None
        named = not isinstance(backend, Default) and backend is not None
        params = backend_kwargs if named else {**settings["backend_params"], **backend_kwargs}
        # the call chose its backend: named it, or asked for threads (prefer, require)
        chosen = named or any(not isinstance(v, Default) and v is not None
                              for v in (prefer, require))
        self._backend = _choose_backend(self.prefer, self.require, self.n_jobs,
                                        settings["backend"], named, params,
                                        settings["nesting_level"], not chosen)
        self._managed = False
        self._running = False
        self._live: _Call | None = None  # the call a generator is still running

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Parallel:
        if self._running:  # its block would end (or reconfigure) a call it did not make
            raise RuntimeError(_BUSY)
        self._managed = True
        self._configure()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._managed = False
        call = self._live
        if call is not None:  # made in the block, its generator still referenced:
            finished = call.stop_for_block(self.return_as)  # its tasks end with it
            if not call.running_elsewhere():  # (else that thread ends it, told to)
                self._end(call, finished)
        if exc_type is not None:  # leaving on an error (a timeout, Ctrl-C): stop, and
            # do not wait for the tasks still running (a stuck thread is abandoned)
            self._backend.abort_everything(ensure_ready=False)
        self._backend.terminate()

    def _effective_n_jobs(self) -> int:
        """How many workers a call of this instance would use (joblib's private name,
        which joblib-era code calls): ``n_jobs`` resolved as the backend counts it."""
        if self._backend.inline:
            return 1
        return self._backend.effective_n_jobs(resolve_n_jobs(self.n_jobs))

    def _configure(self) -> int:
        backend = self._backend
        n_jobs = backend.effective_n_jobs(resolve_n_jobs(self.n_jobs))
        if n_jobs == 1 or backend.inline:
            warn_unused(self.timeout, backend)
            return 1
        return backend.configure(n_jobs, CallOptions(
            self.timeout, self.max_nbytes, self.mmap_mode, self.temp_folder,
            self.inner_max_num_threads, self.verbose, self.n_jobs))

    def __call__(self, iterable: Iterable[Task]) -> Any:
        """Run the tasks: a list of results, or a generator for the generator modes."""
        with _CLAIM:  # check and set as one: two threads may call the same instance
            if self._running:
                raise RuntimeError(_BUSY)
            self._running = True
        batches = results = None
        try:
            started = time() if self._observe else 0.0
            n_jobs = self._configure()
            monitor = self._monitor(iterable, n_jobs, started)
            if n_jobs == 1:
                if monitor is not None:  # its total, for delayed(f)(x) for x in range(n)
                    iterable = monitor.counted(iterable)
                if isinstance(self.batch_size, int) and self.batch_size > 1:
                    iterable = read_ahead(iterable, self.batch_size)
                if monitor is None and self.return_as == "list":
                    try:
                        return run_all(iterable)
                    finally:
                        self._running = False
                results = self._inline(iterable, monitor)
                next(results)
                self._track(results)
                if self.return_as != "list":
                    return results
                try:
                    return list(results)
                except InlineStop as stopped:  # as in a plain loop
                    raise stopped.stop from None
            batches = self._dispatched(iterable, n_jobs, monitor)
            next(batches)  # start dispatching now, as joblib does
            self._track(batches)
            if self.return_as == "list":
                return list(chain.from_iterable(batches))
            results = _flatten(batches)  # closing it cancels the call
            next(results)  # started: Python 3.12+ closes an unstarted one without its finally
            return results
        except BaseException:  # (a Ctrl-C between two lines here: the call must end too)
            for begun in (results, batches):
                if begun is not None:
                    begun.close()
            self._running = False
            raise

    def _track(self, gen: Generator) -> None:
        """``gen`` runs the call just started: the end of its block asks whether
        another thread is inside it. A block that ended while it started left the
        call to this thread (``running_elsewhere``): it ends it now (its generator,
        when read, raises the block's error)."""
        call = self._live
        if call is not None:
            call.gen = gen  # then the check: the block's thread sets, then checks, too
            if call.block_ended is not None:
                self._end(call, call.block_ended)

    @property
    def insights(self) -> Insights | None:
        """What the last call did, with ``insights=True`` (None otherwise, or before the
        first call): ``print()`` it for a report with advice, ``.to_dict()`` for the
        figures, ``.plot("run.png")`` for a timeline. Readable during the call too."""
        return self._insights

    def _monitor(self, iterable: Iterable[Task], n_jobs: int, started: float
                 ) -> Monitor | None:
        """Verbose lines, a progress bar and insights for this call; None if all are off."""
        if not Monitor.wanted(self.verbose, self.progress, self._observe):
            return None
        total = (length_hint(iterable, 0) or None) if hasattr(iterable, "__len__") else None
        monitor = Monitor(self.verbose, self.progress, self._observe, n_jobs, self._backend,
                          n_jobs == 1, total, started, self._print)
        if monitor.insights is not None:
            self._insights = monitor.insights
        return monitor

    def _print(self, line: str) -> None:
        """Print one ``verbose`` line (a subclass may override it, as in joblib)."""
        print_line(self.verbose, line)

    def _inline(self, iterable: Iterable[Task], monitor: Monitor | None
                ) -> Generator[Any, None, None]:
        """Every task in the caller's thread, one by one; the end of a ``with`` block
        stops it as it cancels a dispatched call (``_Call.stop``: ``__exit__``)."""
        stop: list[str] = []
        call = self._live = _Call(None, monitor, stop)
        results: Generator[Any, None, None] | None = None
        try:
            yield None  # primed by __call__
            results = run_each(iterable, stop) if monitor is None else \
                monitor.run_inline(until_stopped(iterable, stop))
            yield from results
        except InlineStop as stopped:  # (a list raises the task's own StopIteration)
            if self.return_as == "list":
                raise
            raise stopped_error(stopped.index, stopped.task) from stopped.stop
        finally:
            try:
                if results is not None:
                    results.close()
            finally:
                self._end(call, False)

    def _dispatched(self, iterable: Iterable[Task], n_jobs: int, monitor: Monitor | None
                    ) -> Generator[list, None, None]:
        backend = self._backend
        finished = False
        try:
            dispatcher = Dispatcher(
                iterable, backend, n_jobs, parse_pre_dispatch(self.pre_dispatch, n_jobs),
                self.batch_size, retain=self.return_as == "list", timeout=self.timeout,
                on_progress=monitor, observer=monitor.insights if monitor else None,
                # completion order promises the fastest results first: a batch primed from
                # earlier calls could hold a slow task back with quick ones
                prime=self.return_as != "generator_unordered")
        except BaseException:
            if monitor is not None:
                monitor.close(None)
            raise
        call = self._live = _Call(dispatcher, monitor, None)
        try:
            dispatcher.start()
            yield []  # primed by __call__, once the first batches are out
            batches = dispatcher.batches(ordered=self.return_as != "generator_unordered")
            yield from batches if monitor is None else monitor.consumed(batches)
            finished = True
        finally:
            self._end(call, finished)

    def _end(self, call: _Call, finished: bool) -> None:
        """End a call, once: from its generator's end, or from the end of the ``with``
        block it was made in (a generator still referenced must not hold the call's
        files, its bar or the instance until it is dropped)."""
        if not call.claim():
            return  # ended by the block already
        if self._live is call:
            self._live = None
        dispatcher, monitor = call.dispatcher, call.monitor
        try:
            if dispatcher is not None:
                dispatcher.close(finished, keep_backend=self._managed)
        finally:
            try:
                if monitor is not None:  # (inline: closed already, unless cancelled)
                    monitor.close(dispatcher.n_completed if finished and dispatcher
                                  else None)
                if not self._managed and dispatcher is not None:
                    self._backend.terminate()
            finally:  # last: another thread may start a call of this instance now
                self._running = False

    def __repr__(self) -> str:
        return f"Parallel(n_jobs={self.n_jobs}, backend={self._backend!r})"


class _Call:
    """A call of a ``Parallel`` whose generator may outlive the ``with`` block it was
    made in (``Parallel._end``): its dispatcher (None inline), monitor, ``stop`` (inline:
    why its tasks must stop), and the generator that runs it."""

    __slots__ = ("dispatcher", "monitor", "stop", "gen", "block_ended", "_token")

    def __init__(self, dispatcher: Dispatcher | None, monitor: Monitor | None,
                 stop: list[str] | None):
        self.dispatcher, self.monitor, self.stop = dispatcher, monitor, stop
        self.gen: Generator | None = None
        #: set when its block ended: whether the call had finished then
        self.block_ended: bool | None = None
        self._token = [True]

    def claim(self) -> bool:
        """True for the first caller only: ends it. A list's pop is atomic, and takes no
        lock that a garbage collection could find held (a generator's ``finally``
        runs in one)."""
        try:
            return self._token.pop()
        except IndexError:
            return False

    def running_elsewhere(self) -> bool:
        """Whether a thread is inside its generator (waiting for a result, reading the
        input, running a task inline), or still starting it (``Parallel.__call__``
        before ``_track``): that thread ends the call, once told to stop."""
        gen = self.gen  # (gi_running, not inspect.getgeneratorstate: ~10 ms of imports)
        return gen is None or cast(GeneratorType, gen).gi_running

    def stop_for_block(self, return_as: str) -> bool:
        """The block it was made in ended: stop it; whether it had finished (every
        result handed out), so that reading on returns nothing rather than an error."""
        why = ("this Parallel call, still running in another thread, was cancelled when "
               "its `with Parallel(...)` block ended: end the block once the call has "
               "returned" if return_as == "list" else
               "the generator of this Parallel call was cancelled when its `with "
               "Parallel(...)` block ended: read a generator's results inside the block, "
               "or use return_as='list'")
        if self.stop is not None:  # inline: raised when its next task is read
            self.stop.append(why)
            self.block_ended = False
        else:
            assert self.dispatcher is not None
            self.block_ended = self.dispatcher.finished
            if not self.block_ended:
                self.dispatcher.abort(ensure_ready=False, why=why)
        return self.block_ended


def _choose_backend(prefer: str | None, require: str | None, n_jobs: int | None,
                    spec: BackendSpec, named: bool, params: dict[str, object],
                    nesting_level: int, implicit: bool) -> ParallelBackendBase:
    """The backend a ``Parallel`` runs on, from its arguments and the settings."""
    if prefer == "processes" and require == "sharedmem":
        raise ValueError("prefer == 'processes' and require == 'sharedmem' are "
                         "inconsistent settings: processes do not share the caller's "
                         "memory; drop one of them (require='sharedmem' runs on threads)")
    if spec is None and (prefer == "threads" or require == "sharedmem"):
        spec = "threading"
    elif spec is None and n_jobs == 1 and not params and default_is_processes():
        # one worker runs every task inline: the process backend would only cost
        # its import (multiprocessing and the pool's modules, ~30 ms of cold start)
        spec = "sequential"
    backend = make_backend(spec, nesting_level, implicit=implicit, **params)
    if require == "sharedmem" and not backend.supports_sharedmem:
        if named:
            raise ValueError(f"backend {spec!r} does not share memory with the "
                             f"caller, but require='sharedmem' was given; use "
                             f"backend='threading' or drop require")
        backend = make_backend("threading", nesting_level)
    return backend


def _flatten(batches: Generator[list, None, None]) -> Generator[Any, None, None]:
    """The results one by one; closing this generator closes (cancels) ``batches``."""
    try:
        yield None  # primed by __call__
        yield from chain.from_iterable(batches)
    finally:
        batches.close()
