"""Ctrl-C in the parent and a killed parent: nothing hangs, no worker survives."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from parmap import Parallel, delayed

from .conftest import run_script, shutdown_pools

SCRIPT = textwrap.dedent("""
    import os, sys, time
    from parmap import Parallel, delayed

    def task(seconds):
        time.sleep(seconds)
        return os.getpid()

    def warm():  # warm the pool and report its workers
        pids.update(Parallel(n_jobs=2, batch_size=1)(delayed(task)(0.05) for _ in range(8)))

    pids = set()
    if os.environ.get("WARM_IN_A_THREAD"):  # a thread that ends before the pool does
        import threading

        starter = threading.Thread(target=warm)
        starter.start()
        starter.join()
    else:
        warm()
    print(" ".join(map(str, sorted(pids))), flush=True)
    t0 = time.monotonic()
    try:
        Parallel(n_jobs=2, batch_size=1)(delayed(task)(60) for _ in range(100))
    except KeyboardInterrupt:
        print("interrupted %.3f" % (time.monotonic() - t0), flush=True)
        sys.exit(42)
""")


def _start(tmp_path, start_method: str = "auto", in_a_thread: bool = False):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
           "PARMAP_START_METHOD": start_method, "WARM_IN_A_THREAD": "1" if in_a_thread else ""}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            text=True, env=env)
    line = proc.stdout.readline()
    workers = {int(pid) for pid in line.split()}
    assert len(workers) == 2, line
    return proc, workers


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def _wait_gone(pids, seconds):
    deadline = time.monotonic() + seconds
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling other processes' state, not synchronising ours
    return [pid for pid in pids if not _gone(pid)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_ctrl_c_stops_workers_and_raises_keyboard_interrupt(tmp_path):
    proc, workers = _start(tmp_path)
    try:
        time.sleep(0.3)  # the long tasks are running: that is the situation under test
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 42, out
    assert "interrupted" in out
    assert elapsed < 2.0
    assert _wait_gone(workers, 2.0) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
@pytest.mark.parametrize("start_method, in_a_thread", [
    ("auto", False), ("forkserver", False), ("spawn", True), ("fork", True)])
def test_workers_exit_when_parent_is_killed(tmp_path, start_method, in_a_thread):
    # forked workers get the death signal from the caller; a forkserver's children watch
    # it (the forkserver outlives it while they live), and so do workers that a thread
    # started, which ended since (the death signal would have come as it ended). The
    # caller is checked before it is reaped: a killed process stays a zombie until then,
    # and must count as dead.
    proc, workers = _start(tmp_path, start_method, in_a_thread)
    try:
        time.sleep(0.3)  # workers are in the middle of 60 s tasks
        proc.kill()
        left = _wait_gone(workers, 5.0)  # not reaped yet: the caller is a zombie
    finally:
        for pid in workers:  # survivors would hold its stdout and outlive the test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.communicate(timeout=10)
    assert left == []


def worker_pid(i):
    time.sleep(0.05)
    return os.getpid()


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
@pytest.mark.timeout(60)
def test_workers_started_by_a_thread_outlive_it(start_method):
    # Linux's death signal comes when the thread that forked the worker exits: a pool
    # started by a short-lived thread (a server's request thread) must keep its workers
    shutdown_pools()  # a new pool, started by the thread below
    first: set = set()

    def call():
        first.update(Parallel(n_jobs=2, start_method=start_method)(
            delayed(worker_pid)(i) for i in range(4)))

    starter = threading.Thread(target=call)
    starter.start()
    starter.join()
    time.sleep(0.3)  # time for a death signal to kill them (it takes microseconds)
    later = set(Parallel(n_jobs=2, start_method=start_method)(
        delayed(worker_pid)(i) for i in range(4)))
    assert later == first


CTRL_C_DURING_START = textwrap.dedent("""
    import multiprocessing, os, signal, sys, threading, time
    from multiprocessing.process import BaseProcess
    import parmap
    from parmap import Parallel, delayed

    start_method, handler = sys.argv[1:]
    if start_method == "forkserver":  # as in a notebook: a thread, so no fork
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    caught, starts = [], []
    if handler != "default":  # a program's handler that only takes note
        signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    if handler == "wakeup":  # as asyncio's add_signal_handler: one byte per signal
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
    original = BaseProcess.start

    def start_under_ctrl_c(self):  # Ctrl-C as the pool's second worker starts
        if self.name == "parmap-worker":
            starts.append(self)
            if len(starts) == 2:
                os.kill(os.getpid(), signal.SIGINT)  # its handler runs inside the start
        original(self)

    BaseProcess.start = start_under_ctrl_c
    t0 = time.monotonic()
    try:
        out = Parallel(n_jobs=2, start_method=start_method, batch_size=1)(
            delayed(time.sleep)(0.1) for _ in range(40))
        wakeups = len(os.read(wake_r, 100)) if handler == "wakeup" else None
        print("finished", len(out), caught, wakeups)
    except KeyboardInterrupt:
        print("interrupted %.2f" % (time.monotonic() - t0))
    BaseProcess.start = original
    again = Parallel(n_jobs=2, start_method=start_method)(delayed(abs)(-i) for i in range(3))
    print("again", again, "workers", sum(p.name == "parmap-worker"
                                          for p in multiprocessing.active_children()))
    parmap._shutdown_pools()
    print("left", multiprocessing.active_children())
