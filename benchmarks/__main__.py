"""Entry point: ``python -m benchmarks [--reps N] [--only W,..] [--libs L,..] [--quick]``."""
from benchmarks.suite import main

raise SystemExit(main())
