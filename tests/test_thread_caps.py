"""Thread caps of the workers: the variables they get, OpenBLAS and GNU OpenMP loaded
before they started (in the caller or the forkserver), capped all the same."""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import sys

import pytest

import parmap
from parmap import Parallel, delayed
from parmap.process import worker
from parmap.process.spawn import THREAD_CAP_VARS

from .conftest import run_script


def thread_caps(_):
    return {var: os.environ.get(var) for var in THREAD_CAP_VARS}


def test_workers_get_thread_caps():
    caps = Parallel(n_jobs=2)(delayed(thread_caps)(i) for i in range(2))[0]
    expected = str(max(parmap.cpu_count() // 2, 1))
    assert caps == {var: expected for var in THREAD_CAP_VARS}


def test_user_settings_win_and_inner_max_num_threads_over_them(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    caps = Parallel(n_jobs=2)(delayed(thread_caps)(i) for i in range(2))[0]
    assert caps["OMP_NUM_THREADS"] == "7"
    assert caps["OPENBLAS_NUM_THREADS"] == str(max(parmap.cpu_count() // 2, 1))
    with parmap.parallel_config(inner_max_num_threads=3):  # explicit: wins, as in joblib
        caps = Parallel(n_jobs=2)(delayed(thread_caps)(i) for i in range(2))[0]
    assert caps["OMP_NUM_THREADS"] == caps["OPENBLAS_NUM_THREADS"] == "3"


OPENBLAS_THREADS = """
import json, sys
import numpy as np
from threadpoolctl import threadpool_info
from parmap import Parallel, delayed

np.ones((64, 64)) @ np.ones((64, 64))  # the caller's OpenBLAS has started its threads

def openblas_threads(_):
    return [d["num_threads"] for d in threadpool_info() if d["internal_api"] == "openblas"]

found = {"caller": openblas_threads(0)}
found["workers"] = Parallel(n_jobs=2)(delayed(openblas_threads)(i) for i in range(2))
print(json.dumps(found))
"""


@pytest.mark.parametrize("thread", [False, True], ids=["forked", "from the forkserver"])
@pytest.mark.timeout(60)
def test_an_openblas_loaded_before_the_workers_started_is_capped_too(thread):
    # OpenBLAS reads its variable once, as numpy loads it: in the caller (forked workers)
    # or in the forkserver (which preloads numpy), before any worker had its caps
    pytest.importorskip("threadpoolctl")
    code = OPENBLAS_THREADS.replace("import json, sys", "import json, sys, threading, time\n"
                                    "threading.Thread(target=time.sleep, args=(60,), "
                                    "daemon=True).start()") if thread else OPENBLAS_THREADS
    found = json.loads(run_script(code, timeout=50))
    if not found["caller"]:
        pytest.skip("numpy does not use OpenBLAS here")
    expected = max(parmap.cpu_count() // 2, 1)
    assert found["workers"] == [[expected]] * 2, found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loaded_libraries_are_found_in_a_directory_with_spaces(tmp_path):
    libm = ctypes.util.find_library("m")
    source = next((p for p in ("/lib/x86_64-linux-gnu/" + str(libm), "/usr/lib/" + str(libm))
                   if os.path.exists(p)), None)
    if source is None:
        pytest.skip("no libm file to copy")
    copy = tmp_path / "a dir with spaces" / "libparmapmarker.so"
    copy.parent.mkdir()
    shutil.copy(source, copy)
    ctypes.CDLL(str(copy))
    assert [lib._name for lib in worker._loaded_libraries("libparmapmarker")] == [str(copy)]


OPENMP_THEN_FORK = """
import os, threading
import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from parmap import Parallel, delayed, parallel_config

X = np.random.RandomState(0).rand(500, 4)
y = (X[:, 0] > 0.5).astype(int)
HistGradientBoostingClassifier(max_iter=3).fit(X, y)   # GNU OpenMP's pool now exists
assert threading.active_count() == 1                  # no Python thread: fork looked safe

def fit(seed):
    model = HistGradientBoostingClassifier(max_iter=3, random_state=seed).fit(X, y)
    return model.n_iter_, os.getppid()

# one thread per worker (n_jobs=-1): forked, OpenMP capped; more: from the forkserver
for threads in (None, 2):
    with parallel_config(inner_max_num_threads=threads):
        out = Parallel(n_jobs=-1, timeout=50)(delayed(fit)(s) for s in range(4))
    print([n for n, _ in out], all(ppid == os.getpid() for _, ppid in out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(150)
def test_workers_do_not_hang_after_the_caller_ran_gnu_openmp():
    # a child forked after libgomp built its thread pool hangs at its first parallel
    # region: parmap forks and caps OpenMP to one thread, or starts from the forkserver
    pytest.importorskip("sklearn")
    out = run_script(OPENMP_THEN_FORK, timeout=130)
    assert out.splitlines() == ["[3, 3, 3, 3] True", "[3, 3, 3, 3] False"], out
