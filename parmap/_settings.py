"""Every setting, declared once; ``parallel_config``; how a call's settings are resolved.

Each :class:`Setting` in :data:`SETTINGS` gives a name, its default, the function that
checks and normalises a value (raising ``ValueError``/``TypeError`` that names the
setting), its environment variable if it has one, and whether ``parallel_config`` may set
it. ``Parallel`` and ``parallel_config`` both go through :func:`resolve` and
:func:`check`, so a setting is validated in one place. A call's value is the first of::

    1. the explicit ``Parallel(...)`` argument
    2. the innermost ``parallel_config`` block of this context (thread or asyncio task)
    3. the setting's environment variable
    4. the declared default

Settings live in a :class:`contextvars.ContextVar` (``_context``), so a block affects only
the thread or task that entered it, and nothing global changes: a library that embeds
parmap can be configured from outside without side effects on its neighbours.
"""
from __future__ import annotations

import os
from contextvars import Token
from types import TracebackType
from typing import Any, Callable, Mapping

from . import _context
from ._checks import (check_batch_size, check_insights, check_n_jobs, check_positive_int,
                      check_pre_dispatch, check_progress, check_temp_folder, check_timeout,
                      check_verbose, one_of, parse_pre_dispatch, parse_size, resolve_n_jobs)
from ._public import public
from ._worker_state import process_slot
from .backends import BackendSpec, check_backend, check_backend_kwargs, make_backend

__all__ = ["Setting", "SETTINGS", "Default", "DEFAULT", "parallel_config", "parallel_backend",
           "resolve", "check", "check_n_jobs", "resolve_n_jobs", "parse_size",
           "parse_pre_dispatch", "effective_n_jobs", "get_config"]


class Default:
    """A parameter's default, told apart from the same value passed explicitly."""

    __slots__ = ("value",)

    def __init__(self, value: object):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


# ---------------------------------------------------------------------- the table

class Setting:
    """One setting: its name, default, check, environment variable, and whether
    ``parallel_config`` may set it (else only an explicit ``Parallel`` argument).
    (A plain class: a NamedTuple costs ~0.3 ms of ``import parmap``.)"""

    __slots__ = ("name", "default", "check", "env", "configurable")

    def __init__(self, name: str, default: object, check: Callable[[Any], object],
                 env: str | None = None, configurable: bool = True):
        self.name = name
        self.default = default
        self.check = check
        self.env = env
        self.configurable = configurable


SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting("backend", None, check_backend),
    Setting("n_jobs", None, check_n_jobs),
    Setting("verbose", 0, check_verbose),
    Setting("temp_folder", None, check_temp_folder, env="PARMAP_TEMP_FOLDER"),
    Setting("max_nbytes", "1M", parse_size),
    Setting("mmap_mode", "r", one_of("mmap_mode", (None, "r", "r+", "c", "w+"))),
    Setting("prefer", None, one_of("prefer", (None, "processes", "threads"))),
    Setting("require", None, one_of("require", (None, "sharedmem"))),
    Setting("inner_max_num_threads", None, check_positive_int("inner_max_num_threads")),
    Setting("progress", False, check_progress),
    Setting("insights", False, check_insights),
    Setting("return_as", "list",
            one_of("return_as", ("list", "generator", "generator_unordered")),
            configurable=False),
    Setting("timeout", None, check_timeout, configurable=False),
    Setting("pre_dispatch", "2 * n_jobs", check_pre_dispatch, configurable=False),
    Setting("batch_size", "auto", check_batch_size, configurable=False),
]}

#: the default of each setting as a ``Default`` marker, for signatures
DEFAULT: dict[str, Default] = {name: Default(s.default) for name, s in SETTINGS.items()}


def check(name: str, value: object) -> object:
    """Check and normalise one explicit value."""
    return SETTINGS[name].check(value)


def _given(value: object) -> bool:
    return not isinstance(value, Default)


#: each default, checked once (the checks are pure; a call resolves every setting);
#: empty until then, and then complete: see resolve
_CHECKED_DEFAULT: dict[str, Any] = {}


