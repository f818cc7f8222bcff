"""Public exceptions and the transport of task errors from workers to the caller.

Exception tree::

    ParmapError                       base of every error parmap itself raises
    ├── PoolError                     the worker pool failed, not the task's own code
    │   ├── WorkerCrashedError        a worker died (segfault, os._exit, SIGKILL, OOM)
    │   │                             alias: TerminatedWorkerError (joblib's name)
    │   └── TaskTimeoutError          a task ran past ``timeout`` (also a TimeoutError)
    ├── SerializationError            a function, argument or result could not be pickled
    │                                 (also a pickle.PicklingError)
    └── RemoteTaskError               a task raised an exception that could not be rebuilt
                                      in the caller; carries its type name, message and
                                      formatted traceback

A task's own exception is never wrapped in one of these: the caller gets the original
exception type, with the worker's traceback attached and a note naming the task.

How an exception travels (process backend)::

    worker: task raises ──> capture(exc) ──> pickled with tblib's traceback support
                                 │               (falls back to text if it can't be
                                 │                pickled *and* unpickled)
    caller: rebuild() <──────────┘
            the original exception: its type, __traceback__ with the worker frames
            (tblib), the note "parmap: raised by task 17: f(3)"; only an exception sent
            as text becomes a RemoteTaskError, whose __cause__ is a RemoteTraceback
"""
from __future__ import annotations

import pickle
import reprlib
from typing import Any, Callable

from ._public import public

__all__ = [
    "timeout_error", "initializer_timeout_error", "call_repr", "add_note", "func_name",
    "add_task_note", "CapturedError",
    "ParmapError",
    "PoolError",
    "WorkerCrashedError",
    "TerminatedWorkerError",
    "TaskTimeoutError",
    "SerializationError",
    "RemoteTaskError",
    "RemoteTraceback",
]


@public
class ParmapError(Exception):
    """Base class of the errors raised by parmap itself."""


@public
class PoolError(ParmapError):
    """The worker pool failed while running tasks (not the tasks' own code)."""


@public
class WorkerCrashedError(PoolError):
    """A worker process died while running tasks.

    ``exitcode`` is the worker's exit status (negative: killed by that signal) and
    ``task_indices`` the indices of the tasks of the batch it was running, whose results
    are lost. The message names the task that was running where the worker published
    it (tasks of a millisecond or more, or under a timeout).
    """

    def __init__(self, message: str, exitcode: int | None = None,
                 task_indices: tuple[int, ...] = ()):
        super().__init__(message)
        self.exitcode = exitcode
        self.task_indices = task_indices

    def __reduce__(self):
        return type(self), (self.args[0], self.exitcode, self.task_indices)


#: joblib's name for the same failure, so ``except TerminatedWorkerError`` keeps working.
TerminatedWorkerError = WorkerCrashedError


@public
class TaskTimeoutError(PoolError, TimeoutError):
    """A task ran for longer than the ``timeout`` given to :class:`~parmap.Parallel`.

    The instances parmap raises are also ``multiprocessing.TimeoutError``, as joblib's."""


@public
class SerializationError(ParmapError, pickle.PicklingError, TypeError):
    """A task's function, argument or result could not be pickled or unpickled.

    Also a ``pickle.PicklingError`` and a ``TypeError`` (what pickle itself raises for
    an object it cannot pickle): joblib's loky raises the first for an argument and the
    second for a result, ``multiprocessing`` a ``TypeError`` for an argument, and
    ``except`` clauses written for either keep working."""


@public
class RemoteTaskError(ParmapError):
    """A task raised an exception that could not be sent back as itself.

    ``exc_type`` is the qualified name of the original exception type and
    ``remote_traceback`` the traceback text formatted in the worker.
    """

    def __init__(self, message: str, exc_type: str = "", remote_traceback: str = ""):
        super().__init__(message)
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback

    def __reduce__(self):
        return type(self), (self.args[0], self.exc_type, self.remote_traceback)


@public
class RemoteTraceback(Exception):
    """Carries the traceback text of a worker; the ``__cause__`` of a RemoteTaskError."""

    def __init__(self, tb_text: str):
        super().__init__(tb_text)
        self.tb_text = tb_text

    def __str__(self) -> str:
        return f'\n"""\n{self.tb_text}"""'


# --------------------------------------------------------------------------- call reprs

_short_repr = reprlib.Repr()
_short_repr.maxstring = 40
_short_repr.maxother = 40
_short_repr.maxlist = _short_repr.maxtuple = _short_repr.maxdict = 4
_short_repr.maxlevel = 2


