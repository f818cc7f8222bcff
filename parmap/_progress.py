"""Progress: joblib-style lines for ``verbose``, and the live bar of ``progress=``.

``verbose`` 1-9 prints when the number of finished tasks doubles (1, 2, 4, 8, ...),
10 and above after every batch; every level prints a closing line, on stderr (stdout
above 50). The total is unknown for a generator until it is exhausted, so remaining time
is only estimated once it is.

``progress=`` makes a :class:`Bar`, updated in the consumer's thread after each completed
batch (tasks run inline: at most every ``INLINE_INTERVAL``), so it costs nothing per
task::

    True            tqdm (a notebook widget under Jupyter) when it is installed,
                    else PlainBar: one line on stderr, redrawn in place on a terminal
    a class         a tqdm-compatible class, e.g. tqdm.rich.tqdm: TqdmBar drives it
    a callable      called as callable(done, total) after each update and at the end
                    (total is None until the input is exhausted)

Every bar learns the total when the input ends, and closes on the final count when the
call finishes (left as it was when the call fails or is cancelled).
"""
from __future__ import annotations

import sys
from time import monotonic
from typing import Any, Callable, Protocol

__all__ = ["Progress", "Bar", "PlainBar", "TqdmBar", "CallbackBar", "make_bar",
           "INLINE_INTERVAL"]

#: seconds between two updates of a bar while tasks run inline (n_jobs=1)
INLINE_INTERVAL = 0.05


class _Counts(Protocol):
    """What the dispatcher tells about a call in progress."""

    n_completed: int
    n_tasks: int | None


