"""The names users see: a public class or function shows as ``parmap.X`` in reprs,
tracebacks and pickles, not ``parmap._module.X``, however and whenever it was imported
(``parmap/__init__`` resolves those names on first use, PEP 562; pickle finds them
there)."""
from __future__ import annotations

from typing import TypeVar

__all__ = ["public"]

_T = TypeVar("_T")


def public(obj: _T) -> _T:
    """Decorator: ``obj`` is part of parmap's public API (listed in ``parmap.__all__``)."""
    obj.__module__ = "parmap"
    return obj
