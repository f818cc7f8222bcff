"""One measurement, run in a fresh interpreter by the suite:

    python -c "from benchmarks.child import main; main()" '<json spec>'

The spec holds the snippet to time, its set-up, its check and its parameters.  The timer
starts just before the snippet's first line (the library's import) and stops when the
snippet has finished; the check then runs untimed and a wrong result exits non-zero.
The child prints one JSON line: ``{"time_s": ...}``.

No thread is started here (the memory sampler lives in the suite process): a second
thread would change what some libraries do, e.g. parmap forks only from a single-threaded
process. Except on purpose: with ``"thread": true`` in the spec (the suite's "with a
thread" situation: a Jupyter kernel, a GUI, a web server, a logging thread), one idle
background thread is started before the timer and lives until the child exits.
"""
import json
import sys
import threading
import time
from math import sqrt  # noqa: F401  (used by snippets)
from time import sleep  # noqa: F401

from benchmarks.tasks import full, numbers, slice_sum, spin  # noqa: F401


def main():
    spec = json.loads(sys.argv[1])
    if spec.get("thread"):  # idle, as a notebook kernel's or a logging thread mostly is
        threading.Thread(target=threading.Event().wait, name="background", daemon=True).start()
    ns = dict(globals())
    ns.update(spec["params"])
    if spec.get("setup"):
        exec(compile(spec["setup"], "<setup>", "exec"), ns)
    code = compile(spec["code"], f"<{spec['lib']}:{spec['workload']}>", "exec")
    t0 = time.perf_counter()
    exec(code, ns)
    elapsed = time.perf_counter() - t0
    exec(compile(spec["check"], "<check>", "exec"), ns)
    print(json.dumps({"time_s": elapsed}), flush=True)
