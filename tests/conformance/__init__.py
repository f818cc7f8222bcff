"""joblib's own public-API tests, run against parmap.

At run time :mod:`.runner` copies ``joblib/test/test_parallel.py`` from the *installed*
joblib (never vendored here) into a temporary folder, swaps its imports of the API under
test (``Parallel``, ``delayed``, ``parallel_config``, ...) to parmap's, and runs it with
pytest in a child process, every case bounded by a timeout. :mod:`.skips` lists the cases
skipped on purpose, each with its reason; every other case must pass.

Run it by hand (prints the pass count and every case that did not pass)::

    python -m tests.conformance            # all cases
    python -m tests.conformance -k nested  # a subset (pytest's -k expression)

``tests/test_joblib_conformance.py`` runs it in the test suite.
"""
