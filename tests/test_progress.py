"""progress=: the plain stderr bar, tqdm, a callable; lists, generators of unknown length,
unordered output; the setting through parallel_config; nested calls draw no bar."""
from __future__ import annotations

import io
import re
import sys

import pytest

from parmap import Parallel, delayed, parallel_config
from parmap import _progress

tqdm_module = pytest.importorskip("tqdm")


def double(x):
    return 2 * x


def tasks(n):
    """A generator: its length is unknown until it ends."""
    for i in range(n):
        yield delayed(double)(i)


def counts(text):
    """(done, total or None) of every bar line in ``text``, in order."""
    found = []
    for line in re.split(r"[\r\n]+", text):
        known = re.search(r"\| (\d+)/(\d+) \[", line)
        unknown = re.search(r"Parallel (\d+) tasks \[", line)
        if known:
            found.append((int(known.group(1)), int(known.group(2))))
        elif unknown:
            found.append((int(unknown.group(1)), None))
    return found


@pytest.fixture
def plain(monkeypatch):
    """No tqdm installed, and the plain bar draws at every update."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setattr(_progress, "LOG_INTERVAL", 0.0)
    monkeypatch.setattr(_progress, "INLINE_INTERVAL", 0.0)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_plain_bar_on_a_list(plain, backend, n_jobs, capfd):
    out = Parallel(n_jobs=n_jobs, backend=backend, batch_size=5, progress=True)(
        [delayed(double)(i) for i in range(50)])
    assert out == [2 * i for i in range(50)]
    seen = counts(capfd.readouterr().err)
    assert seen[-1] == (50, 50)
    assert all(total == 50 for _, total in seen), seen
    done = [d for d, _ in seen]
    assert done == sorted(done) and len(seen) >= 2


def test_plain_bar_final_line(plain, capfd):
    Parallel(n_jobs=2, backend="threading", progress=True)([delayed(double)(i) for i in
                                                             range(7)])
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("Parallel 100%|") and "| 7/7 [" in last and "tasks/s]" in last


def test_plain_bar_learns_the_total_when_the_generator_ends(plain, capfd):
    results = Parallel(n_jobs=2, backend="threading", batch_size=3, return_as="generator",
                       progress=True)(tasks(30))
    assert list(results) == [2 * i for i in range(30)]
    seen = counts(capfd.readouterr().err)
    # at most pre_dispatch (4) batches are read ahead of the consumer: 12 of 30 tasks
    assert seen[0] == (3, None)
    assert seen[-1] == (30, 30)
    done = [d for d, _ in seen]
    assert done == sorted(done)


def test_plain_bar_with_unordered_output(plain, capfd):
    out = Parallel(n_jobs=2, backend="threading", batch_size=4,
                   return_as="generator_unordered", progress=True)(tasks(40))
    assert sorted(out) == [2 * i for i in range(40)]
    seen = counts(capfd.readouterr().err)
    assert seen[-1] == (40, 40)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_plain_bar_on_a_terminal_redraws_one_line(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    bar = _progress.PlainBar(interval=0.0)
    bar.update(3, 10)
    bar.update(6, None)
    bar.close(10)
    text = screen.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert text.count("\r") == 3
    assert text.rstrip().rsplit("\r", 1)[-1].startswith("Parallel 100%|" + "#" * 24 + "| 10/10")


def test_plain_bar_line_formats():
    bar = _progress.PlainBar()
    assert bar.line(5, None, 2.0) == "Parallel 5 tasks [00:02, 2.5 tasks/s]"
    assert bar.line(25, 100, 5.0) == \
        "Parallel  25%|######                  | 25/100 [00:05<00:15, 5.0 tasks/s]"
    assert bar.line(1, 4, 10.0).endswith("[00:10<00:30, 10.0 s/task]")
    assert bar.line(0, 3, 1.0).endswith("[00:01<?, 0.0 tasks/s]")


def test_plain_bar_left_as_it_was_when_the_call_fails(plain, capfd):
    with pytest.raises(ZeroDivisionError):
        Parallel(n_jobs=2, backend="threading", progress=True)(
            delayed(divmod)(1, i) for i in [1, 1, 0])
    assert "100%" not in capfd.readouterr().err


@pytest.mark.parametrize("tqdm_installed", [True, False])
@pytest.mark.parametrize("n_jobs", [1, 2])
def test_no_stderr_means_no_bar_not_a_failed_call(tqdm_installed, n_jobs, monkeypatch):
    # pythonw and some services run with sys.stderr None
    if not tqdm_installed:
        monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setattr(sys, "stderr", None)
    assert Parallel(n_jobs=n_jobs, progress=True)(delayed(double)(i) for i in range(50)) \
        == [2 * i for i in range(50)]


def test_plain_bar_stops_drawing_when_stderr_goes_away(plain, monkeypatch):
    bar = _progress.make_bar(True, 10)
    bar.update(1, 10)
    monkeypatch.setattr(sys, "stderr", None)
    bar.update(2, 10)
    bar.close(10)


class Recorded(tqdm_module.tqdm):
    """A tqdm that writes to a buffer and remembers (n, total) at each update."""

    instances: list = []
    monitor_interval = 0  # no tqdm_monitor thread

    def __init__(self, *args, **kwargs):
        self.buffer = io.StringIO()
        self.updates = []
        super().__init__(*args, file=self.buffer, mininterval=0, **kwargs)
        self.first_total = self.total
        Recorded.instances.append(self)

    def update(self, n=1):
        result = super().update(n)
        self.updates.append((self.n, self.total))
        return result


@pytest.fixture
def recorded():
    Recorded.instances = []
    yield Recorded
    Recorded.instances = []


@pytest.mark.parametrize("return_as", ["list", "generator", "generator_unordered"])
def test_tqdm_class_on_a_list(recorded, backend, return_as):
    out = Parallel(n_jobs=2, backend=backend, batch_size=4, return_as=return_as,
                   progress=recorded)([delayed(double)(i) for i in range(24)])
    assert sorted(out) == [2 * i for i in range(24)]
    (bar,) = recorded.instances
    assert bar.first_total == 24 and (bar.n, bar.total) == (24, 24)
    assert "24/24" in bar.buffer.getvalue()
    assert [n for n, _ in bar.updates] == sorted(n for n, _ in bar.updates)


def test_tqdm_learns_the_total_when_the_generator_ends(recorded):
    out = Parallel(n_jobs=2, backend="threading", batch_size=3, return_as="generator",
                   progress=recorded)(tasks(30))
    assert list(out) == [2 * i for i in range(30)]
    (bar,) = recorded.instances
    assert bar.first_total is None
    assert bar.updates[0] == (3, None)
    assert bar.updates[-1] == (30, 30)
    assert "30/30" in bar.buffer.getvalue()


def test_default_bar_is_tqdm_when_installed(monkeypatch, recorded):
    made = []

    class Fake(Recorded):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm_module, "tqdm", Fake)
    monkeypatch.setattr(_progress, "_quiet_tqdm", {})
    Parallel(n_jobs=2, backend="threading", progress=True)(tasks(5))
    assert made == [{"total": None, "desc": "Parallel", "unit": "task"}]
    (bar,) = recorded.instances
    assert isinstance(bar, Fake) and (bar.n, bar.total) == (5, 5)


def test_the_default_tqdm_bar_starts_no_thread():
    """tqdm's monitor thread would also make the pool start workers by forkserver."""
    import threading

    before = threading.active_count()
    bar = _progress.make_bar(True, 3)
    try:
        bar.update(3, 3)
        assert threading.active_count() == before
        assert isinstance(bar.bar, tqdm_module.tqdm)
    finally:
        bar.bar.disable = True  # nothing on the terminal
        bar.close(None)


