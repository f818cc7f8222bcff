"""What the numpy tests share: arrays, how an argument arrived in the worker, and the
fixture that keeps a cold pool's forked workers from inheriting arrays."""
from __future__ import annotations

import mmap
import time

import numpy as np
import pytest

from parmap.process.pool import WorkerPool

MB = 1024 ** 2
BIG = 2 * MB // 8  # float64 elements in a 2 MiB array: above the default 1M threshold


def big(value=1.0, n=BIG):
    return np.full(n, value)


def identity(x):
    return x


def scaled(arr, factor):
    return arr * factor


def first_after(arr, seconds):
    time.sleep(seconds)
    return float(arr[0])


def describe(arr):
    """How an argument arrived in the worker: mapped from a file, or unpickled."""
    return {"mapped": isinstance(_root(arr).base, mmap.mmap), "writeable": arr.flags.writeable,
            "sum": float(arr.sum()), "shape": arr.shape}


def _root(arr):
    while isinstance(arr.base, np.ndarray):
        arr = arr.base
    return arr


def describe_all(*args, **kwargs):
    found = []

    def walk(obj):
        if isinstance(obj, np.ndarray):
            found.append(describe(obj))
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                walk(item)

    walk(args)
    walk(kwargs)
    return found


_REAL_WILL_FORK = WorkerPool.will_fork


@pytest.fixture(autouse=True)
def no_inheritance(monkeypatch):
    """Most tests here are about placement in shared memory: keep arrays from being
    inherited by a cold pool's forked workers (tests of inheritance undo this)."""
    monkeypatch.setattr(WorkerPool, "will_fork", lambda self: False)
