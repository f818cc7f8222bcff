"""Task functions shared by every library in the suite (importable by worker processes).

Only the standard library is imported here; the numpy tasks use numpy lazily.
"""


def spin(loops):
    """Pure-Python CPU work: a fixed-count loop (calibrated to ~5 ms by the suite)."""
    x = 0
    for i in range(loops):
        x += i
    return x


def numbers(n):
    """A plain generator: the input of the ``generator`` workload (no ``len``)."""
    for i in range(n):
        yield i


def slice_sum(arr, i, parts=16):
    """Sum of the ``i``-th of ``parts`` equal slices of ``arr``."""
    n = len(arr)
    return float(arr[i * n // parts:(i + 1) * n // parts].sum())


def full(i, size=2_000_000):
    """A new float64 array of ``size`` elements, all equal to ``i`` (16 MB by default)."""
    import numpy as np
    return np.full(size, i, dtype=float)
