"""Task errors reach the caller as themselves, promptly, with the task named."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import pytest

from parmap import Parallel, TaskTimeoutError, delayed


class CustomError(Exception):
    pass


def fail_on(x, bad=3):
    if x == bad:
        raise CustomError(f"bad value {x}")
    return x


def test_original_exception_type_and_note(backend):
    with pytest.raises(CustomError, match="bad value 3") as info:
        Parallel(n_jobs=2, backend=backend)(delayed(fail_on)(i) for i in range(10))
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-1] == "fail_on"  # the traceback ends in the user's function
    if backend != "sequential":
        assert any("task 3: fail_on(3)" in note for note in info.value.__notes__)


def test_sequential_mode_does_not_wrap():
    """n_jobs=1 is the debugging mode: the exception object is untouched."""
    with pytest.raises(CustomError) as info:
        Parallel(n_jobs=1)(delayed(fail_on)(i) for i in range(10))
    assert not getattr(info.value, "__notes__", None)
    assert info.value.__cause__ is None
    tb = info.value.__traceback__
    while tb.tb_next:
        tb = tb.tb_next
    assert tb.tb_frame.f_code.co_name == "fail_on"  # pdb.post_mortem lands here
    assert tb.tb_frame.f_locals["x"] == 3


def test_sequential_mode_runs_in_callers_thread():
    me = threading.get_ident()
    assert Parallel(n_jobs=1)(delayed(threading.get_ident)() for _ in range(3)) == [me] * 3


def test_first_error_wins_without_waiting(parallel_backend):
    started = []

    def task(i):
        started.append(i)
        if i == 0:
            raise CustomError("first")
        time.sleep(0.05)
        return i

    t0 = time.monotonic()
    with pytest.raises(CustomError, match="first"):
        Parallel(n_jobs=2, backend=parallel_backend, batch_size=1, pre_dispatch="all")(
            delayed(task)(i) for i in range(400))
    assert time.monotonic() - t0 < 2.0  # 400 × 50 ms / 2 workers would be 10 s
    assert len(started) < 100


def test_input_iterator_exception_reaches_caller(backend):
    def tasks():
        yield delayed(abs)(-1)
        yield delayed(abs)(-2)
        raise CustomError("the iterator broke")

    with pytest.raises(CustomError, match="the iterator broke"):
        Parallel(n_jobs=2, backend=backend)(tasks())


def test_input_iterator_exception_in_generator_mode(backend):
    def tasks():
        for i in range(5):
            yield delayed(abs)(-i)
        raise KeyError("k")

    gen = Parallel(n_jobs=2, backend=backend, return_as="generator")(tasks())
    with pytest.raises(KeyError):
        list(gen)


def test_exception_inside_generator_consumer_cancels(parallel_backend):
    gate = threading.Event()
    ran = []

    def task(i):
        if i:
            gate.wait(10)
        ran.append(i)
        return i

    def consume():
        for _ in Parallel(n_jobs=2, backend=parallel_backend, return_as="generator",
                          pre_dispatch="all", batch_size=1)(delayed(task)(i)
                                                            for i in range(100)):
            raise CustomError("consumer")

    with pytest.raises(CustomError):
        consume()
    gate.set()
    assert len(ran) <= 3  # task 0 and the ones already running when the consumer raised


def stuck_on_one(release: threading.Event):
    """A task function whose task 1 waits for ``release`` (10 s at most)."""
    def stuck(i):
        if i == 1:
            release.wait(10)
        return i
    return stuck


def test_thread_timeout_raises_timeout_error():
    release = threading.Event()
    stuck = stuck_on_one(release)
    t0 = time.monotonic()
    with pytest.raises(TaskTimeoutError, match=r"task 1 \(stuck\(1\)\).*timeout=0.2") as info:
        Parallel(n_jobs=2, backend="threading", timeout=0.2)(
            delayed(stuck)(i) for i in range(4))
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - t0 < 1.5
    release.set()


def test_leaving_a_with_block_on_a_thread_timeout_does_not_wait_for_the_stuck_task():
    """The timeout, or any error, ends the block at once: the stuck thread is abandoned
    as it is without the block (leaving used to join it)."""
    release = threading.Event()
    stuck = stuck_on_one(release)
    t0 = time.monotonic()
    with pytest.raises(TaskTimeoutError):
        with Parallel(n_jobs=2, backend="threading", timeout=0.2) as parallel:
            parallel(delayed(stuck)(i) for i in range(4))
    assert time.monotonic() - t0 < 1.5
    release.set()


def test_timeout_not_triggered_by_fast_tasks():
    out = Parallel(n_jobs=2, backend="threading", timeout=5)(
        delayed(abs)(-i) for i in range(1000))
    assert out == list(range(1000))


CTRL_C_SCRIPT = textwrap.dedent("""
    import sys, time, threading
    from parmap import Parallel, delayed
    def task(i):
        time.sleep(0.05)
        return i
    print("started", flush=True)
    t0 = time.monotonic()
    try:
        Parallel(n_jobs=2, backend="threading", batch_size=1)(
            delayed(task)(i) for i in range(100000))
    except KeyboardInterrupt:
        print("interrupted after %.2f" % (time.monotonic() - t0), flush=True)
        sys.exit(42)
""")


def test_ctrl_c_stops_threading_run_promptly(tmp_path):
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout.readline().strip() == "started"
        time.sleep(0.3)  # let it get going: we are testing an interrupt mid-run
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 42, out
    assert elapsed < 2.0
