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

import math
import numbers
import os
import re
from contextvars import Token
from functools import lru_cache
from types import TracebackType
from typing import Any, Callable, Mapping

from . import _context
from ._cpu import cpu_count
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


# ---------------------------------------------------------------------- checks

def check_n_jobs(n_jobs: object, name: str = "n_jobs") -> int | None:
    """None, or a non-zero number (floats and numeric strings are truncated)."""
    if n_jobs is None:
        return None
    if isinstance(n_jobs, bool):
        raise ValueError(f"{name} must be a non-zero int or None, got the boolean {n_jobs!r}")
    value: object = n_jobs
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a non-zero int or None, got the string "
                             f"{n_jobs!r}") from None
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a non-zero int or None, got "
                        f"{type(n_jobs).__name__} {n_jobs!r:.60}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite, non-zero number, got {n_jobs!r}")
    result = int(number)
    if result == 0:
        raise ValueError(f"{name}={n_jobs!r} is not allowed: use a positive number of workers, "
                         f"-1 for all CPUs, or -k for all but k-1 CPUs")
    return result


def resolve_n_jobs(n_jobs: int | None) -> int:
    """A checked n_jobs as a worker count: None -> 1, -1 -> all CPUs, -k -> n+1-k."""
    if n_jobs is None:
        return 1
    if n_jobs < 0:
        return max(1, cpu_count() + 1 + n_jobs)
    return n_jobs


def _one_of(name: str, choices: tuple) -> Callable[[object], object]:
    def check_choice(value: object) -> object:
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, "
                             f"got {value!r}")
        return value
    return check_choice


def _check_verbose(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"verbose must be a number, got {value!r}")
    return value  # type: ignore[return-value]


