"""How each setting's value is checked and normalised (``_settings`` declares them).

Every check raises ``ValueError`` or ``TypeError`` naming the setting and saying what it
accepts. ``parse_size`` and ``parse_pre_dispatch`` are also used where a value is turned
into numbers per call.
"""
from __future__ import annotations

import math
import os
import sys
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import numbers
    from typing import TypeGuard

from ._cpu import cpu_count

__all__ = ["check_n_jobs", "resolve_n_jobs", "parse_size", "parse_pre_dispatch", "one_of",
           "check_verbose", "check_timeout", "check_batch_size", "check_positive_int",
           "check_temp_folder", "check_progress", "check_insights", "check_pre_dispatch"]


def check_n_jobs(n_jobs: object, name: str = "n_jobs") -> int | None:
    """None, or a non-zero number (floats are truncated; strings must hold an int)."""
    if n_jobs is None:
        return None
    if isinstance(n_jobs, bool):
        raise ValueError(f"{name} must be a non-zero int or None, got the boolean {n_jobs!r}")
    value: object = n_jobs
    if isinstance(value, str):  # as joblib: an int's digits ("2"), not "2.5"
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{name} could not be converted to int: {name} must be a "
                             f"non-zero int or None, got the string {n_jobs!r}") from None
    if not _is_real(value):
        raise TypeError(f"{name} must be a non-zero int or None, got "
                        f"{type(n_jobs).__name__} {n_jobs!r:.60}")
    number = _as_float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite, non-zero number, got {_shown(n_jobs)}")
    result = int(number)
    if result == 0:
        raise ValueError(f"{name} == 0 in Parallel has no meaning ({name}={n_jobs!r}): use a "
                         f"positive number of workers, -1 for all CPUs, or -k for all but "
                         f"k-1 CPUs")
    return result


def resolve_n_jobs(n_jobs: int | None) -> int:
    """A checked n_jobs as a worker count: None -> 1, -1 -> all CPUs, -k -> n+1-k."""
    if n_jobs is None:
        return 1
    if n_jobs < 0:
        return max(1, cpu_count() + 1 + n_jobs)
    return n_jobs


def one_of(name: str, choices: tuple) -> Callable[[object], object]:
    def check_choice(value: object) -> object:
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, "
                             f"got {value!r}")
        return value
    return check_choice


def check_verbose(value: object) -> float:
    if isinstance(value, bool) or not _is_real(value):
        raise TypeError(f"verbose must be a number, got {value!r}")
    return value  # type: ignore[return-value]


def check_timeout(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not _is_real(value) or not _as_float(value) > 0:
        raise ValueError(f"timeout must be None or a positive number of seconds, got "
                         f"{value!r}")
    return _as_float(value)


def check_batch_size(value: object) -> int | str:
    if isinstance(value, str) and value == "auto":
        return "auto"
    if _is_integral(value) and not isinstance(value, bool) and 0 < int(value) <= sys.maxsize:
        return int(value)
    raise ValueError(f"batch_size must be 'auto' or a positive int up to sys.maxsize, got "
                     f"{_shown(value)}")


def _shown(value: object) -> str:
    """``repr(value)``, cut to 60 characters; an int too long for Python to print (more
    than 4300 digits) by its size."""
    if isinstance(value, int) and value.bit_length() > 14_000:
        return f"an int of {value.bit_length()} bits"
    return f"{value!r:.60}"


def check_positive_int(name: str) -> Callable[[object], int | None]:
    def check_int(value: object) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        return value
    return check_int


def check_temp_folder(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"temp_folder must be None or a path, got {type(value).__name__} "
                        f"{value!r:.60}")
    return str(os.fspath(value))


def _is_real(value: object) -> TypeGuard[numbers.Real]:
    """``isinstance(value, numbers.Real)`` (numpy's numbers too). :mod:`numbers` costs an
    import ~0.8 ms: only for a type other than int, float, str and None."""
    if type(value) in (int, float):
        return True
    if type(value) in (str, type(None)):
        return False
    import numbers  # stdlib

    return isinstance(value, numbers.Real)


def _as_float(value: numbers.Real) -> float:
    """``float(value)``, infinite for an int too large for a float."""
    try:
        return float(value)
    except OverflowError:
        return -math.inf if value < 0 else math.inf


def _is_integral(value: object) -> TypeGuard[numbers.Integral]:
    """``isinstance(value, numbers.Integral)``, as :func:`_is_real`."""
    if type(value) is int:
        return True
    if type(value) in (str, float, type(None)):
        return False
    import numbers  # stdlib

    return isinstance(value, numbers.Integral)


_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}


def _size_in_bytes(text: str) -> int | None:
    """'1M', '500K', '2G', '1.5 MB', '100' (binary units) in bytes, or None. Read by hand:
    compiling a regular expression for it cost every process ~0.3 ms."""
    text = text.strip().upper()
    if text.endswith("B"):
        text = text[:-1]
    unit = text[-1:] if text[-1:] in ("K", "M", "G") else ""
    whole, dot, fraction = text[:len(text) - len(unit)].rstrip().partition(".")
    if not whole.isdecimal() or dot and not fraction.isdecimal():
        return None
    scale, denominator = _UNITS[unit], int(10 ** len(fraction))
    try:  # exact: a float loses bytes beyond 2**53, and overflows
        return int(whole) * scale + int(fraction or "0") * scale // denominator
    except ValueError:  # more digits than int() converts (4300)
        return None


def parse_size(value: object, name: str = "max_nbytes") -> int | None:
    """None, a byte count, or a size such as '1M', '500K', '2G' (binary units)."""
    if value is None:
        return None
    if _is_integral(value) and not isinstance(value, bool) and int(value) >= 0:
        return int(value)
    if isinstance(value, str):
        size = _size_in_bytes(value)
        if size is not None:
            return size
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
        factor = _times_n_jobs(value)  # the usual "2 * n_jobs": no ast import
        number = factor * n_jobs if factor is not None else _eval_expression(value, n_jobs)
    elif isinstance(value, (int, float)):
        number = value
    else:
        raise TypeError(f"pre_dispatch must be 'all', a positive int or an expression of "
                        f"n_jobs such as '2*n_jobs', got {type(value).__name__} {value!r:.40}")
    if isinstance(number, float) and not math.isfinite(number) or int(number) < 1:
        raise ValueError(f"pre_dispatch={value!r} gives {number!r} batches for n_jobs={n_jobs}; "
                         f"it must be at least 1")
    return int(number)


def _times_n_jobs(text: str) -> int | None:
    """``k`` of the usual ``"k * n_jobs"``, else None (read by hand, as ``_size_in_bytes``)."""
    factor, star, rest = text.partition("*")
    factor = factor.strip()
    if star and rest.strip() == "n_jobs" and factor.isascii() and factor.isdigit() \
            and len(factor) <= 4300:  # what int() converts
        return int(factor)
    return None


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


def check_progress(value: object) -> object:
    if value is None or isinstance(value, bool):
        return bool(value)
    if callable(value):  # a tqdm-compatible class, or callable(done, total)
        return value
    raise TypeError(f"progress must be True, False, a tqdm-compatible class (such as "
                    f"tqdm.notebook.tqdm) or a callable(done, total), got "
                    f"{type(value).__name__} {value!r:.60}")


def check_insights(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"insights must be True or False, got {type(value).__name__} "
                        f"{value!r:.60}")
    return value


def check_pre_dispatch(value: object) -> object:
    parse_pre_dispatch(value, 1)  # fail early on a malformed value; parsed per call
    return value