""")


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
@pytest.mark.timeout(60)
def test_ctrl_c_while_a_worker_starts_is_not_lost(start_method):
    # SIGINT used to be ignored while a worker started (with a forkserver that is still
    # starting, 0.2-0.4 s): the Ctrl-C was lost and the call ran to its end. Held and
    # raised as the start ended, it left the pool's first worker started, and the next
    # call started two more: three workers for n_jobs=2
    interrupted, again, left = run_script(CTRL_C_DURING_START, timeout=50,
                                          args=(start_method, "default")).splitlines()
    assert interrupted.startswith("interrupted") and float(interrupted.split()[1]) < 2.0
    assert again == "again [0, 1, 2] workers 2"
    assert left == "left []"  # the worker started under the Ctrl-C was stopped, not lost


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
@pytest.mark.parametrize("handler", ["own", "wakeup"])
@pytest.mark.timeout(60)
def test_a_programs_own_sigint_handler_sees_a_ctrl_c_held_during_a_start(start_method,
                                                                          handler):
    # its handler, not parmap's, decides: here it takes note, and the call goes on. With
    # a wakeup descriptor (asyncio's add_signal_handler), one Ctrl-C wakes it once: the
    # signal raised again after the start had written it twice
    finished, again, left = run_script(CTRL_C_DURING_START, timeout=50,
                                       args=(start_method, handler)).splitlines()
    assert finished == ("finished 40 [2] 1" if handler == "wakeup" else "finished 40 [2] None")
    assert again == "again [0, 1, 2] workers 2"
    assert left == "left []"


SPAWNED_UNDER_CTRL_C = textwrap.dedent("""
    import os, signal, sys, threading, time
    from parmap import Parallel, delayed

    os.setpgrp()  # Ctrl-C in a terminal signals the whole group: the workers too
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    threading.Timer(0.1, os.killpg, args=(0, signal.SIGINT)).start()
    out = Parallel(n_jobs=2, start_method=sys.argv[1], batch_size=1)(
        delayed(time.sleep)(0.05) for _ in range(20))
    print(len(out), caught)
""")


@pytest.mark.timeout(60)
def test_a_ctrl_c_to_the_group_does_not_kill_spawned_workers_as_they_start():
    # a spawned worker that a Ctrl-C reached while its interpreter started died of a
    # KeyboardInterrupt, when the start held Ctrl-C for the caller instead of ignoring it
    # (the pool sent its batch again). The forkserver itself has that window still
    # (docs/errors.rst)
    out = subprocess.run([sys.executable, "-c", SPAWNED_UNDER_CTRL_C, "spawn"],
                         capture_output=True, text=True, timeout=50,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0 and out.stdout == "20 [2]\n", out.stderr[-2000:]
    assert "KeyboardInterrupt" not in out.stderr
