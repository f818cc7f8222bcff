"""``Parallel``: argument checks, backend choice, and the lifecycle of a call.

A call goes one of two ways:

* one worker (``n_jobs=1`` or the sequential backend): every task runs inline, lazily, in
  the caller's thread, with no wrapping, so exceptions, tracebacks and ``pdb`` behave
  exactly as in a plain loop;
* otherwise a :class:`~parmap._dispatch.Dispatcher` feeds batches to the backend and
  collects results in submission or completion order.
"""
from __future__ import annotations

import numbers
import re
from itertools import chain
from typing import Any, Iterable, Iterator

from ._config import (_UNSET, check_backend, check_n_jobs, get_config, make_backend,
                      resolve_n_jobs, _check_setting)
from ._delayed import check_task
from ._dispatch import Dispatcher, parse_pre_dispatch
from ._progress import Progress

__all__ = ["Parallel"]

RETURN_AS = ("list", "generator", "generator_unordered")


class _Default:
    """A default argument value, told apart from the same value passed explicitly."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def _given(value: Any) -> bool:
    return not isinstance(value, _Default) and value is not _UNSET


class Parallel:
    """Run ``delayed`` calls in parallel: ``Parallel(n_jobs=2)(delayed(f)(x) for x in xs)``.

    The signature and semantics follow ``joblib.Parallel``; see the README for each
    argument. Use it as a context manager to keep the same workers for several calls.
    """

    def __init__(self, n_jobs: Any = _Default(None), backend: Any = _Default(None),
                 return_as: str = "list", verbose: Any = _Default(0), timeout: Any = None,
                 pre_dispatch: Any = "2 * n_jobs", batch_size: Any = "auto",
                 temp_folder: Any = _Default(None), max_nbytes: Any = _Default("1M"),
                 mmap_mode: Any = _Default("r"), prefer: Any = _Default(None),
                 require: Any = _Default(None), **backend_kwargs: Any):
        config = get_config()
        explicit = {"n_jobs": n_jobs, "verbose": verbose, "temp_folder": temp_folder,
                    "max_nbytes": max_nbytes, "mmap_mode": mmap_mode, "prefer": prefer,
                    "require": require}
        for key, value in explicit.items():
            if _given(value):
                config[key] = check_n_jobs(value) if key == "n_jobs" else \
                    _check_setting(key, value)
        if _given(backend) and backend is not None:
            check_backend(backend)
        if return_as not in RETURN_AS:
            raise ValueError(f"return_as must be one of {RETURN_AS}, got {return_as!r}")
        self.return_as = return_as
        self.timeout = _check_timeout(timeout)
        self.batch_size = _check_batch_size(batch_size)
        self.pre_dispatch = pre_dispatch
        parse_pre_dispatch(pre_dispatch, 1)  # fail early on a malformed value
        self.max_nbytes = _check_max_nbytes(config["max_nbytes"])
        self.verbose = config["verbose"]
        self.temp_folder = config["temp_folder"]
        self.mmap_mode = config["mmap_mode"]
        self.prefer = config["prefer"]
        self.require = config["require"]
        self.inner_max_num_threads = config["inner_max_num_threads"]
        self._backend_kwargs = {**config["backend_params"], **backend_kwargs}
        self._backend = self._choose_backend(backend if _given(backend) else None, config)
        self.n_jobs = config["n_jobs"]
        self._managed = False
        self._running = False

    def _choose_backend(self, backend: Any, config: dict[str, Any]) -> Any:
        explicit = backend is not None
        if backend is None:
            backend = config["backend"]
        if backend is None and (self.prefer == "threads" or self.require == "sharedmem"):
            backend = "threading"
        instance = make_backend(backend, **self._backend_kwargs) if isinstance(
            backend, str) or backend is None else backend
        if self.require == "sharedmem" and not instance.supports_sharedmem:
            if explicit:
                raise ValueError(f"backend {backend!r} does not share memory with the "
                                 f"caller, but require='sharedmem' was given; use "
                                 f"backend='threading' or drop require")
            instance = make_backend("threading")
        return instance

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Parallel:
        self._managed = True
        self._configure()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._managed = False
        self._backend.terminate()

    def _configure(self) -> int:
        n_jobs = resolve_n_jobs(self.n_jobs)
        n_jobs = self._backend.effective_n_jobs(n_jobs)
        if n_jobs == 1 or self._backend.inline:
            return 1
        return self._backend.configure(n_jobs, parallel=self, **self._backend_kwargs)

    def __call__(self, iterable: Iterable) -> Any:
        if self._running:
            raise RuntimeError(
                "This Parallel instance is still running a call: its generator was neither "
                "exhausted nor closed. Finish or close() that generator first, or use a "
                "separate Parallel instance for concurrent calls.")
        n_jobs = self._configure()
        if n_jobs == 1 and self.return_as == "list" and not self.verbose:
            return _run_inline_list(iterable)
        self._running = True
        try:
            if n_jobs == 1:
                gen = self._inline(iterable)
                next(gen)
                return list(gen) if self.return_as == "list" else gen
            gen = self._dispatched(iterable, n_jobs)
            next(gen)  # start dispatching now, as joblib does; closing gen cancels the call
            if self.return_as == "list":
                return list(chain.from_iterable(gen))
            return _flatten(gen)
        except BaseException:
            self._running = False
            raise

    def _inline(self, iterable: Iterable) -> Iterator[Any]:
        progress = Progress(self.verbose, 1, "sequential") if self.verbose else None
        index = 0
        try:
            yield None  # primed by __call__
            for task in iterable:
                if type(task) is not tuple:  # a str or list of 3 would unpack
                    check_task(task, index)
                try:
                    func, args, kwargs = task
                except ValueError:
                    check_task(task, index)
                    raise
                yield func(*args, **kwargs) if kwargs else func(*args)
                index += 1
                if progress is not None:
                    progress.update(index, None)
            if progress is not None:
                progress.finish(index)
        finally:
            self._running = False

    def _dispatched(self, iterable: Iterable, n_jobs: int) -> Iterator[Any]:
        backend = self._backend
        progress = Progress(self.verbose, n_jobs, type(backend).__name__) \
            if self.verbose else None
        dispatcher = Dispatcher(iterable, backend, n_jobs,
                                parse_pre_dispatch(self.pre_dispatch, n_jobs),
                                self.batch_size, retain=self.return_as == "list",
                                timeout=self.timeout, on_progress=progress)
        self._last_dispatcher = dispatcher
        finished = False
        try:
            dispatcher.start()
            yield None  # primed by __call__, once the first batches are out
            # one result list per batch; __call__ flattens them
            yield from dispatcher.batches(ordered=self.return_as != "generator_unordered")
            finished = True
            if progress is not None:
                progress.finish(dispatcher.n_completed)
        finally:
            self._running = False
            dispatcher.close(finished, keep_backend=self._managed)
            if not self._managed:
                backend.terminate()

    def __repr__(self) -> str:
        return f"Parallel(n_jobs={self.n_jobs}, backend={self._backend!r})"


def _flatten(batches: Iterator[list]) -> Iterator[Any]:
    """The results one by one; closing this generator closes (cancels) ``batches``."""
    try:
        for results in batches:
            yield from results
    finally:
        batches.close()  # type: ignore[attr-defined]


def _run_inline_list(iterable: Iterable) -> list:
    """The debugging mode's fast path: a plain loop, exceptions untouched."""
    out: list = []
    append = out.append
    for task in iterable:
        if type(task) is not tuple:  # a str or list of 3 would unpack
            check_task(task, len(out))
        try:
            func, args, kwargs = task
        except ValueError:
            check_task(task, len(out))
            raise
        append(func(*args, **kwargs) if kwargs else func(*args))  # no kwargs: 7 % faster
    return out


# ---------------------------------------------------------------------- argument checks

def _check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout > 0:
        raise ValueError(f"timeout must be None or a positive number of seconds, got "
                         f"{timeout!r}")
    return float(timeout)


def _check_batch_size(batch_size: Any) -> int | str:
    if batch_size == "auto" and isinstance(batch_size, str):
        return "auto"
    if isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool) \
            and batch_size > 0:
        return int(batch_size)
    raise ValueError(f"batch_size must be 'auto' or a positive int, got {batch_size!r}")


_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}


def _check_max_nbytes(value: Any) -> int | None:
    """None, a byte count, or a human string such as '1M', '500K', '2G' (binary units)."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", value.upper())
        if match:
            return int(float(match.group(1)) * _UNITS[match.group(2)])
    raise ValueError(f"max_nbytes must be None, a non-negative int or a size such as '1M', "
                     f"'500K', '2G', got {value!r}")