def func_name(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    if not isinstance(name, str):
        return type(func).__name__
    return name.rpartition("<locals>.")[2]  # "outer.<locals>.f" reads better as "f"


def call_repr(func: Any, args: tuple, kwargs: dict) -> str:
    """A short, safe repr of a call such as ``f(1, 'a', key=[1, 2, 3, 4, ...])``."""
    parts = []
    for value in args:
        parts.append(_safe_repr(value))
    for key, value in kwargs.items():
        parts.append(f"{key}={_safe_repr(value)}")
    text = ", ".join(parts)
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{func_name(func)}({text})"


def _safe_repr(value: Any) -> str:
    try:
        return _short_repr.repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        return f"<{type(value).__name__} object>"


def timeout_error(index: int, task: tuple, timeout: float | None,
                  what_happened: str) -> TaskTimeoutError:
    """The error for task ``index`` running past ``timeout``, in one wording everywhere.

    It is a ``TaskTimeoutError`` (so a ``TimeoutError``) and a
    ``multiprocessing.TimeoutError``, which joblib raises and its users catch. The class
    with the second base is made on the first timeout: importing :mod:`multiprocessing`
    up front would add ~5 ms to ``import parmap``.
    """
    return _timeout_class()(
        f"task {index} ({call_repr(*task)}) has run for more than timeout={timeout}s; "
        f"{what_happened}. Raise the timeout, or split the task into smaller ones.")


def initializer_timeout_error(index: int, task: tuple, timeout: float | None, pid: int | None
                              ) -> TaskTimeoutError:
    """The error for a worker whose initializer ran past ``timeout``, while task
    ``index`` waited on it (the same class as :func:`timeout_error`'s)."""
    return _timeout_class()(
        f"the pool's initializer has run for more than timeout={timeout}s in a worker "
        f"(pid {pid}), so task {index} ({call_repr(*task)}) could not start; its worker "
        f"was stopped and the call cancelled. The initializer has the call's timeout, "
        f"counted from its own start: raise the timeout, or make the initializer quicker.")


_timeout_classes: list[type[TaskTimeoutError]] = []


def _timeout_class() -> type[TaskTimeoutError]:
    if not _timeout_classes:
        import multiprocessing  # stdlib: see timeout_error

        cls = type("TaskTimeoutError", (TaskTimeoutError, multiprocessing.TimeoutError),
                   {"__module__": TaskTimeoutError.__module__, "__doc__": TaskTimeoutError.__doc__,
                    "__reduce__": lambda self: (timeout_error_from_text, self.args)})
        _timeout_classes.append(cls)
    return _timeout_classes[0]


def timeout_error_from_text(message: str) -> TaskTimeoutError:
    """Rebuild a pickled timeout error (its class is made at run time)."""
    return _timeout_class()(message)


def add_task_note(exc: BaseException, index: int, task: tuple) -> None:
    """Attach "parmap: raised by task 17: f(3)" to ``exc`` (shown by Python 3.11+)."""
    func, args, kwargs = task
    add_note(exc, f"parmap: raised by task {index}: {call_repr(func, args, kwargs)}")


def add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc`` once (``__notes__``; Python 3.10 has no add_note)."""
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        if note not in notes:
            notes.append(note)
    elif notes is None:
        try:
            exc.__notes__ = [note]  # type: ignore[attr-defined]  # 3.10 has no add_note
        except Exception:  # an exception class that forbids attributes
            pass


# --------------------------------------------------------------------------- transport

class CapturedError:
    """An exception captured in a worker, ready to be pickled back to the caller."""

    __slots__ = ("payload", "is_text", "tb_text", "index")

    def __init__(self, payload: Any, is_text: bool, tb_text: str, index: int):
        self.payload = payload
        self.is_text = is_text
        self.tb_text = tb_text
        self.index = index

    def __reduce__(self) -> tuple[type[CapturedError], tuple[Any, bool, str, int]]:
        return CapturedError, (self.payload, self.is_text, self.tb_text, self.index)

    @classmethod
    def capture(cls, exc: BaseException, index: int,
                dumps: Callable[[object], bytes]) -> CapturedError:
        """Capture ``exc`` raised by task ``index``; ``dumps`` is the pickler to check with."""
        import traceback  # only when a task fails: ~4 ms of imports spared at start-up

        tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            from tblib import pickling_support

            pickling_support.install(exc)
            pickle.loads(dumps(exc))  # rebuilding in the caller must work too
            return cls(exc, False, tb_text, index)
        except Exception:
            pass
        try:  # the frames may be what fails (a RecursionError's thousand): send it bare,
            # its traceback as text (rebuild attaches it)
            exc.__traceback__ = exc.__cause__ = exc.__context__ = None
            pickle.loads(dumps(exc))
            return cls(exc, False, tb_text, index)
        except Exception:
            text = (f"{type(exc).__module__}.{type(exc).__qualname__}", _safe_str(exc))
            return cls(text, True, tb_text, index)

    def rebuild(self) -> BaseException:
        """The exception to raise in the caller."""
        if self.is_text:
            type_name, message = self.payload
            exc = RemoteTaskError(
                f"task {self.index} raised {type_name}: {message} (the exception could not "
                f"be sent back as itself, so parmap re-raises it as text; its worker "
                f"traceback is attached)", type_name, self.tb_text)
            exc.__cause__ = RemoteTraceback(self.tb_text)
            return exc
        # tblib rebuilt the worker frames into exc.__traceback__: raising it shows them
        # below the caller's frames, and pdb.post_mortem() can walk them.
        exc_obj: BaseException = self.payload
        if exc_obj.__traceback__ is None and exc_obj.__cause__ is None and self.tb_text:
            exc_obj.__cause__ = RemoteTraceback(self.tb_text)  # sent without its frames
        return exc_obj


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<str() of {type(exc).__name__} failed>"
