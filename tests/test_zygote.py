"""A recycling pool's zygote (``parmap/process/zygote.py``): it forks the replacement
workers, reports how they exit, dies with the pool's owner, and a pool whose zygote is
gone goes on without it."""
from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from parmap import Parallel, WorkerCrashedError, delayed
from parmap.process import registry, zygote

from .conftest import helper_pids, shutdown_pools

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the zygote is Linux's"),
    pytest.mark.timeout(60),
]

#: batches of one task, one task per worker: every task after the first two runs in a
#: replacement
RECYCLING = dict(n_jobs=2, batch_size=1, max_tasks_per_child=1, start_method="forkserver")


def where(i):
    return (i, os.getpid(), os.getppid(),
            sorted(t.name for t in threading.enumerate()), sys.path[:], os.getcwd())


def _zygote_of(results) -> int:
    parents = {r[2] for r in results[2:]}
    assert len(parents) == 1, results  # every replacement has the same parent
    return parents.pop()


def test_replacements_are_forked_by_the_pools_zygote():
    results = Parallel(**RECYCLING)(delayed(where)(i) for i in range(8))
    assert [r[0] for r in results] == list(range(8))
    assert len({r[1] for r in results}) == 8  # a new worker for each task
    forker = _zygote_of(results)
    assert forker not in (os.getpid(), *helper_pids())
    assert psutil.Process(forker).ppid() in helper_pids()  # the forkserver's child
    for r in results[2:]:
        # its death signal is tied to the zygote, which dies with us: no watch thread
        assert "parmap-parent-watch" not in r[3], r[3]
        assert r[4] == sys.path and r[5] == os.getcwd()
    shutdown_pools()
    assert not psutil.pid_exists(forker) or \
        psutil.Process(forker).status() == psutil.STATUS_ZOMBIE


def test_a_replacement_sees_the_callers_current_sys_path_and_directory(tmp_path, monkeypatch):
    Parallel(**RECYCLING)(delayed(abs)(i) for i in range(4))  # the zygote runs now
    (tmp_path / "probe_zygote.py").write_text(
        "import os\ndef probe(i):\n    return i, os.getcwd()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    from probe_zygote import probe  # sent by reference: the worker must import it

    # the two idle workers, started before, take tasks 0 and 1; every later task runs
    # in a worker started since
    results = Parallel(**RECYCLING)(
        delayed(probe)(i) if i > 1 else delayed(abs)(i) for i in range(6))
    assert results == [0, 1] + [(i, str(tmp_path)) for i in range(2, 6)]


def kill_in_a_replacement(i):
    if i == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return i


def test_the_exit_of_a_replacement_is_reported_through_the_zygote():
    with pytest.raises(WorkerCrashedError) as info:
        Parallel(**RECYCLING)(delayed(kill_in_a_replacement)(i) for i in range(10))
    assert info.value.exitcode == -signal.SIGKILL
    assert "killed by SIGKILL" in str(info.value) and "task 5" in str(info.value)


def test_a_pool_whose_zygote_died_starts_replacements_without_it():
    forker = _zygote_of(Parallel(**RECYCLING)(delayed(where)(i) for i in range(6)))
    pool = registry._shared[0]
    os.kill(forker, signal.SIGKILL)  # its idle workers die with it
    deadline = time.monotonic() + 10
    while any(not w.dead for w in pool.workers) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the pool's manager has seen them die
    results = Parallel(**RECYCLING)(delayed(where)(i) for i in range(8))
    assert [r[0] for r in results] == list(range(8))
    assert forker not in {r[2] for r in results}


def as_a_multiprocessing_child(i):
    parent = multiprocessing.parent_process()
    return parent.pid, parent.is_alive(), multiprocessing.current_process()._identity


def test_a_replacement_is_a_multiprocessing_child_of_the_owner():
    # parent_process() is the pool's owner, alive, as in a worker the forkserver
    # started; identities stay distinct
    seen = Parallel(**RECYCLING)(delayed(as_a_multiprocessing_child)(i) for i in range(6))
    assert [s[:2] for s in seen] == [(os.getpid(), True)] * 6
    assert len({s[2] for s in seen}) == 6


def start_a_daemonic_child(i):
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,),
                                                        daemon=True)
    child.start()
    return child.pid


