"""parmap's side-by-side benchmark suite: ``python -m benchmarks --help``.

Kept free of imports so that worker processes which import :mod:`benchmarks.tasks`
pay nothing for it.
"""
