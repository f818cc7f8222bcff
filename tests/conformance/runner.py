"""Run joblib's ``test_parallel.py`` against parmap in a child pytest; collect outcomes.

Each case is bounded by pytest-timeout (signal method: the case fails, the run goes on).
A watchdog kills the child's whole process group when no case finishes for a while (a
hang the signal cannot break, or a crash); the case it was in is recorded as ``hung``
and the run restarts with the cases not yet run, so nothing hangs and nothing is lost.
"""
from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

from .rewrite import joblib_test_file, write_copy

REPO = Path(__file__).resolve().parents[2]
CASE_TIMEOUT = 30  # seconds per case (pytest-timeout)
WATCHDOG = CASE_TIMEOUT + 30  # no progress for this long: kill the child and go on
PASSING = ("passed", "xpassed")

#: the child's pytest configuration: none of ours (setup.cfg) applies to joblib's tests.
#: Warnings are errors, as in our suite, except the nested-call warning that joblib
#: itself gives in the same tests (test_nested_loop nests 'multiprocessing')
PYTEST_INI = """\
[pytest]
addopts = -p no:cacheprovider
markers =
    thread_unsafe: joblib's marker
    no_cover: joblib's marker
filterwarnings =
    error
    ignore:.*-backed parallel loops cannot be nested:UserWarning
"""


class Outcome(dict):
    """nodeid -> (outcome, detail), in the order the cases ran."""


def _read_log(path: Path) -> tuple[list[str], dict[str, tuple[str, str]], str | None]:
    collected: list[str] = []
    outcomes: dict[str, tuple[str, str]] = {}
    current = None
    if not path.exists():
        return collected, outcomes, current
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if "collected" in record:
            collected.append(record["collected"])
        elif "start" in record:
            current = record["start"]
        else:
            old = outcomes.get(record["id"])
            if old is None or old[0] in PASSING:
                outcomes[record["id"]] = (record["outcome"], record["detail"])
            if record["when"] == "teardown":
                current = None
    return collected, outcomes, current


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _run_child(folder: Path, log: Path, args: list[str], output) -> bool:
    """One child pytest; True if it ended by itself, False if the watchdog killed it."""
    env = dict(os.environ, PARMAP_CONFORMANCE_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "pytest", "-c", str(folder / "pytest.ini"),
               "--rootdir", str(folder), "-p", "tests.conformance.plugin", "-q",
               f"--timeout={CASE_TIMEOUT}", "--timeout-method=signal", *args]
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=output,
                               stderr=subprocess.STDOUT, start_new_session=True)
    last_size, last_change = -1, time.monotonic()
    try:
        while process.poll() is None:
            size = log.stat().st_size if log.exists() else 0
            if size != last_size:
                last_size, last_change = size, time.monotonic()
            elif time.monotonic() - last_change > WATCHDOG:
                return False
            time.sleep(0.5)  # polling a child process: no event to wait on
        return True
    finally:
        _kill_group(process)  # also whatever the tests left behind in the group


def run(folder: Path, select: Iterable[str] = (), output=None,
        functions: Iterable[str] | None = None) -> dict[str, tuple[str, str]]:
    """Every case's (outcome, detail); ``select``: extra pytest arguments (``-k ...``);
    ``functions``: only these test functions (by name)."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = write_copy(folder)
    (folder / "pytest.ini").write_text(PYTEST_INI)
    log = folder / "outcomes.jsonl"
    output = output if output is not None else subprocess.DEVNULL
    done: dict[str, tuple[str, str]] = {}
    for _ in range(20):  # each restart skips at least the case that hung
        deselect = [arg for nodeid in done for arg in ("--deselect", nodeid)]
        log.unlink(missing_ok=True)
        targets = [str(copy)] if functions is None else \
            [f"{copy}::{name}" for name in functions]
        finished = _run_child(folder, log, [*targets, *select, *deselect], output)
        collected, outcomes, current = _read_log(log)
        done.update(outcomes)
        if finished:
            if not collected and not done:
                raise RuntimeError("the child pytest collected nothing; run "
                                   "python -m tests.conformance to see its output")
            break
        if current is not None:
            done[current] = ("hung", f"no progress for {WATCHDOG} s: the child was killed")
    return done


def joblib_test_functions() -> list[str]:
    """The names of the test functions of joblib's file, sorted."""
    tree = ast.parse(joblib_test_file().read_text())
    return sorted(node.name for node in tree.body
                  if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"))


def summary(outcomes: dict[str, tuple[str, str]]) -> dict[str, int]:
    """Cases by outcome; skips split into ours (``skipped (parmap)``, :mod:`.skips`) and
    joblib's own (``skipped (joblib)``: conditions of this environment)."""
    counts: dict[str, int] = {}
    for outcome, detail in outcomes.values():
        if outcome == "skipped":
            outcome = "skipped (parmap)" if "parmap: " in detail else "skipped (joblib)"
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def report(outcomes: dict[str, tuple[str, str]]) -> str:
    """One line: the pass count of all cases and of the cases not skipped on purpose."""
    counts = summary(outcomes)
    total = len(outcomes)
    passed = sum(counts.get(o, 0) for o in PASSING)
    ours = counts.get("skipped (parmap)", 0)
    return (f"{passed} passed of {total} cases ({100 * passed / max(total, 1):.1f} %); "
            f"{passed} of {total - ours} cases not in the reviewed skip list "
            f"({100 * passed / max(total - ours, 1):.1f} %); outcomes: {counts}")
