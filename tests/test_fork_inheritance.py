"""What a forked worker inherits: no pipe end of any pool, its own pool's included.

A forked child copies every descriptor of its parent. A copy of a pool's pipe end in
another process keeps that pipe open: a dead worker's task pipe, still open for reading
elsewhere, blocks the pool's next write to it instead of failing it, and the call waits
forever. So a worker keeps only its own task pipe's read end and result pipe's write end.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from parmap import Parallel, delayed
from parmap.process import registry, spawn

from .conftest import run_script

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc")


def held_pipes(_=None):
    """In a worker: the pipes it holds, each with the set of its ends held (r, w)."""
    held: dict[str, set[str]] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
            with open(f"/proc/self/fdinfo/{fd}") as info:
                flags = int(next(line for line in info if line.startswith("flags:"))
                            .split()[1], 8)
        except OSError:  # the directory's own descriptor, closed meanwhile
            continue
        if name.startswith("pipe:"):
            held.setdefault(name, set()).add("w" if flags & 3 == os.O_WRONLY else "r")
    return held


def slowly(x):
    time.sleep(0.05)
    return x


def end_names(pool):
    """The pipes a pool holds an end of: its wake pipe, its workers' pipes."""
    conns = [pool.wake_r, pool.wake_w]
    for worker in pool.workers:
        conns += [worker.task_conn, worker.result_conn]
    return {os.readlink(f"/proc/self/fd/{conn.fileno()}") for conn in conns}


@needs_proc
@pytest.mark.timeout(60)
def test_forked_workers_hold_no_pipe_end_of_another_pool_nor_of_their_own():
    # a busy shared pool; a call with other options meanwhile gets a private pool,
    # whose workers fork while the shared pool's ends are open here
    busy = Parallel(n_jobs=2, start_method="fork", return_as="generator")(
        delayed(slowly)(i) for i in range(40))
    next(busy)
    try:
        others = end_names(registry._shared[0])
        seen = Parallel(n_jobs=2, start_method="fork", max_tasks_per_child=1000,
                        batch_size=1)(delayed(held_pipes)(i) for i in range(8))
    finally:
        busy.close()
    for held in seen:
        assert not others & set(held), "a worker holds another pool's pipe"
        # its own task pipe for reading, its result pipe for writing: never both ends
        assert not [name for name, ends in held.items() if ends == {"r", "w"}]


def _forked_child_pipes() -> dict:
    """Fork here (as any other code of the caller's may) and return the pipes the child
    holds; the child must be free to start workers of its own."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            pipes = {k: sorted(v) for k, v in held_pipes().items()}
            # the thread starting a worker holds parmap's start lock; it is not here
            can_start = spawn.start_lock.acquire(timeout=5)
            os.write(write, json.dumps([pipes, can_start]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        held, can_start = json.loads(answer.read())
    os.waitpid(pid, 0)
    assert can_start, "the forked child could never start a worker of its own"
    return held


@needs_proc
@pytest.mark.timeout(60)
def test_a_fork_meanwhile_does_not_keep_the_pipes_another_thread_hands_to_its_worker(
        monkeypatch):
    # One thread starts a worker from the forkserver and is held waiting for it, the
    # worker's ends of its pipes open here. Neither parmap's own forks (which must not
    # wait for it: a forkserver may be slow to answer) nor a fork by other code may keep
    # those ends.
    real_start, paused, go, handed = spawn.start_process, threading.Event(), \
        threading.Event(), []

    def held_start(ctx, target, name, args):
        if threading.current_thread().name == "starter" and not handed:
            handed.extend(os.readlink(f"/proc/self/fd/{conn.fileno()}")
                          for conn in args[:2])  # the worker's task and result ends
            paused.set()
            assert go.wait(30)
        return real_start(ctx, target, name, args)

    monkeypatch.setattr(spawn, "start_process", held_start)
    out = []
    starter = threading.Thread(name="starter", target=lambda: out.append(Parallel(
        n_jobs=2, start_method="forkserver")(delayed(slowly)(i) for i in range(2))))
    starter.start()
    try:
        assert paused.wait(30)
        held = [_forked_child_pipes()] + Parallel(n_jobs=2, start_method="fork",
                                                   batch_size=1)(
            delayed(held_pipes)(i) for i in range(4))
    finally:
        go.set()
        starter.join(30)
    assert out == [[0, 1]]
    assert len(handed) == 2
    for pipes in held:
        assert not set(handed) & set(pipes), "a forked child kept another's handed pipes"


@pytest.mark.timeout(60)
def test_a_child_forked_while_another_thread_picks_a_pool_can_run_calls():
    # the registry's lock, held by another thread at the fork, was copied held
    got, go = threading.Event(), threading.Event()

    def hold():
        with registry._registry_lock:
            got.set()
            go.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert got.wait(30)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a call of its own, reported through the pipe
        try:
            signal.alarm(20)  # ends the child if its call hangs
            out = Parallel(n_jobs=2, start_method="fork")(delayed(abs)(-i) for i in range(3))
            os.write(write, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write)
    go.set()
    holder.join(30)
    with os.fdopen(read) as answer:
        out = answer.read()
    os.waitpid(pid, 0)
    assert out == "[0, 1, 2]"


FORKED_AFTER_A_CALL = """
import json, os, sys, tempfile, threading, time
from parmap import Parallel, delayed
kw = {"max_tasks_per_child": 2} if sys.argv[1] == "recycling" else {}
threading.Thread(target=time.sleep, args=(20,), daemon=True).start()  # the forkserver
before = Parallel(n_jobs=2, **kw)(delayed(abs)(-i) for i in range(6))
err = tempfile.TemporaryFile()
pid = os.fork()
if pid == 0:  # the child: a call of its own, the same way; its stderr to the file
    os.dup2(err.fileno(), 2)
    threading.Thread(target=time.sleep, args=(20,), daemon=True).start()
    try:
        print(json.dumps(Parallel(n_jobs=2, **kw)(delayed(abs)(-i) for i in range(6))))
    except BaseException as exc:
        print(json.dumps(repr(exc)))
    sys.stdout.flush()
    sys.exit(0)  # a normal exit: multiprocessing's exit handler runs
