"""A pytest plugin for the child pytest that runs joblib's tests (``-p``): it applies
:mod:`.skips` and writes every case's start and outcome, one JSON object a line, to the
file named by ``PARMAP_CONFORMANCE_LOG`` (flushed at once, so a crash loses nothing)."""
from __future__ import annotations

import json
import os

import pytest

from .skips import skip_reason

_log = open(os.environ["PARMAP_CONFORMANCE_LOG"], "a", buffering=1)


def _write(**record: object) -> None:
    _log.write(json.dumps(record) + "\n")
    _log.flush()


def pytest_collection_modifyitems(items: list) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        reason = skip_reason(item.originalname, callspec.params if callspec else {})
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"parmap: {reason}"))
        _write(collected=item.nodeid)


def pytest_runtest_logstart(nodeid: str) -> None:
    _write(start=nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or report.outcome != "passed":
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        elif report.when != "call" and report.failed:
            outcome = "error"
        detail = ""
        if outcome in ("failed", "error"):
            detail = str(report.longrepr)[-3000:]
        elif report.skipped and isinstance(report.longrepr, tuple):
            detail = str(report.longrepr[2])
        _write(id=report.nodeid, when=report.when, outcome=outcome, detail=detail,
               duration=round(report.duration, 3))
