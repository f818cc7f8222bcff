"""``parallel_config``, the backend registry, and CPU counting.

Settings live in a :class:`contextvars.ContextVar`, so a ``parallel_config`` block affects
only the thread (or asyncio task) that entered it, and nothing global changes: a library
that embeds parmap can be configured from outside without side effects on its neighbours.
Explicit arguments to :class:`~parmap.Parallel` always win over the context.
"""
from __future__ import annotations

import math
import numbers
import os
from contextvars import ContextVar
from typing import Any, Callable

__all__ = [
    "parallel_config", "parallel_backend", "register_parallel_backend", "effective_n_jobs",
    "cpu_count", "check_n_jobs", "resolve_n_jobs", "get_config", "make_backend",
]

_UNSET: Any = object()

# The settings parallel_config can carry, with the values used when nothing sets them.
DEFAULTS: dict[str, Any] = {
    "backend": None,
    "n_jobs": None,
    "verbose": 0,
    "temp_folder": None,
    "max_nbytes": "1M",
    "mmap_mode": "r",
    "prefer": None,
    "require": None,
    "inner_max_num_threads": None,
    "backend_params": {},
}

_config: ContextVar[dict[str, Any]] = ContextVar("parmap_config", default={})

# name -> factory returning a fresh backend instance; the built-ins are added lazily
_BACKENDS: dict[str, Callable[..., Any]] = {}
_default_backend = ["processes"]  # a list so register_parallel_backend can swap it


def get_config() -> dict[str, Any]:
    """The settings in force in this context, defaults filled in."""
    merged = dict(DEFAULTS)
    merged.update(_config.get())
    return merged


class parallel_config:
    """Set defaults for every :class:`~parmap.Parallel` created in this context.

    Use it as a context manager::

        with parallel_config(backend="threading", n_jobs=4):
            results = Parallel()(delayed(f)(x) for x in xs)

    Settings apply to the current thread/context only and are undone on exit; explicit
    ``Parallel`` arguments win. ``backend`` is a registered name or a backend instance;
    extra keyword arguments are passed to the backend.
    """

    def __init__(self, backend: Any = None, *, n_jobs: Any = _UNSET, verbose: Any = _UNSET,
                 temp_folder: Any = _UNSET, max_nbytes: Any = _UNSET, mmap_mode: Any = _UNSET,
                 prefer: Any = _UNSET, require: Any = _UNSET,
                 inner_max_num_threads: Any = _UNSET, **backend_params: Any):
        given = {"n_jobs": n_jobs, "verbose": verbose, "temp_folder": temp_folder,
                 "max_nbytes": max_nbytes, "mmap_mode": mmap_mode, "prefer": prefer,
                 "require": require, "inner_max_num_threads": inner_max_num_threads}
        new = dict(_config.get())
        if backend is not None:
            check_backend(backend)
            new["backend"] = backend
        for key, value in given.items():
            if value is not _UNSET:
                new[key] = _check_setting(key, value)
        if backend_params:
            new["backend_params"] = {**new.get("backend_params", {}), **backend_params}
        self.settings = new
        self._token = _config.set(new)

    def __enter__(self) -> parallel_config:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.unregister()

    def unregister(self) -> None:
        """Undo this configuration (what leaving the ``with`` block does)."""
        if self._token is not None:
            _config.reset(self._token)
            self._token = None


class parallel_backend(parallel_config):
    """joblib's older spelling: ``parallel_backend(backend, n_jobs=-1, ...)``."""

    def __init__(self, backend: Any, n_jobs: Any = -1, inner_max_num_threads: Any = None,
                 **backend_params: Any):
        super().__init__(backend, n_jobs=n_jobs,
                         inner_max_num_threads=inner_max_num_threads, **backend_params)


def _check_setting(key: str, value: Any) -> Any:
    if key == "n_jobs":
        return check_n_jobs(value)
    if key == "verbose":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"verbose must be a number, got {value!r}")
    elif key == "prefer" and value not in (None, "processes", "threads"):
        raise ValueError(f"prefer must be None, 'processes' or 'threads', got {value!r}")
    elif key == "require" and value not in (None, "sharedmem"):
        raise ValueError(f"require must be None or 'sharedmem', got {value!r}")
    elif key == "mmap_mode" and value not in (None, "r", "r+", "c", "w+"):
        raise ValueError(f"mmap_mode must be one of None, 'r', 'r+', 'c', 'w+', got {value!r}")
    elif key == "inner_max_num_threads" and value is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"inner_max_num_threads must be a positive int, got {value!r}")
    return value


# --------------------------------------------------------------------------- n_jobs

def check_n_jobs(n_jobs: Any, name: str = "n_jobs") -> int | None:
    """Validate ``n_jobs``: None, or a non-zero number (floats and numeric strings truncate)."""
    if n_jobs is None:
        return None
    if isinstance(n_jobs, bool):
        raise ValueError(f"{name} must be a non-zero int or None, got the boolean {n_jobs!r}")
    value = n_jobs
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a non-zero int or None, got the string "
                             f"{n_jobs!r}") from None
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a non-zero int or None, got "
                        f"{type(n_jobs).__name__} {n_jobs!r:.60}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite, non-zero number, got {n_jobs!r}")
    result = int(value)
    if result == 0:
        raise ValueError(f"{name}={n_jobs!r} is not allowed: use a positive number of workers, "
                         f"-1 for all CPUs, or -k for all but k-1 CPUs")
    return result


