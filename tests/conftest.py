"""Shared fixtures: every test is checked for leaked threads, child processes and
/dev/shm files; backends are parametrised so one behavioural suite covers them all."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Callable

import pytest

import parmap
import parmap.process.shm as shm

BACKENDS = ["sequential", "threading", "processes"]
PARALLEL_BACKENDS = ["threading"]
LEAK_GRACE = 5.0  # seconds a finishing thread/worker may take to go away

#: Helpers that a module-scoped fixture keeps alive across its tests on purpose (the Dask
#: cluster of test_dask.py). While it lives, such a fixture registers a callable returning
#: the threads and child pids it owns *now* (a Dask worker killed by a test is restarted
#: with a new pid); the per-test check ignores exactly those (and the children's own
#: descendants), and the fixture checks at its teardown that they are gone.
LONG_LIVED: list[Callable[[], tuple[set, set]]] = []


def long_lived() -> tuple[set, set]:
    threads: set = set()
    pids: set = set()
    for owned in LONG_LIVED:
        more_threads, more_pids = owned()
        threads |= more_threads
        pids |= more_pids
    return threads, pids


def helper_pids() -> set[int]:
    """multiprocessing's long-lived helpers (forkserver, resource tracker): not leaks."""
    pids = set()
    try:
        from multiprocessing import forkserver, resource_tracker

        pids.add(forkserver._forkserver._forkserver_pid)
        pids.add(resource_tracker._resource_tracker._pid)
    except (ImportError, AttributeError):
        pass
    return {pid for pid in pids if pid}


def child_pids(skip: set[int] = frozenset()) -> set[int]:
    """Live (or zombie) descendants of this process, multiprocessing's helpers excepted
    (workers started through the forkserver are its children, so count them too), and
    the pids in ``skip`` with their descendants."""
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = set().union(*(_children(pid) for pid in frontier)) - found - skip
        found |= frontier
    return found - helper_pids()


def _children(parent: int) -> set[int]:
    me = str(parent)
    pids = set()
    try:
        entries = os.listdir("/proc")
    except OSError:  # not Linux: fall back to what multiprocessing knows
        import multiprocessing

        return {p.pid for p in multiprocessing.active_children()}
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                pids.add(int(entry))
    return pids


def shm_entries() -> set[str]:
    try:
        return {name for name in os.listdir("/dev/shm") if "parmap" in name}
    except OSError:
        return set()


def shutdown_pools() -> None:
    """Stop parmap's reusable worker pools, if the process backend is present."""
    shutdown = getattr(parmap, "_shutdown_pools", None)
    if shutdown is not None:
        shutdown()


def leaks(threads_before: set, shm_before: set) -> list[str]:
    problems = []
    known_threads, known_pids = long_lived()
    threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()
               and t not in known_threads]
    if threads:
        problems.append(f"threads left running: {[t.name for t in threads]}")
    children = child_pids(known_pids)
    if children:
        problems.append(f"child processes left: {sorted(children)}")
    shm = shm_entries() - shm_before
    if shm:
        problems.append(f"/dev/shm entries left: {sorted(shm)}")
    return problems


@pytest.fixture(autouse=True)
def no_leaks(request):
    threads_before = set(threading.enumerate())
    shm_before = shm_entries()
    yield
    shutdown_pools()
    deadline = time.monotonic() + LEAK_GRACE
    while (problems := leaks(threads_before, shm_before)) and time.monotonic() < deadline:
        time.sleep(0.02)  # waiting for teardown to finish, not synchronising the test
    if problems:
        pytest.fail(f"{request.node.nodeid} leaked: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_at_session_end():
    threads_before = set(threading.enumerate())
    shm_before = shm_entries()
    yield
    shutdown_pools()
    problems = leaks(threads_before, shm_before)
    assert not problems, "the test session leaked: " + "; ".join(problems)


def recording(backend_class):
    """A subclass of ``backend_class`` that records the size of every batch submitted
    (``.sizes``): what tests check batching with, through the backend contract."""

    class Recording(backend_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.sizes = []

        def submit(self, batch, callback):
            self.sizes.append(len(batch))
            super().submit(batch, callback)

    return Recording


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=PARALLEL_BACKENDS)
def parallel_backend(request):
    """Backends that really run tasks concurrently."""
    return request.param


@pytest.fixture
def count_placements(monkeypatch):
    """The sizes of the arrays the process backend copies into shared memory."""
    calls = []
    original = shm.ArgumentPlacer._place

    def spy(self, root):
        calls.append(root.nbytes)
        return original(self, root)

    monkeypatch.setattr(shm.ArgumentPlacer, "_place", spy)
    return calls


def twice_at_once(action: Callable[[], object], reset: Callable[[], None],
                  rounds: int = 50) -> list[list]:
    """Run ``action`` in two threads released together, ``rounds`` times, ``reset``
    before each round, with a tiny switch interval (a race's window, widened): each
    round's two outcomes, a result or the exception raised."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        out = []
        for _ in range(rounds):
            reset()
            barrier, outcomes = threading.Barrier(2, timeout=10), []

            def run() -> None:
                barrier.wait()
                try:
                    outcomes.append(action())
                except Exception as exc:  # noqa: BLE001 - the outcome to check
                    outcomes.append(exc)

            threads = [threading.Thread(target=run) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            out.append(outcomes)
        return out
    finally:
        sys.setswitchinterval(previous)


def run_script(code: str, timeout: float, args: tuple[str, ...] = ()) -> str:
    """Run ``code`` in a fresh interpreter (a process with no thread of pytest's), its
    ``__main__``, with ``args`` in ``sys.argv[1:]``; its standard output, once it exited
    with 0."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=timeout,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout
