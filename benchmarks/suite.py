"""Side-by-side benchmark suite: parmap against joblib, multiprocessing, concurrent.futures
and mpire.  Run ``python -m benchmarks --help``.

Each (library, workload) measurement runs in a fresh interpreter (:mod:`benchmarks.child`),
so interpreter-level cold start (imports, pool start) counts as it does in a script.
Repetitions are interleaved: for each rep, every workload, every library (in an order
rotated by one each rep).  While a child runs, a sampler thread in this process walks the
child's process tree (its descendants and its session) every 20 ms and sums the PSS and
RSS of ``/proc/<pid>/smaps_rollup`` over it; the peak is reported.
"""
import argparse
import compileall
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time

from benchmarks import report
from benchmarks.tasks import spin
from benchmarks.workloads import LIBS, WORKLOADS, params

#: the rows of the "with a background thread" situation are named workload + this
THREAD_SUFFIX = " +thread"
SITUATIONS = ("script", "thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = "from benchmarks.child import main; main()"
SAMPLE_S = 0.020


# ---------------------------------------------------------------- memory of a process tree
def _stat(pid):
    """(ppid, session) of a pid, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            s = fh.read()
    except OSError:
        return None
    fields = s[s.rfind(b")") + 2:].split()
    return int(fields[1]), int(fields[3])


def tree_pids(root):
    """``root``, its descendants, and any process still in its session (re-parented)."""
    kids, found = {}, {root}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(name)
            if st is None:
                continue
            pid = int(name)
            kids.setdefault(st[0], []).append(pid)
            if st[1] == root:
                found.add(pid)
    todo = [root]
    while todo:
        for k in kids.get(todo.pop(), ()):
            if k not in found:
                found.add(k)
                todo.append(k)
    return found


def pss_rss_kb(pid):
    """(Pss, Rss, Pss_Shmem) of one process in kB from smaps_rollup; zeros when it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            text = fh.read()
    except OSError:
        return 0, 0, 0
    got = {}
    for line in text.split(b"\n")[1:10]:
        key, _, rest = line.partition(b":")
        if key in (b"Pss", b"Rss", b"Pss_Shmem"):
            got[key] = int(rest.split()[0])
    return got.get(b"Pss", 0), got.get(b"Rss", 0), got.get(b"Pss_Shmem", 0)


def shm_used_kb():
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


class TreeSampler(threading.Thread):
    """Peak summed PSS / RSS of a process tree, sampled every ``SAMPLE_S`` seconds."""

    def __init__(self, root):
        super().__init__(daemon=True)
        self.root, self.stop = root, threading.Event()
        self.pss = self.rss = self.shm = self.pss_shm = self.nproc = 0
        self.samples = 0
        self.shm0 = shm_used_kb()

    def sample(self, pids):
        pss = rss = pss_shmem = 0
        for pid in pids:
            p, r, s = pss_rss_kb(pid)
            pss, rss, pss_shmem = pss + p, rss + r, pss_shmem + s
        shm = shm_used_kb() - self.shm0
        self.pss, self.rss, self.shm = max(self.pss, pss), max(self.rss, rss), max(self.shm, shm)
        # /dev/shm pages that no process maps (e.g. a memmapped file only partly touched)
        # hold memory too but are in nobody's PSS; add the unmapped part of the growth.
        self.pss_shm = max(self.pss_shm, pss + max(0, shm - pss_shmem))
        self.samples += 1

    def run(self):
        pids, i = {self.root}, 0
        while not self.stop.is_set():
            if i % 3 == 0:  # re-scan /proc every 60 ms, read smaps every 20 ms
                pids = tree_pids(self.root)
                self.nproc = max(self.nproc, len(pids))
            self.sample(pids)
            i += 1
            self.stop.wait(SAMPLE_S)


# ---------------------------------------------------------------- one measurement
def split_row(row):
    """(workload, with a background thread?) of a row name."""
    if row.endswith(THREAD_SUFFIX):
        return row[:-len(THREAD_SUFFIX)], True
    return row, False


def row_libs(workload, thread, libs, libs_named):
    """The libraries that run ``workload`` in one situation."""
    w = WORKLOADS[workload]
    skip = () if libs_named else tuple(w.get("optional", ())) + (
        tuple(w.get("optional_with_thread", ())) if thread else ())
    return [x for x in LIBS if x in libs and x in w["code"] and x not in skip]


def run_one(row, lib, p, timeout):
    """One fresh interpreter running ``lib``'s code for ``row`` (a workload, followed by
    ``THREAD_SUFFIX`` for the "with a background thread" situation)."""
    workload, thread = split_row(row)
    w = WORKLOADS[workload]
    setup = w.get("setup", "")
    if isinstance(setup, dict):  # per library
        setup = setup.get(lib, "")
    spec = {"workload": workload, "lib": lib, "params": p, "code": w["code"][lib],
            "setup": setup, "check": w["check"], "thread": thread}
    env = {**os.environ, "PYTHONPATH": ROOT}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    status = "ok"
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = "timeout"
        _killpg(proc.pid)
        out, err = proc.communicate()
    process_s = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    leftover = sorted(tree_pids(proc.pid) - {proc.pid})
    if leftover:  # give lingering workers a moment, then kill them
        deadline = time.monotonic() + 3
        while leftover and time.monotonic() < deadline:
            time.sleep(0.05)
            leftover = sorted(tree_pids(proc.pid) - {proc.pid})
        _killpg(proc.pid)
    rec = {"workload": row, "lib": lib, "status": status, "time_s": None,
           "process_s": round(process_s, 4), "pss_peak_mb": round(sampler.pss / 1024, 1),
           "rss_peak_mb": round(sampler.rss / 1024, 1),
           "shm_peak_mb": round(sampler.shm / 1024, 1),
           "pss_plus_unmapped_shm_peak_mb": round(sampler.pss_shm / 1024, 1),
           "max_processes": sampler.nproc,
           "samples": sampler.samples, "leftover_after_3s": len(leftover)}
    if status == "ok" and proc.returncode != 0:
        wrong = "AssertionError" in err and "<check>" in err
        rec["status"] = "WRONG" if wrong else f"error rc={proc.returncode}"
    if rec["status"] != "ok":
        rec["stderr_tail"] = err[-2000:]
    else:
        rec["time_s"] = json.loads(out.strip().splitlines()[-1])["time_s"]
    return rec


def _killpg(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- calibration, machine info
def calibrate(target_s=0.005):
    """Loop count for a ~``target_s`` spin(), and the median time of one such task here."""
    spin(200_000)
    t0 = time.perf_counter()
    spin(200_000)
    loops = max(1, round(200_000 * target_s / (time.perf_counter() - t0)))
    for _ in range(2):  # refine on medians
        ts = []
        for _ in range(15):
            t0 = time.perf_counter()
            spin(loops)
            ts.append(time.perf_counter() - t0)
        loops = max(1, round(loops * target_s / statistics.median(ts)))
    ts = []
    for _ in range(31):
        t0 = time.perf_counter()
        spin(loops)
        ts.append(time.perf_counter() - t0)
    return loops, statistics.median(ts)


def machine_info():
    from importlib import metadata
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            mem_gb = round(int(fh.readline().split()[1]) / 1024 ** 2, 1)
    except OSError:
        mem_gb = None
    versions = {}
    for dist in ("joblib", "mpire", "numpy", "psutil", "matplotlib"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    sys.path.insert(0, ROOT)
    try:
        import parmap
        versions["parmap"] = parmap.__version__
    except Exception as exc:  # broken working tree: still benchmark the peers
        versions["parmap"] = f"import failed: {exc!r}"
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"cpu_model": model, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)), "memory_gb": mem_gb,
            "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions, "git": rev,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


# ---------------------------------------------------------------- driver
def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 5, --quick 1)")
    ap.add_argument("--only", default="", help="comma-separated workloads: " + ",".join(WORKLOADS))
    ap.add_argument("--libs", default="", help="comma-separated libraries: " + ",".join(LIBS))
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "latest.json"))
    ap.add_argument("--png", default=os.path.join(ROOT, "docs", "_static", "benchmarks.png"))
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per run (default 120)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 rep, ~1/10 sizes")
    ap.add_argument("--situations", default=",".join(SITUATIONS),
                    help="script (no other thread), thread (one idle background thread, as "
                         "in a notebook kernel); default both")
    args = ap.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 5)
    args.only = [w for w in args.only.split(",") if w] or list(WORKLOADS)
    args.libs_named = bool(args.libs)
    args.libs = [x for x in args.libs.split(",") if x] or list(LIBS)
    for w in args.only:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    for x in args.libs:
        if x not in LIBS:
            ap.error(f"unknown library {x!r}; choose from {', '.join(LIBS)}")
    args.situations = [x for x in args.situations.split(",") if x]
    for x in args.situations:
        if x not in SITUATIONS:
            ap.error(f"unknown situation {x!r}; choose from {', '.join(SITUATIONS)}")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    info = machine_info()
    loops, single_s = calibrate()
    plan = {}
    for w in args.only:
        for situation in args.situations:
            thread = situation == "thread"
            if thread and WORKLOADS[w].get("script_only"):
                continue
            plan[w + (THREAD_SUFFIX if thread else "")] = row_libs(w, thread, args.libs,
                                                                    args.libs_named)
    prm = {row: params(split_row(row)[0], args.quick, loops) for row in plan}
    print(f"parmap benchmark suite: {info['cpu_model']}, {info['cpu_count']} CPUs, "
          f"Python {info['python']}, reps={args.reps}, quick={args.quick}, n_jobs=2, "
          f"situations: {', '.join(args.situations)}")
    print(f"cpu workload: spin({loops}) takes {single_s * 1e3:.2f} ms here")
    # The peers are installed, with their bytecode compiled by pip; parmap runs from this
    # checkout. Compile its bytecode too (PYTHONDONTWRITEBYTECODE may be set), or every
    # fresh interpreter would pay for compiling parmap's source. Forced: compileall keeps
    # a bytecode file whose recorded mtime matches its source's to the second, while the
    # importer also checks the size and rejects it (a file edited again in that second,
    # as a checkout does: one module compiled at every import, 3-6 ms, seen here).
    compileall.compile_dir(os.path.join(ROOT, "parmap"), quiet=1, force=True)
    # Warm the page cache of every library once, untimed.
    subprocess.run([sys.executable, "-c", "import numpy, joblib, mpire, parmap, concurrent.futures"],
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True)
    runs = []
    for rep in range(args.reps):
        for w, libs in plan.items():
            k = rep % len(libs) if libs else 0
            for lib in libs[k:] + libs[:k]:
                rec = run_one(w, lib, prm[w], args.timeout)
                rec["rep"] = rep
                runs.append(rec)
                t = f"{rec['time_s']:.3f} s" if rec["time_s"] is not None else rec["status"]
                print(f"  rep {rep + 1}/{args.reps}  {w:<22}{lib:<17}{t:>10}"
                      f"  PSS {rec['pss_peak_mb']:>7.0f} MB", flush=True)
                if rec["status"] != "ok":
                    print("    " + rec.get("stderr_tail", "").strip().replace("\n", "\n    "),
                          file=sys.stderr)
    extra = {}
    for row in plan:
        w = split_row(row)[0]
        if w == "cpu":
            extra[row] = {"ideal_s": prm[row]["N"] * single_s / 2}
        if w == "numpy-args":
            extra[row] = {"array_mb": prm[row]["SIZE"] * 8 / 1e6}
    summary = report.summarize(runs, plan)
    total_s = time.perf_counter() - started
    result = {"machine": info,
              "config": {"reps": args.reps, "quick": args.quick, "n_jobs": 2,
                         "timeout_s": args.timeout, "sample_interval_s": SAMPLE_S,
                         "spin_loops": loops, "spin_single_s": single_s, "params": prm,
                         "situations": args.situations,
                         "code": {w: {x: WORKLOADS[w]["code"][x] for x in plan[row]}
                                  for row in plan for w in [split_row(row)[0]]}},
              "extra": extra, "summary": summary, "runs": runs, "total_s": round(total_s, 1)}
    print()
    print(report.tables(summary, plan, extra))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"\nwrote {os.path.relpath(args.json)}", end="")
    if args.png:
        report.chart(summary, plan, extra, info, args.png)
        print(f" and {os.path.relpath(args.png)}", end="")
    print(f"; whole run {total_s / 60:.1f} min")
    bad = [r for r in runs if r["status"] != "ok"]
    if bad:
        print(f"\n{len(bad)} run(s) FAILED: " + ", ".join(
            sorted({f"{r['lib']}/{r['workload']}: {r['status']}" for r in bad})), file=sys.stderr)
        return 1
    return 0
