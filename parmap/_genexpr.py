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
as is an expression whose names cannot be looked up now. The one argument may also be a
plain name or a literal instead of the loop variable (``_FORMS``); over a range, list or
tuple the number of tasks is then known at once.

What differs from running the expression: ``delayed``, ``f`` and a name given as the
argument are looked up once per call instead of once per task, and the expression
object is never started (its iterator is consumed instead, as far as the call reads).
"""
from __future__ import annotations

from functools import cache
from itertools import repeat
from operator import itemgetter, length_hint
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
#: iterators whose length hint is exact: the number of tasks is then known at once
_EXACT = frozenset({type(iter(range(0))), type(iter(range(2 ** 64))), type(iter([])),
                    type(iter(()))})

#: a value the expression looks up: (opcode name, name, attribute chain), or for a
#: literal argument ("LOAD_CONST", the value, ())
_Lookup = tuple[str, Any, tuple[str, ...]]
_SLOT = ("<lookup>",)  # where the reference has a lookup, the expression may have any
_LITERAL = "<parmap: any literal>"  # where the reference has it, any literal matches

#: the recognised forms, by what the task's one argument is: the loop variable, a name
#: looked up once (a plain name: an attribute may change at every access), or a literal
_FORMS = {"loop": "(_delayed(_f)(_x) for _x in _xs)",
          "name": "(_delayed(_f)(_a) for _x in _xs)",
          "literal": f"(_delayed(_f)({_LITERAL!r}) for _x in _xs)"}


def _compiled(source: str) -> CodeType:
    module = compile(source, "<parmap>", "eval")
    return next(c for c in module.co_consts if isinstance(c, CodeType))


_REFERENCE = _compiled(_FORMS["loop"])  # its bytecode is the usual expression's


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
def _reference_shapes() -> list[tuple[list[tuple], int]]:
    """Per form: its instructions and how many lookups it has."""
    shapes = [_shape(_compiled(source)) for source in _FORMS.values()]
    return [(ops, len(lookups)) for ops, lookups in shapes]


#: what was found in an expression: the lookups of ``delayed`` and ``f``, and how its
#: argument is found (None: it is the loop variable)
_Found = tuple[list[_Lookup], _Lookup | None]
_seen: dict[CodeType, _Found | None] = {}


def _match(code: CodeType) -> _Found | None:
    ops, lookups = _shape(code)
    for ref_ops, n_lookups in _reference_shapes():
        if len(ops) != len(ref_ops) or len(lookups) != n_lookups:
            continue
        literal: _Lookup | None = None
        for mine, ref in zip(ops, ref_ops):
            if ref == ("LOAD_CONST", _LITERAL) and mine[0] == "LOAD_CONST":
                literal = ("LOAD_CONST", mine[1], ())
            elif mine != ref:
                break
        else:
            if n_lookups == 3 and lookups[2][2]:
                return None  # an attribute may differ at every access (a property)
            return lookups[:2], lookups[2] if n_lookups == 3 else literal
    return None


def _found(code: CodeType) -> _Found | None:
    try:
        return _seen[code]
    except KeyError:
        pass
    ref = _REFERENCE
    found: _Found | None
    if code.co_code == ref.co_code and code.co_consts == ref.co_consts and \
            len(code.co_names) == 2 and getattr(code, "co_exceptiontable", None) == \
            getattr(ref, "co_exceptiontable", None):  # the table: Python 3.11+
        # the reference itself, other names: two globals, the usual case
        found = [("LOAD_GLOBAL", name, ()) for name in code.co_names], None
    else:
        found = _match(code)
    if len(_seen) >= 256:  # expressions written in a loop of exec: keep the cache small
        _seen.clear()
    _seen[code] = found
    return found


def _look_up(lookup: _Lookup, frame: Any) -> Any:
    """The value of one lookup in ``frame``; KeyError or AttributeError if none now."""
    kind, name, attrs = lookup
    if kind == "LOAD_CONST":
        return name
    if kind == "LOAD_GLOBAL":
        value = frame.f_globals[name] if name in frame.f_globals else frame.f_builtins[name]
    else:
        value = frame.f_locals[name]  # an enclosing function's variable
    for attr in attrs:
        value = getattr(value, attr)
    return value


def delayed_calls(iterable: object
                  ) -> tuple[Callable[..., Any], Iterator[Any], int | None] | None:
    """``(f, an iterator of the tasks' arguments, their number if known now)`` when
    ``iterable`` is a generator expression ``delayed(f)(a) for x in xs``, not started,
    whose ``a`` is ``x``, a name or a literal; else None."""
    if type(iterable) is not GeneratorType or iterable.gi_running:
        return None
    frame = iterable.gi_frame
    if frame is None or getattr(iterable, "gi_suspended", frame.f_lasti != -1):
        return None  # finished or started (gi_suspended: Python 3.11+)
    found = _found(iterable.gi_code)
    if found is None:
        return None
    (wrapper, function), argument = found
    try:
        if _look_up(wrapper, frame) is not delayed:
            return None  # before looking f up: an attribute chain may run code
        func = _look_up(function, frame)
        value = _look_up(argument, frame) if argument is not None else None
        xs = frame.f_locals[".0"]  # the iterator the expression loops over
    except Exception:  # a name not bound yet: running the expression will say so
        return None
    if not callable(func):
        return None
    try:
        n_tasks = length_hint(xs) if type(xs) in _EXACT else None
    except OverflowError:  # a range longer than sys.maxsize
        n_tasks = None
    if argument is not None:  # the same argument for every x, at C speed
        xs = map(itemgetter(0), zip(repeat(value), xs))
    return func, xs, n_tasks