def _fmt(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


def print_line(verbose: float, line: str) -> None:
    """A ``verbose`` line: on stderr, on stdout above 50 (as joblib)."""
    print(line, file=sys.stdout if verbose > 50 else sys.stderr, flush=True)


class Progress:
    """The ``verbose`` lines, in joblib's words (``Done  40 out of 100 | elapsed: ...``),
    the counts padded to one width so that the lines align. ``write`` prints a line
    (``Parallel._print``, which a subclass may override as in joblib)."""

    def __init__(self, verbose: float, n_jobs: int, backend_name: str,
                 write: Callable[[str], None] | None = None):
        self.verbose = verbose
        self.prefix = f"[Parallel(n_jobs={n_jobs}, backend={backend_name})]"
        self.start = monotonic()
        self._next_report = 1
        self._print = write

    def _write(self, text: str) -> None:
        line = f"{self.prefix}: {text}"
        if self._print is None:
            print_line(self.verbose, line)
        else:
            self._print(line)

    def update(self, done: int, total: int | None) -> None:
        if self.verbose < 10 and done < self._next_report:
            return
        while self._next_report <= done:
            self._next_report *= 2
        elapsed = monotonic() - self.start
        if total:
            remaining = elapsed / done * (total - done) if done else 0.0
            width = max(3, len(str(total)))
            self._write(f"Done {done:{width}d} out of {total:{width}d} | elapsed: "
                        f"{_fmt(elapsed)} remaining: {_fmt(remaining)}")
        else:
            self._write(f"Done {done:3d} tasks | elapsed: {_fmt(elapsed)}")

    def finish(self, done: int) -> None:
        width = max(3, len(str(done)))
        self._write(f"Done {done:{width}d} out of {done:{width}d} | elapsed: "
                    f"{_fmt(monotonic() - self.start)} finished")

    def __call__(self, dispatcher: _Counts) -> None:
        """Dispatcher hook: called in the consumer's thread after each completed batch."""
        self.update(dispatcher.n_completed, dispatcher.n_tasks)


# ---------------------------------------------------------------------- progress bars

class Bar(Protocol):
    def update(self, done: int, total: int | None) -> None:
        """``done`` tasks finished so far, of ``total`` (None while unknown)."""

    def close(self, done: int | None) -> None:
        """The call finished with ``done`` tasks, or (None) failed or was cancelled."""


def make_bar(spec: object, total: int | None, desc: str = "Parallel") -> Bar | None:
    """The bar a ``progress`` setting asks for (None: no bar)."""
    if spec is None or spec is False:
        return None
    if spec is True:
        if sys.stderr is None:  # pythonw, some services: nowhere to draw it
            return None
        cls = _default_tqdm()
        return PlainBar(desc) if cls is None else TqdmBar(cls, total, desc)
    if isinstance(spec, type):
        return TqdmBar(spec, total, desc)
    return CallbackBar(spec)  # type: ignore[arg-type]  # checked by the setting


def _default_tqdm() -> Any:
    """tqdm's console bar, or its notebook widget under Jupyter; None without tqdm.
    (Not tqdm.auto: it imports asyncio, 40 ms more at the first bar.)"""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    if "ipykernel" in sys.modules:
        try:
            import ipywidgets  # noqa: F401  (the notebook bar needs it)
            from IPython import get_ipython
            from tqdm.notebook import tqdm as notebook_tqdm

            if type(get_ipython()).__name__ == "ZMQInteractiveShell":
                return _quiet(notebook_tqdm)
        except Exception:
            pass
    return _quiet(tqdm)


_quiet_tqdm: dict[type, type] = {}


def _quiet(cls: type) -> type:
    """``cls`` without its monitor thread: a live thread would make the pool start its
    workers by forkserver instead of fork (see ``process.spawn``), and we update the bar
    ourselves anyway."""
    quiet = _quiet_tqdm.get(cls)
    if quiet is None:
        quiet = _quiet_tqdm[cls] = type(cls.__name__, (cls,), {"monitor_interval": 0})
    return quiet


class TqdmBar:
    """Drives a tqdm(-compatible) bar: ``cls(total=, desc=, unit=)``, ``update(n)``,
    the ``total`` and ``n`` attributes, ``refresh()`` and ``close()``."""

    def __init__(self, cls: Callable[..., Any], total: int | None, desc: str):
        self.bar = cls(total=total, desc=desc, unit="task")

    def update(self, done: int, total: int | None) -> None:
        bar = self.bar
        if total is not None and bar.total != total:
            bar.total = total  # the input just ended
            if done == bar.n:
                bar.refresh()
        if done > bar.n:
            bar.update(done - bar.n)

    def close(self, done: int | None) -> None:
        if done is not None:
            self.update(done, done)
        self.bar.close()


class CallbackBar:
    """Calls ``callback(done, total)`` when the count changes, and once at the end."""

    def __init__(self, callback: Callable[[int, int | None], object]):
        self.callback = callback
        self._last: tuple[int, int | None] = (-1, None)

    def update(self, done: int, total: int | None) -> None:
        if (done, total) != self._last:
            self._last = (done, total)
            self.callback(done, total)

    def close(self, done: int | None) -> None:
        if done is not None:
            self.update(done, done)


#: seconds between redraws of the plain bar: on a terminal, and in a log (no terminal)
TTY_INTERVAL = 0.1
LOG_INTERVAL = 10.0


class PlainBar:
    """One line on stderr: ``Parallel  40%|######     | 400/1000 [00:02<00:03, 195 tasks/s]``,
    redrawn in place on a terminal; elsewhere (a log, a pipe) a line every
    ``LOG_INTERVAL`` seconds and the final one."""

    WIDTH = 24

    def __init__(self, desc: str = "Parallel", interval: float | None = None):
        self.desc = desc
        self.start = monotonic()
        self._tty = _isatty(sys.stderr)
        self.interval = interval if interval is not None else \
            TTY_INTERVAL if self._tty else LOG_INTERVAL
        self._next = 0.0  # the first update draws
        self._drawn = 0  # length of the line on screen (terminal)

    def update(self, done: int, total: int | None) -> None:
        now = monotonic()
        if now >= self._next:
            self._next = now + self.interval
            self._draw(self.line(done, total, now - self.start), final=False)

    def close(self, done: int | None) -> None:
        if done is not None:
            self._draw(self.line(done, done, monotonic() - self.start), final=True)
        elif self._drawn:
            self._write("\n")

    def line(self, done: int, total: int | None, elapsed: float) -> str:
        rate = done / elapsed if elapsed > 0 else 0.0
        speed = _rate(rate)
        if total is None:
            return f"{self.desc} {done} tasks [{_clock(elapsed)}, {speed}]"
        fraction = min(done / total, 1.0) if total else 1.0
        filled = int(fraction * self.WIDTH)
        eta = _clock((total - done) / rate) if rate > 0 else "?"
        return (f"{self.desc} {int(fraction * 100):3d}%|{'#' * filled}"
                f"{' ' * (self.WIDTH - filled)}| {done}/{total} "
                f"[{_clock(elapsed)}<{eta}, {speed}]")

    def _draw(self, text: str, final: bool) -> None:
        if self._tty:
            pad = " " * max(self._drawn - len(text), 0)
            self._drawn = len(text)
            self._write(f"\r{text}{pad}" + ("\n" if final else ""))
        else:
            self._drawn = len(text)
            self._write(text + "\n")

    @staticmethod
    def _write(text: str) -> None:
        stream = sys.stderr  # looked up each time: the caller may redirect it (or close)
        if stream is None:
            return
        stream.write(text)
        stream.flush()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


def _rate(per_second: float) -> str:
    if per_second >= 1 or per_second == 0:
        return f"{per_second:.1f} tasks/s" if per_second < 100 else \
            f"{per_second:,.0f} tasks/s"
    return f"{1 / per_second:.1f} s/task"
