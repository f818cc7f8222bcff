"""The context variable behind ``parallel_config``: the one piece of state shared by the
settings layer (which reads and sets it) and the code that runs tasks (which applies the
settings a nested call should see).

A leaf module: it imports nothing from parmap. That is why it is separate from
``_settings``, which sits above the backend registry (it checks backend names): the
safe-call wrapper in ``_delayed`` and the worker processes apply nested settings through
this module without importing the front end.

The value is a dict of settings already checked by ``_settings``; the key
``"nesting_level"`` counts how deep in nested ``Parallel`` calls the current code runs.
"""
from __future__ import annotations

from contextvars import ContextVar, Token
from typing import Any, Mapping

__all__ = ["CONFIG", "push", "pop"]

CONFIG: ContextVar[Mapping[str, Any]] = ContextVar("parmap_config", default={})


def push(settings: Mapping[str, Any]) -> Token:
    """Layer ``settings`` over the current ones; ``pop(token)`` undoes it."""
    current = CONFIG.get()
    return CONFIG.set({**current, **settings} if current else dict(settings))


def pop(token: Token) -> None:
    CONFIG.reset(token)