os.waitpid(pid, 0)
err.seek(0)
print(json.dumps(err.read().decode()))
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["forkserver", "recycling"])
def test_a_child_forked_after_a_call_starts_workers_of_its_own(how):
    """A process forked (by other code) after a call that used the forkserver cannot
    use its parent's: it starts its own, and its exit does not try to join the parent's
    workers (multiprocessing's AssertionError, "can only join a child process")."""
    child, child_stderr = map(json.loads, run_script(
        FORKED_AFTER_A_CALL, timeout=50, args=(how,)).splitlines())
    assert child == [0, 1, 2, 3, 4, 5]
    assert child_stderr == ""


FORKED_WHILE_STARTING = """
import json, os, signal, threading, time
import multiprocessing.util
from parmap import Parallel, delayed
spawn = multiprocessing.util.spawnv_passfds
holding = threading.Event()
def slow_spawn(*args, **kwargs):  # widens the moment the servers' locks are held
    holding.set()
    time.sleep(1.0)
    return spawn(*args, **kwargs)
multiprocessing.util.spawnv_passfds = slow_spawn
starting = threading.Thread(target=lambda: Parallel(n_jobs=2, start_method="forkserver")(
    delayed(abs)(-i) for i in range(4)))
starting.start()
assert holding.wait(20)  # it now holds the resource tracker's and the forkserver's locks
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    signal.alarm(20)  # ends the child if its call hangs
    out = Parallel(n_jobs=2, start_method="forkserver")(delayed(abs)(-i) for i in range(4))
    os.write(write, json.dumps(out).encode())
    os._exit(0)
os.close(write)
os.waitpid(pid, 0)
print(os.read(read, 1000).decode() or "nothing")
starting.join()
"""


@pytest.mark.timeout(60)
def test_a_child_forked_while_another_thread_starts_the_forkserver_starts_its_own():
    """The locks of multiprocessing's forkserver and resource tracker, copied held
    into the child, are new there: its first call waited on them forever."""
    assert run_script(FORKED_WHILE_STARTING, timeout=50).strip() == "[0, 1, 2, 3]"


def test_where_processes_never_fork_no_descriptor_is_read(monkeypatch):
    # Windows: a connection holds a handle, which os.fstat cannot read
    class HandleOnly:
        def fileno(self):
            raise OSError("a handle, not a file descriptor")

    monkeypatch.setattr(spawn, "_FORKS", False)
    spawn.keep_from_forks(HandleOnly())
    spawn.hand(HandleOnly())
    spawn.handed()
