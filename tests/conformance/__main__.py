"""``python -m tests.conformance [pytest -k/-x arguments]``: run and report."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .runner import PASSING, run, summary


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="parmap-conformance-") as folder:
        verbose = "-v" in argv
        argv = [a for a in argv if a != "-v"]
        outcomes = run(Path(folder), argv, output=None if verbose else None)
    failed = {k: v for k, v in outcomes.items() if v[0] not in PASSING + ("skipped",)}
    for nodeid, (outcome, detail) in failed.items():
        print(f"--- {outcome.upper()} {nodeid}\n{detail}\n")
    counts = summary(outcomes)
    total = len(outcomes)
    passed = sum(counts.get(o, 0) for o in PASSING)
    skipped = counts.get("skipped", 0)
    print(f"{passed} passed of {total} cases ({100 * passed / max(total, 1):.1f} %); "
          f"{skipped} skipped; {100 * passed / max(total - skipped, 1):.1f} % of the cases "
          f"not skipped; outcomes: {counts}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
