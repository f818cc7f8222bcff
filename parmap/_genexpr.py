"""Recognising ``delayed(f)(x) for x in xs``, to read its tasks without running it.

In the usual idiom the generator expression costs the caller a resumption and two Python
calls per task: more than everything else parmap does for a tiny task. When the input of
a call is exactly that expression, not yet started, and its ``delayed`` is parmap's, the
dispatcher instead reads the ``x``'s straight from the iterator the expression loops over
(at C speed, with ``itertools.islice``) and sends ``f`` with them: the tasks the
expression would have produced, without producing them.

The expression is recognised by comparing its bytecode with that of a reference
expression compiled by this same interpreter, so no table of opcodes per Python version
is kept here. Only the two names it loads may differ: ``delayed`` and ``f`` may each be a
global, a builtin, a variable of an enclosing function, or an attribute chain on one of
those (``parmap.delayed``, ``np.linalg.norm``). Anything else (a condition, two loop
variables, more arguments, keywords, a generator already started) is read the usual way,
as is an expression whose names cannot be looked up now.

What differs from running the expression: ``delayed`` and ``f`` are looked up once per
call instead of once per task, and the expression object is never started (its iterator
is consumed instead, as far as the call reads).
"""
from __future__ import annotations

from functools import cache
from types import CodeType, GeneratorType
from typing import Any, Callable, Iterator

from ._delayed import delayed

__all__ = ["delayed_calls"]

#: instructions that do not change what the expression computes (cache entries, resume
#: points, the NULL pushed before a call, copying the closure in)
_NOISE = frozenset({"CACHE", "RESUME", "PRECALL", "PUSH_NULL", "NOP", "EXTENDED_ARG",
                    "COPY_FREE_VARS", "MAKE_CELL"})
_NAMES = frozenset({"LOAD_GLOBAL", "LOAD_DEREF", "LOAD_CLASSDEREF", "LOAD_FROM_DICT_OR_DEREF"})
_ATTRS = frozenset({"LOAD_ATTR", "LOAD_METHOD"})
#: Python 3.10 calls a method it loaded with its own instruction; the call is the same
_SAME = {"CALL_METHOD": "CALL_FUNCTION"}

#: a name looked up by the expression: (opcode name, name, attribute chain)
_Lookup = tuple[str, str, tuple[str, ...]]
_SLOT = ("<lookup>",)  # where the reference has a lookup, the expression may have any

_REFERENCE = next(c for c in compile("(_delayed(_f)(_x) for _x in _xs)", "<parmap>",
                                     "eval").co_consts if isinstance(c, CodeType))


def _shape(code: CodeType) -> tuple[list[tuple], list[_Lookup]]:
    """The instructions of ``code`` that matter, each lookup replaced by ``_SLOT``,
    and the lookups in order."""
    import dis  # stdlib, but 1-2 ms: the usual expression, of two globals, needs none

    ops: list[tuple] = []
    lookups: list[_Lookup] = []
    for ins in dis.get_instructions(code):
        name = _SAME.get(ins.opname, ins.opname)
        if name in _NOISE:
            continue
        if name in _ATTRS and ops and ops[-1] is _SLOT:
            kind, base, attrs = lookups[-1]
            lookups[-1] = (kind, base, attrs + (ins.argval,))
        elif name in _NAMES:
            ops.append(_SLOT)
            lookups.append((name, ins.argval, ()))
        elif ins.opcode in dis.hasjrel or ins.opcode in dis.hasjabs:
            ops.append((name,))  # targets move with the length of the lookups
        else:
            ops.append((name, ins.argval if ins.opcode in dis.hasconst else ins.arg))
    return ops, lookups


@cache
def _reference_ops() -> list[tuple]:
    return _shape(_REFERENCE)[0]


_seen: dict[CodeType, list[_Lookup] | None] = {}  # code -> its two lookups, or None


def _lookups(code: CodeType) -> list[_Lookup] | None:
    try:
        return _seen[code]
    except KeyError:
        pass
    ref = _REFERENCE
    if code.co_code == ref.co_code and code.co_consts == ref.co_consts and \
            len(code.co_names) == 2 and getattr(code, "co_exceptiontable", None) == \
            getattr(ref, "co_exceptiontable", None):  # the table: Python 3.11+
        # the reference itself, other names: two globals, the usual case
        found: list[_Lookup] | None = [("LOAD_GLOBAL", name, ()) for name in code.co_names]
    else:
        ops, lookups = _shape(code)
        found = lookups if ops == _reference_ops() and len(lookups) == 2 else None
    if len(_seen) >= 256:  # expressions written in a loop of exec: keep the cache small
        _seen.clear()
    _seen[code] = found
    return found


def _look_up(lookup: _Lookup, frame: Any) -> Any:
    """The value of one lookup in ``frame``; KeyError or AttributeError if none now."""
    kind, name, attrs = lookup
    if kind == "LOAD_GLOBAL":
        value = frame.f_globals[name] if name in frame.f_globals else frame.f_builtins[name]
    else:
        value = frame.f_locals[name]  # an enclosing function's variable
    for attr in attrs:
        value = getattr(value, attr)
    return value


def delayed_calls(iterable: object) -> tuple[Callable[..., Any], Iterator[Any]] | None:
    """``(f, the iterator of x's)`` when ``iterable`` is ``delayed(f)(x) for x in xs``
    written as a generator expression and not started; else None."""
    if type(iterable) is not GeneratorType or iterable.gi_running:
        return None
    frame = iterable.gi_frame
    if frame is None or getattr(iterable, "gi_suspended", frame.f_lasti != -1):
        return None  # finished or started (gi_suspended: Python 3.11+)
    lookups = _lookups(iterable.gi_code)
    if lookups is None:
        return None
    try:
        if _look_up(lookups[0], frame) is not delayed:
            return None  # before looking f up: an attribute chain may run code
        func = _look_up(lookups[1], frame)
        xs = frame.f_locals[".0"]  # the iterator the expression loops over
    except Exception:  # a name not bound yet: running the expression will say so
        return None
    return (func, xs) if callable(func) else None
