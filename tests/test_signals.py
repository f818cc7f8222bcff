"""Ctrl-C in the parent and a killed parent: nothing hangs, no worker survives."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent("""
    import os, sys, time
    from parmap import Parallel, delayed

    def task(seconds):
        time.sleep(seconds)
        return os.getpid()

    # warm the pool and report its workers
    pids = set(Parallel(n_jobs=2, batch_size=1)(delayed(task)(0.05) for _ in range(8)))
    print(" ".join(map(str, sorted(pids))), flush=True)
    t0 = time.monotonic()
    try:
        Parallel(n_jobs=2, batch_size=1)(delayed(task)(60) for _ in range(100))
    except KeyboardInterrupt:
        print("interrupted %.3f" % (time.monotonic() - t0), flush=True)
        sys.exit(42)
""")


def _start(tmp_path, start_method: str = "auto"):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
           "PARMAP_START_METHOD": start_method}
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
@pytest.mark.parametrize("start_method", ["auto", "forkserver"])
def test_workers_exit_when_parent_is_killed(tmp_path, start_method):
    # forked workers get the death signal from the caller; a forkserver's children watch
    # it (the forkserver outlives it while they live). The caller is checked before it is
    # reaped: a killed process stays a zombie until then, and must count as dead.
    proc, workers = _start(tmp_path, start_method)
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
