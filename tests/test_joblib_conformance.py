"""joblib's own public-API tests (``joblib/test/test_parallel.py`` of the installed
joblib) run against parmap: see ``tests/conformance``. Every case passes but the reviewed
skips of ``tests/conformance/skips.py``. The test functions are split in ``SHARDS``
groups, one child pytest each, so that each test here stays well under a minute."""
from __future__ import annotations

import pytest

pytest.importorskip("joblib")

from .conformance.runner import PASSING, joblib_test_functions, report, run  # noqa: E402

SHARDS = 4


@pytest.mark.slow
@pytest.mark.timeout(600)  # the runner bounds every case (30 s) and restarts after a hang
@pytest.mark.parametrize("shard", range(SHARDS))
def test_joblib_test_parallel_passes(tmp_path, shard):
    outcomes = run(tmp_path / "conformance", functions=joblib_test_functions()[shard::SHARDS])
    failed = {nodeid: (outcome, detail) for nodeid, (outcome, detail) in outcomes.items()
              if outcome not in PASSING + ("skipped",)}
    details = "\n\n".join(f"{outcome.upper()} {nodeid}\n{detail[-1500:]}"
                          for nodeid, (outcome, detail) in failed.items())
    assert not failed, (f"{len(failed)} of joblib's cases fail against parmap "
                        f"({report(outcomes)}); run python -m tests.conformance -k NAME to "
                        f"see one:\n\n{details}")
    assert sum(outcome in PASSING for outcome, _ in outcomes.values()) > 50, report(outcomes)
