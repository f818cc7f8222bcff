"""``python -m tests.conformance [pytest -k/-x arguments]``: run and report."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .runner import PASSING, report, run


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="parmap-conformance-") as folder:
        outcomes = run(Path(folder), argv)
    failed = {k: v for k, v in outcomes.items() if v[0] not in PASSING + ("skipped",)}
    for nodeid, (outcome, detail) in failed.items():
        print(f"--- {outcome.upper()} {nodeid}\n{detail}\n")
    print(report(outcomes))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