def _check_timeout(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
        raise ValueError(f"timeout must be None or a positive number of seconds, got "
                         f"{value!r}")
    return float(value)


def _check_batch_size(value: object) -> int | str:
    if isinstance(value, str) and value == "auto":
        return "auto"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0:
        return int(value)
    raise ValueError(f"batch_size must be 'auto' or a positive int, got {value!r}")


def _check_positive_int(name: str) -> Callable[[object], int | None]:
    def check_int(value: object) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        return value
    return check_int


def _check_temp_folder(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"temp_folder must be None or a path, got {type(value).__name__} "
                        f"{value!r:.60}")
    return str(os.fspath(value))


_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*")


def parse_size(value: object, name: str = "max_nbytes") -> int | None:
    """None, a byte count, or a size such as '1M', '500K', '2G' (binary units)."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 0:
        return int(value)
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.upper())
        if match:
            return int(float(match.group(1)) * _UNITS[match.group(2)])
    raise ValueError(f"{name} must be None, a non-negative int or a size such as '1M', "
                     f"'500K', '2G', got {value!r}")


def parse_pre_dispatch(value: object, n_jobs: int) -> int | None:
    """``"all"`` -> None; an int or an arithmetic expression of ``n_jobs`` -> a positive int.

    Expressions are parsed with :mod:`ast` and evaluated over a whitelist (numbers,
    ``n_jobs``, + - * / // and parentheses); nothing is ever ``eval``'d.
    """
    if isinstance(value, bool):
        raise ValueError(f"pre_dispatch must be 'all', a positive int or an expression of "
                         f"n_jobs such as '2*n_jobs', got {value!r}")
    number: float
    if isinstance(value, str):
        if value.strip() == "all":
            return None
        match = _K_TIMES_N_JOBS.fullmatch(value)  # the usual "2 * n_jobs": no ast import
        number = int(match.group(1)) * n_jobs if match else _eval_expression(value, n_jobs)
    elif isinstance(value, (int, float)):
        number = value
    else:
        raise TypeError(f"pre_dispatch must be 'all', a positive int or an expression of "
                        f"n_jobs such as '2*n_jobs', got {type(value).__name__} {value!r:.40}")
    if not math.isfinite(number) or int(number) < 1:
        raise ValueError(f"pre_dispatch={value!r} gives {number!r} batches for n_jobs={n_jobs}; "
                         f"it must be at least 1")
    return int(number)


_K_TIMES_N_JOBS = re.compile(r"\s*([0-9]+)\s*\*\s*n_jobs\s*")


@lru_cache(maxsize=64)
def _eval_expression(text: str, n_jobs: int) -> float:
    """Cached: the same one or two expressions come back on every call."""
    import ast  # stdlib, ~1 ms: only for an expression other than "k * n_jobs"

    def bad() -> ValueError:
        return ValueError(f"pre_dispatch={text!r} is not 'all', an int, or an arithmetic "
                          f"expression of n_jobs such as '2*n_jobs' (allowed: numbers, n_jobs, "
                          f"+ - * / // and parentheses)")

    operators: dict[type, Callable[[float, float], float]] = {
        ast.Add: float.__add__, ast.Sub: float.__sub__, ast.Mult: float.__mul__,
        ast.Div: float.__truediv__, ast.FloorDiv: float.__floordiv__}

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id == "n_jobs":
            return float(n_jobs)
        if isinstance(node, ast.BinOp) and type(node.op) in operators:
            try:
                return operators[type(node.op)](walk(node.left), walk(node.right))
            except ZeroDivisionError:
                raise bad() from None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = walk(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        raise bad()

    if len(text) > 100:
        raise bad()
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise bad() from None
    return walk(tree)


def _check_progress(value: object) -> object:
    if value is None or isinstance(value, bool):
        return bool(value)
    if callable(value):  # a tqdm-compatible class, or callable(done, total)
        return value
    raise TypeError(f"progress must be True, False, a tqdm-compatible class (such as "
                    f"tqdm.notebook.tqdm) or a callable(done, total), got "
                    f"{type(value).__name__} {value!r:.60}")


def _check_insights(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"insights must be True or False, got {type(value).__name__} "
                        f"{value!r:.60}")
    return value


def _check_pre_dispatch(value: object) -> object:
    parse_pre_dispatch(value, 1)  # fail early on a malformed value; parsed per call
    return value


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
    Setting("verbose", 0, _check_verbose),
    Setting("temp_folder", None, _check_temp_folder, env="PARMAP_TEMP_FOLDER"),
    Setting("max_nbytes", "1M", parse_size),
    Setting("mmap_mode", "r", _one_of("mmap_mode", (None, "r", "r+", "c", "w+"))),
    Setting("prefer", None, _one_of("prefer", (None, "processes", "threads"))),
    Setting("require", None, _one_of("require", (None, "sharedmem"))),
    Setting("inner_max_num_threads", None, _check_positive_int("inner_max_num_threads")),
    Setting("progress", False, _check_progress),
    Setting("insights", False, _check_insights),
    Setting("return_as", "list",
            _one_of("return_as", ("list", "generator", "generator_unordered")),
            configurable=False),
    Setting("timeout", None, _check_timeout, configurable=False),
    Setting("pre_dispatch", "2 * n_jobs", _check_pre_dispatch, configurable=False),
    Setting("batch_size", "auto", _check_batch_size, configurable=False),
]}

#: the default of each setting as a ``Default`` marker, for signatures
DEFAULT: dict[str, Default] = {name: Default(s.default) for name, s in SETTINGS.items()}


def check(name: str, value: object) -> object:
    """Check and normalise one explicit value."""
    return SETTINGS[name].check(value)


def _given(value: object) -> bool:
    return not isinstance(value, Default)


def resolve(given: Mapping[str, object]) -> dict[str, Any]:
    """Every setting for a call: explicit values in ``given`` (``Default`` markers and
    absent names count as not given), then the context, environment and defaults.
    ``backend=None`` and ``n_jobs=None`` defer to the context, as in joblib."""
    context = _context.CONFIG.get()
    out: dict[str, Any] = {}
    for name, setting in SETTINGS.items():
        value = given.get(name, DEFAULT[name])
        if _given(value) and not (value is None and name in ("backend", "n_jobs")):
            out[name] = setting.check(value)
        elif name in context:
            out[name] = context[name]  # checked when the block was entered
        elif setting.env and os.environ.get(setting.env):
            out[name] = setting.check(os.environ[setting.env])
        else:
            out[name] = setting.check(setting.default)
    out["backend_params"] = context.get("backend_params", {})
    out["nesting_level"] = context.get("nesting_level", 0)
    return out


def get_config() -> dict[str, Any]:
    """The settings ``parallel_config`` blocks put in force here, defaults filled in."""
    return {name: value for name, value in resolve({}).items()
            if name in SETTINGS and SETTINGS[name].configurable}


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
            check_backend_kwargs(spec, backend_params, "parallel_config")
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


class parallel_backend(parallel_config):
    """joblib's older spelling: ``parallel_backend(backend, n_jobs=-1, ...)``."""

    def __init__(self, backend: BackendSpec, n_jobs: int | str | None = -1,
                 inner_max_num_threads: int | None = None, **backend_params: Any):
        super().__init__(backend, n_jobs=n_jobs,
                         inner_max_num_threads=inner_max_num_threads, **backend_params)


def effective_n_jobs(n_jobs: int | str | None = -1) -> int:
    """The number of workers a :class:`~parmap.Parallel` with this ``n_jobs`` would use."""
    settings = resolve({"n_jobs": n_jobs})
    backend = make_backend(settings["backend"], settings["nesting_level"])
    return backend.effective_n_jobs(resolve_n_jobs(settings["n_jobs"]))