def resolve_n_jobs(n_jobs: int | None) -> int:
    """Turn a checked n_jobs into a worker count: None -> 1, -1 -> all CPUs, -k -> n+1-k."""
    if n_jobs is None:
        return 1
    if n_jobs < 0:
        return max(1, cpu_count() + 1 + n_jobs)
    return n_jobs


def effective_n_jobs(n_jobs: Any = -1) -> int:
    """The number of workers a :class:`~parmap.Parallel` with this ``n_jobs`` would use."""
    config = get_config()
    checked = check_n_jobs(n_jobs)
    if checked is None:
        checked = config["n_jobs"]
    backend = make_backend(config["backend"])
    return backend.effective_n_jobs(resolve_n_jobs(checked))


# --------------------------------------------------------------------------- backends

def _ensure_builtin_backends() -> None:
    if _BACKENDS:
        return
    from .backends.process import process_backend_factory
    from .backends.sequential import SequentialBackend
    from .backends.threading import ThreadingBackend

    _BACKENDS.setdefault("sequential", SequentialBackend)
    _BACKENDS.setdefault("threading", ThreadingBackend)
    for name in ("processes", "loky", "multiprocessing"):  # joblib's names run ours
        _BACKENDS.setdefault(name, process_backend_factory)

    def dask_backend_factory(**backend_kwargs: Any) -> Any:
        # dask is imported only when this backend is used: `import parmap` stays light
        from .backends.dask import DaskBackend

        return DaskBackend(**backend_kwargs)

    _BACKENDS.setdefault("dask", dask_backend_factory)


def register_parallel_backend(name: str, factory: Callable[..., Any],
                              make_default: bool = False) -> None:
    """Register ``factory`` (a backend class or a callable returning a backend) as ``name``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_parallel_backend: name must be a non-empty str, got "
                        f"{name!r}")
    if not callable(factory):
        raise TypeError(f"register_parallel_backend: factory must be callable, got "
                        f"{factory!r}")
    _ensure_builtin_backends()
    _BACKENDS[name] = factory
    if make_default:
        _default_backend[0] = name


def check_backend(backend: Any) -> None:
    from .backends._base import ParallelBackendBase

    if isinstance(backend, ParallelBackendBase):
        return
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a registered name or a ParallelBackendBase "
                        f"instance, got {type(backend).__name__} {backend!r:.60}")
    _ensure_builtin_backends()
    if backend not in _BACKENDS:
        raise ValueError(f"backend {backend!r} is not registered; choose one of "
                         f"{sorted(_BACKENDS)} or register it with "
                         f"register_parallel_backend")


def make_backend(backend: Any, **backend_params: Any) -> Any:
    """A backend instance from a name, an instance (returned as is) or None (the default)."""
    from .backends._base import ParallelBackendBase

    if isinstance(backend, ParallelBackendBase):
        return backend
    _ensure_builtin_backends()
    name = _default_backend[0] if backend is None else backend
    check_backend(name)
    return _BACKENDS[name](**backend_params)


# --------------------------------------------------------------------------- CPUs

def cpu_count(only_physical_cores: bool = False) -> int:
    """CPUs this process may use: affinity mask and cgroup CPU quota taken into account.

    With ``only_physical_cores=True``, hyper-threads sharing a core count once (where the
    system says which they are).
    """
    count = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        try:
            count = len(os.sched_getaffinity(0)) or count
        except OSError:
            pass
    quota = cgroup_cpu_limit()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    if only_physical_cores:
        physical = physical_core_count()
        if physical:
            count = min(count, physical)
    return max(1, count)


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup",
                     proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's cgroup (v2 or v1) in CPUs, or None when unlimited."""
    candidates = []
    try:
        with open(proc_cgroup) as f:
            for line in f:
                parts = line.strip().split(":", 2)
                if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
                    candidates.append(os.path.join(root, parts[2].lstrip("/"), "cpu.max"))
    except OSError:
        pass
    candidates.append(os.path.join(root, "cpu.max"))
    for path in candidates:  # cgroup v2: "max 100000" or "200000 100000"
        text = _read(path)
        if text:
            quota, _, period = text.partition(" ")
            return _ratio(quota, period)
    for sub in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):  # cgroup v1
        quota = _read(os.path.join(root, sub, "cpu.cfs_quota_us"))
        period = _read(os.path.join(root, sub, "cpu.cfs_period_us"))
        if quota and period:
            return _ratio(quota, period)
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": no limit
        return None
    return q / p if q > 0 and p > 0 else None


def physical_core_count(cpuinfo: str = "/proc/cpuinfo") -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo, or None where that is unknown."""
    text = _read(cpuinfo)
    if not text:
        return None
    cores = set()
    package = core = None
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not key:
            if core is not None:
                cores.add((package, core))
            package = core = None
    return len(cores) or None