def resolve(given: Mapping[str, object]) -> dict[str, Any]:
    """Every setting for a call: explicit values in ``given`` (``Default`` markers and
    absent names count as not given), then the context, environment and defaults.
    ``backend=None`` and ``n_jobs=None`` defer to the context, as in joblib."""
    context = _context.CONFIG.get()
    defaults = _CHECKED_DEFAULT
    if not defaults:  # made whole, then put in at once: another thread may read it now
        checked = {name: s.check(s.default) for name, s in SETTINGS.items()}
        defaults.update(checked)
    out: dict[str, Any] = {}
    for name, setting in SETTINGS.items():
        value = given.get(name, DEFAULT[name])
        if type(value) is not Default and not (value is None and name in ("backend", "n_jobs")):
            out[name] = setting.check(value)
        elif name in context:
            out[name] = context[name]  # checked when the block was entered
        elif setting.env and os.environ.get(setting.env):
            out[name] = setting.check(os.environ[setting.env])
        else:
            out[name] = defaults[name]
    out["backend_params"] = context.get("backend_params", {})
    # in a worker process every call is nested, from the task's thread or from a thread
    # the task started (a new thread starts with an empty context)
    out["nesting_level"] = max(context.get("nesting_level", 0), int(process_slot() is not None))
    return out


def get_config() -> dict[str, Any]:
    """The settings ``parallel_config`` blocks put in force here, defaults filled in."""
    return {name: value for name, value in resolve({}).items()
            if name in SETTINGS and SETTINGS[name].configurable}


@public
class parallel_config:
    """Set defaults for every :class:`~parmap.Parallel` created in this context.

    Use it as a context manager:

    >>> from parmap import Parallel, delayed, parallel_config
    >>> with parallel_config(backend="threading", n_jobs=4):
    ...     Parallel()(delayed(abs)(x) for x in [-1, -2])
    [1, 2]

    Settings apply to the current thread/context only and are undone on exit; explicit
    ``Parallel`` arguments win. ``backend`` is a registered name or a backend instance;
    extra keyword arguments go to the backend (and must be ones it accepts).
    """

    def __init__(self, backend: BackendSpec | Default = DEFAULT["backend"], *,
                 n_jobs: int | str | None | Default = DEFAULT["n_jobs"],
                 verbose: float | Default = DEFAULT["verbose"],
                 temp_folder: str | os.PathLike | None | Default = DEFAULT["temp_folder"],
                 max_nbytes: int | str | None | Default = DEFAULT["max_nbytes"],
                 mmap_mode: str | None | Default = DEFAULT["mmap_mode"],
                 prefer: str | None | Default = DEFAULT["prefer"],
                 require: str | None | Default = DEFAULT["require"],
                 inner_max_num_threads: int | None | Default = DEFAULT["inner_max_num_threads"],
                 progress: bool | Callable[..., Any] | Default = DEFAULT["progress"],
                 insights: bool | Default = DEFAULT["insights"],
                 **backend_params: object):
        given = {"backend": backend, "n_jobs": n_jobs, "verbose": verbose,
                 "temp_folder": temp_folder, "max_nbytes": max_nbytes,
                 "mmap_mode": mmap_mode, "prefer": prefer, "require": require,
                 "inner_max_num_threads": inner_max_num_threads, "progress": progress,
                 "insights": insights}
        new: dict[str, object] = {name: check(name, value) for name, value in given.items()
                                  if _given(value) and not (name == "backend" and value is None)}
        if "backend" in new:
            new["backend_params"] = {}  # the params of an outer block were for its backend
        if backend_params:
            spec = check_backend(new.get("backend", _context.CONFIG.get().get("backend")))
            check_backend_kwargs(spec, backend_params, "parallel_config",
                                 implicit="backend" not in new)
            old = _context.CONFIG.get().get("backend_params", {}) if "backend" not in new else {}
            new["backend_params"] = {**old, **backend_params}
        self.settings = {**_context.CONFIG.get(), **new}
        self._token: Token | None = _context.push(new)

    def __enter__(self) -> parallel_config:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.unregister()

    def unregister(self) -> None:
        """Undo this configuration (what leaving the ``with`` block does)."""
        if self._token is not None:
            _context.pop(self._token)
            self._token = None


@public
class parallel_backend(parallel_config):
    """joblib's older spelling: ``parallel_backend(backend, n_jobs=-1, ...)``."""

    def __init__(self, backend: BackendSpec, n_jobs: int | str | None = -1,
                 inner_max_num_threads: int | None = None, **backend_params: Any):
        super().__init__(backend, n_jobs=n_jobs,
                         inner_max_num_threads=inner_max_num_threads, **backend_params)


@public
def effective_n_jobs(n_jobs: int | str | None = -1) -> int:
    """The number of workers a :class:`~parmap.Parallel` with this ``n_jobs`` would use."""
    settings = resolve({"n_jobs": n_jobs})
    backend = make_backend(settings["backend"], settings["nesting_level"])
    return backend.effective_n_jobs(resolve_n_jobs(settings["n_jobs"]))