def test_a_replacement_ends_the_daemonic_processes_its_tasks_started():
    # as any multiprocessing child does on its way out; the later tasks run in
    # replacements, which the zygote forked
    children = Parallel(**RECYCLING)(delayed(start_a_daemonic_child)(i) for i in range(4))
    shutdown_pools()
    procs = [psutil.Process(pid) for pid in children if psutil.pid_exists(pid)]
    _, alive = psutil.wait_procs(procs, timeout=5)
    left = [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert left == []


def _gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("closing", ["shutdown", "idle timeout"])
def test_a_zygote_that_stopped_answering_is_replaced_and_killed_as_the_pool_closes(
        monkeypatch, closing):
    # left stopped, it would never exit, and the interpreter's exit would wait on it
    monkeypatch.setattr(zygote, "ANSWER_TIMEOUT", 1.0)  # read as the zygote starts
    shutdown_pools()
    options = dict(RECYCLING, idle_timeout=1.0 if closing == "idle timeout" else 300.0)
    stopped = _zygote_of(Parallel(**options)(delayed(where)(i) for i in range(6)))
    os.kill(stopped, signal.SIGSTOP)
    try:
        results = Parallel(**options)(delayed(where)(i) for i in range(6))
        assert [r[0] for r in results] == list(range(6))  # from the forkserver meanwhile
        started = time.monotonic()
        if closing == "shutdown":
            shutdown_pools()
        while not _gone(stopped) and time.monotonic() - started < 10:
            time.sleep(0.05)
        took = time.monotonic() - started
        assert _gone(stopped)
    finally:
        if psutil.pid_exists(stopped):
            os.kill(stopped, signal.SIGKILL)
    assert took < 5, took


KILLED_OWNER = textwrap.dedent("""
    import os, time
    from parmap import Parallel, delayed

    def task(seconds):
        time.sleep(seconds)
        return os.getpid()

    options = dict(n_jobs=2, batch_size=1, max_tasks_per_child=1, start_method="forkserver")
    Parallel(**options)(delayed(task)(0.01) for _ in range(6))  # the zygote runs now
    print("ready", flush=True)
    Parallel(**options)(delayed(task)(60) for _ in range(10))
""")


def test_the_zygote_and_its_workers_die_with_the_pools_owner(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(KILLED_OWNER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=env)
    family: list[psutil.Process] = []
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # the second call's first tasks run in zygote's children
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 4  # forkserver, zygote, two workers (and the tracker)
        proc.kill()
        _, alive = psutil.wait_procs(family, timeout=5)  # not reaped: the owner is a zombie
        left = [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    finally:
        for p in family:  # survivors would outlive the test
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.kill()
        proc.communicate(timeout=10)
    assert left == []



FORKING_OWNER = textwrap.dedent("""
    import os, time
    from parmap import Parallel, delayed

    Parallel(n_jobs=2, batch_size=1, max_tasks_per_child=1, idle_timeout=0.5,
             start_method="forkserver")(delayed(abs)(i) for i in range(6))  # a zygote
    helper = os.fork()
    if helper == 0:  # a helper process of the application, which outlives us
        time.sleep(30)
        os._exit(0)
    print(helper, flush=True)
    time.sleep(1.5)  # the pool idles out meanwhile
""")


def test_a_process_forked_by_the_owner_does_not_keep_the_zygote_alive(tmp_path):
    # the zygote exits when its socket's last copy closes; a forked child holding one
    # made the owner's exit wait (joining the zygote) until that child ended
    script = tmp_path / "forking_owner.py"
    script.write_text(FORKING_OWNER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=env)
    helper = None
    try:
        helper = int(proc.stdout.readline())
        proc.wait(timeout=20)
        took = time.monotonic() - started
    finally:
        if helper is not None:
            os.kill(helper, signal.SIGKILL)  # it holds our end of the pipe too
        proc.kill()
        proc.communicate(timeout=10)
    assert took < 15, took


def test_a_large_request_is_received_whole():
    # (read into one buffer: adding chunks to bytes made a 50 MB request take seconds)
    ours, theirs = socket.socketpair()
    payload = os.urandom(1 << 16) * 64  # 4 MB: many chunks
    sender = threading.Thread(target=theirs.sendall, args=(payload,))
    sender.start()
    try:
        assert zygote._receive_exactly(ours, len(payload)) == payload
    finally:
        sender.join()
        theirs.close()
    with pytest.raises(EOFError, match="closed its socket"):
        zygote._receive_exactly(ours, 1)
    ours.close()
