"""Tasks that the process-backend tests share (importable by the workers)."""
from __future__ import annotations

import os

from parmap import Parallel, delayed


def identity(x):
    return x


def pid_of(_):
    return os.getpid()


def exit_on(x, bad=3, code=7):
    if x == bad:
        os._exit(code)
    return x


def healthy():
    assert Parallel(n_jobs=2)(delayed(identity)(i) for i in range(20)) == list(range(20))