@pytest.mark.parametrize("return_as", ["list", "generator"])
@pytest.mark.parametrize("n_jobs", [1, 2])
def test_the_total_of_an_expression_over_a_range_is_known_from_the_start(n_jobs, return_as):
    calls = []
    list(Parallel(n_jobs=n_jobs, backend="threading", return_as=return_as,
                  progress=lambda done, total: calls.append((done, total)))(
        delayed(double)(x) for x in range(10)))
    assert calls and all(total == 10 for _, total in calls)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_callable_gets_done_and_total(backend, n_jobs, monkeypatch):
    monkeypatch.setattr(_progress, "INLINE_INTERVAL", 0.0)
    calls = []
    Parallel(n_jobs=n_jobs, backend=backend, batch_size=2,
             progress=lambda done, total: calls.append((done, total)))(tasks(10))
    assert calls[-1] == (10, 10)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert all(total in (None, 10) for _, total in calls)
    assert len(calls) == len(set(calls))  # called when something changed


def test_parallel_config_gives_a_library_call_a_bar():
    calls = []

    def library_function():  # code that knows nothing of progress bars
        return Parallel(n_jobs=2, backend="threading")(tasks(6))

    with parallel_config(progress=lambda done, total: calls.append((done, total))):
        assert library_function() == [2 * i for i in range(6)]
    assert calls[-1] == (6, 6)
    calls.clear()
    library_function()
    assert calls == []


def outer(i):
    return sum(Parallel(n_jobs=2)(delayed(double)(j) for j in range(3)))


def test_nested_calls_draw_no_bar_of_their_own():
    calls = []
    with parallel_config(progress=lambda done, total: calls.append((done, total))):
        Parallel(n_jobs=2, backend="threading")(delayed(outer)(i) for i in range(4))
    assert calls and all(total in (None, 4) for _, total in calls), calls


@pytest.mark.parametrize("value", [1, "yes", 2.5, object()])
def test_progress_rejects_what_is_not_a_bar(value):
    with pytest.raises(TypeError, match="progress must be True, False, a tqdm"):
        Parallel(progress=value)
    with pytest.raises(TypeError, match="progress must be"):
        parallel_config(progress=value)


def test_progress_none_and_false_mean_no_bar(capfd):
    for value in (None, False):
        Parallel(n_jobs=2, backend="threading", progress=value)(tasks(3))
    assert capfd.readouterr().err == ""
