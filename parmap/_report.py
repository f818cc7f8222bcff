"""The words of ``print(parallel.insights)``: a one-screen report and the advice in it.

:func:`advise` reads the figures of ``Insights.to_dict()`` (no measurement of its own) and
returns plain sentences, the biggest cause of lost time first; :func:`report` lays the
figures and the advice out. Every threshold is a share of the run, so the same rules hold
for a 50 ms call and an hour-long one.
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["report", "advise", "seconds", "nbytes", "percent"]

#: a cause is worth a sentence when it costs at least this share of the workers' time
NOTABLE = 0.2
#: batch_size advice aims for this share of per-batch overhead
TARGET_OVERHEAD = 0.05
#: transfer per task worth a sentence, in bytes
BIG = 1024 ** 2
#: from this many bytes per task, data volume rather than the number of batches is what
#: costs (below, a batch's transfer time is mostly fixed: a message, a wake-up)
DATA_PER_TASK = 64 * 1024
#: mean task time below which a CPU clock's own cost blurs the CPU share
MEASURABLE_CPU = 50e-6


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1e-6:
        return f"{value * 1e9:.0f} ns"
    if value < 1e-3:
        return f"{value * 1e6:.3g} µs"
    if value < 1:
        return f"{value * 1e3:.3g} ms"
    if value < 120:
        return f"{value:.3g} s"
    return f"{value / 60:.1f} min"


def nbytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} TiB"  # not reached


def percent(share: float | None) -> str:
    if share is None:
        return "-"
    return f"{share * 100:.0f} %" if share >= 0.01 or share == 0 else "<1 %"


def report(data: dict[str, Any]) -> str:
    """The one-screen report of ``Insights.to_dict()``."""
    n, wall, workers = data["n_tasks"], data["wall_s"], data["n_workers"]
    state = "running" if data["running"] else "finished" if data["finished"] else \
        "failed or cancelled"
    t, tasks, tr = data["time"], data["tasks"], data["transfer"]
    lines = [f"parmap insights: {n} tasks in {data['n_batches']} batches on {workers} "
             f"{data['backend']} worker{'s' if workers != 1 else ''}, {seconds(wall)} "
             f"({state})",
             f"Workers' time ({workers} x {seconds(wall)}): compute {percent(t['compute'])}, "
             f"transfer {percent(t['transfer'])}, other batch overhead "
             f"{percent(t['in_batch_overhead'])}, idle {percent(t['idle'])} (start-up "
             f"{percent(t['idle_startup'])}, between batches {percent(t['idle_between'])}, "
             f"at the end {percent(t['idle_end'])})", ""]
    if n:
        lines.append(f"Tasks: mean {seconds(tasks['mean_s'])}, median ~{seconds(tasks['p50_s'])}"
                     f", p90 ~{seconds(tasks['p90_s'])}, p99 ~{seconds(tasks['p99_s'])}, max "
                     f"{seconds(tasks['max_s'])}; {_cpu(tasks)}")
        for slow in tasks["slowest"][:3]:
            lines.append(f"  slowest: {seconds(slow['wall_s']):>9}  task {slow['index']}: "
                         f"{slow['call']}")
    shm = f" ({nbytes(tr['shm_result_bytes'])} of results through /dev/shm)" \
        if tr["shm_result_bytes"] else ""
    lines.append(f"Transfer: {nbytes(tr['to_workers_bytes'])} to the workers, "
                 f"{nbytes(tr['from_workers_bytes'])} back{shm}; pickling "
                 f"{seconds(tr['caller_pickle_s'])} in the caller + "
                 f"{seconds(tr['worker_pickle_s'])} in workers, unpickling "
                 f"{seconds(tr['worker_unpickle_s'])} in workers + "
                 f"{seconds(tr['caller_unpickle_s'])} in the caller" + (
                     f"; workers waited {seconds(tr['worker_send_s'])} for the caller to "
                     f"read their replies" if tr["worker_send_s"] >= 1e-3 else ""))
    queue, caller, startup = data["queue_wait_s"], data["caller"], data["startup"]
    lines.append(f"Queues: batches waited {seconds(queue['mean'])} on average (max "
                 f"{seconds(queue['max'])}) from dispatch to start")
    lines.append(f"Caller: reading the input {seconds(caller['input_s'])}, your loop over "
                 f"the results {seconds(caller['consumer_s'])}")
    new = f"; {startup['new_workers']} worker(s) started for this call" \
        if startup["new_workers"] else ""
    new += f"; workers replaced {startup['replaced_workers']} time(s) during it" \
        if startup["replaced_workers"] else ""
    lines.append(f"Start-up: the first task ran {seconds(startup['first_task_s'])} after the "
                 f"call began{new}")
    lines.append("")
    lines.append(f"  {'worker':<18} {'batches':>7} {'tasks':>7} {'busy':>9} {'util.':>6} "
                 f"{'RSS':>10} {'peak RSS':>10}")
    for w in data["workers"][:12]:
        lines.append(f"  {w['worker'][:18]:<18} {w['batches']:>7} {w['tasks']:>7} "
                     f"{seconds(w['busy_s']):>9} {percent(w['utilisation']):>6} "
                     f"{nbytes(w['rss_bytes']):>10} {nbytes(w['peak_rss_bytes']):>10}")
    if len(data["workers"]) > 12:
        lines.append(f"  ... and {len(data['workers']) - 12} more (see to_dict())")
    lines.append("")
    lines.append("What to change:")
    lines += [f"* {text}" for text in data["advice"]]
    return "\n".join(lines)


def _cpu(tasks: dict[str, Any]) -> str:
    if (tasks["mean_s"] or 0.0) < MEASURABLE_CPU:
        return "too short to tell their CPU time"
    return f"CPU {percent(tasks['cpu_share'])} of their time"


def advise(data: dict[str, Any]) -> list[str]:
    """Plain sentences: what dominates the run and what to change, biggest first."""
    n = data["n_tasks"]
    if not n:
        return ["No task has completed yet: nothing to tell."]
    found: list[tuple[float, str]] = []
    for rule in (_startup, _recycling, _overhead, _input, _consumer, _caller, _big_data,
                 _tail, _gil, _waiting):
        advice = rule(data)
        if advice is not None:
            found.append(advice)
    if not found:
        compute = data["time"]["compute"]
        if compute >= 0.75:
            return [f"Nothing to change: the workers computed {percent(compute)} of the time. "
                    f"Only more cores or faster tasks would make this run faster."]
        return [f"No single cause dominates: the workers computed {percent(compute)} of the "
                f"time; the rest is split as the shares above show."]
    found.sort(key=lambda item: -item[0])
    return [text for _, text in found]


def _startup(d: dict[str, Any]) -> tuple[float, str] | None:
    share, first = d["time"]["idle_startup"], d["startup"]["first_task_s"]
    if share < NOTABLE or first is None:
        return None
    new = d["startup"]["new_workers"]
    if not new and d["caller"]["input_s"] >= 0.2 * d["wall_s"]:
        return None  # the input was slow: see _input
    if new:
        return share, (f"Starting {new} worker process{'es' if new > 1 else ''} cost "
                       f"{percent(share)} of the workers' time (the first task ran "
                       f"{seconds(first)} after the call began). The pool is kept for later "
                       f"calls (idle_timeout, 300 s by default), so a program pays this once; "
                       f"for a single short call, backend='threading' or n_jobs=1 may be "
                       f"faster.")
    return share, (f"Workers waited {percent(share)} of their time for their first batch "
                   f"(the first task ran {seconds(first)} after the call began): the input's "
                   f"first items, or the first batch's pickling, are slow.")


def _recycling(d: dict[str, Any]) -> tuple[float, str] | None:
    replaced, share = d["startup"]["replaced_workers"], d["time"]["idle_between"]
    if not replaced or share < NOTABLE:
        return None
    return share, (f"Workers were replaced {replaced} time{'s' if replaced > 1 else ''} "
                   f"during the call (max_tasks_per_child or max_memory_per_child), and sat "
                   f"idle {percent(share)} of their time between batches, mostly while "
                   f"their replacements started: recycle less often (a larger "
                   f"max_tasks_per_child) if memory allows.")


def _overhead(d: dict[str, Any]) -> tuple[float, str] | None:
    t, tasks, tr = d["time"], d["tasks"], d["transfer"]
    wall, workers = d["wall_s"], d["n_workers"]
    lost = (t["transfer"] + t["in_batch_overhead"] + t["idle_between"]) * workers * wall
    work = tasks["total_s"]
    share = lost / (lost + work) if lost + work > 0 else 0.0
    caller = d["caller"]
    n, n_batches = d["n_tasks"], d["n_batches"]
    # the typical task (a slow outlier says nothing of what a batch of others costs)
    mean = min(tasks["mean_s"] or 0.0, tasks["p50_s"] or math.inf)
    data = (tr["to_workers_bytes"] + tr["from_workers_bytes"]) / n
    if share < NOTABLE or data >= DATA_PER_TASK or \
            caller["input_s"] + caller["consumer_s"] >= 0.2 * wall:
        return None  # see _big_data, _input and _consumer
    size, per_batch = n / n_batches, lost / n_batches

    def overhead_at(b: float) -> float:
        return float(per_batch / (per_batch + b * mean))

    most = max(1, n // (4 * workers))  # every worker must still get batches
    better = 2 ** math.ceil(math.log2(max(size * 2, 2)))
    while better < most and overhead_at(better) > TARGET_OVERHEAD:
        better *= 2
    better = min(better, most)
    head = (f"Tasks take ~{seconds(mean)} each and each batch of ~{size:.0f} loses "
            f"{seconds(per_batch)} to dispatch and transfer: per-task overhead is "
            f"{percent(share)} of the run")
    if overhead_at(most) > 0.25:
        return share, (f"{head}. All the tasks together are {seconds(work)} of work, too "
                       f"little to gain from {workers} workers: run them with n_jobs=1, or "
                       f"give each task more work.")
    if better > size and overhead_at(better) < share / 2:
        return share, (f"{head}; batch_size={better} would cut it to "
                       f"~{percent(overhead_at(better))}.")
    return share, (f"{head}, and this call has too few tasks to amortise it with bigger "
                   f"batches: give each call more tasks, or use backend='threading' for "
                   f"tiny tasks.")


def _input(d: dict[str, Any]) -> tuple[float, str] | None:
    idle, read = d["time"]["idle"], d["caller"]["input_s"]
    if idle < NOTABLE or read < 0.2 * d["wall_s"]:
        return None
    return idle, (f"Workers sat idle {percent(idle)} of the time waiting for the input "
                  f"generator: reading it took {seconds(read)} of the {seconds(d['wall_s'])} "
                  f"run. Make the input cheap (precompute it) and move the expensive part "
                  f"into the tasks.")


def _consumer(d: dict[str, Any]) -> tuple[float, str] | None:
    idle, loop = d["time"]["idle"], d["caller"]["consumer_s"]
    if idle < NOTABLE or loop < 0.2 * d["wall_s"]:
        return None
    return idle, (f"Workers sat idle {percent(idle)} of the time waiting for your loop over "
                  f"the results, which took {seconds(loop)}: at most pre_dispatch batches run "
                  f"ahead of it. Consume faster, or raise pre_dispatch.")


def _caller(d: dict[str, Any]) -> tuple[float, str] | None:
    tr, wall = d["transfer"], d["wall_s"]
    busy = tr["caller_pickle_s"] + tr["caller_unpickle_s"]
    if busy < 0.3 * wall:
        return None
    return busy / wall, (f"The caller spent {seconds(busy)} ({percent(busy / wall)} of the run) "
                         f"pickling tasks and unpickling results for {d['n_workers']} workers: "
                         f"it is the bottleneck. Send less data per task; numpy arrays above "
                         f"max_nbytes travel through shared memory instead.")


def _big_data(d: dict[str, Any]) -> tuple[float, str] | None:
    tr, n, wall = d["transfer"], d["n_tasks"], d["wall_s"]
    back, out = tr["from_workers_bytes"] / n, tr["to_workers_bytes"] / n
    back_s = tr["worker_pickle_s"] + tr["caller_unpickle_s"] + tr["worker_send_s"]
    if back >= BIG:
        return max(back_s / wall, 0.01), (
            f"Results of {nbytes(back)} each are pickled through a pipe ("
            f"{seconds(back_s)} of pickling and sending): return "
            f"numpy arrays, which come back through shared memory above max_nbytes ('1M' by "
            f"default, unpickled), or write big results to files and return their paths.")
    if out >= BIG:
        cost = (tr["caller_pickle_s"] + tr["worker_unpickle_s"]) / wall
        return max(cost, 0.01), (
            f"Each task sends {nbytes(out)} of arguments through a pipe: pass big data as "
            f"numpy arrays (placed once in shared memory above max_nbytes), or load it inside "
            f"the task or once per worker with initializer=.")
    return None


def _tail(d: dict[str, Any]) -> tuple[float, str] | None:
    end = d["time"]["idle_end"]
    if end < NOTABLE or d["n_workers"] < 2:
        return None
    slow = d["tasks"]["slowest"][0] if d["tasks"]["slowest"] else None
    if slow is not None and slow["wall_s"] >= 0.2 * d["wall_s"]:
        return end, (f"The slowest task, task {slow['index']}: {slow['call']}, ran "
                     f"{seconds(slow['wall_s'])} ({percent(slow['wall_s'] / d['wall_s'])} of "
                     f"the run); the other workers sat idle at the end waiting for it "
                     f"({percent(end)} of the workers' time). Split it into smaller tasks, "
                     f"or submit the longest tasks first.")
    return end, (f"Workers sat idle {percent(end)} of their time at the end while the last "
                 f"batches finished: task times vary. Submitting the longest tasks first, or "
                 f"a smaller batch_size, evens out the end.")


def _gil(d: dict[str, Any]) -> tuple[float, str] | None:
    """CPU-bound tasks on threads that never used more than one core between them."""
    tasks, wall, workers = d["tasks"], d["wall_s"], d["n_workers"]
    share = tasks["cpu_share"]
    if d["backend"] != "threading" or workers < 2 or share is None or share < 0.5 or \
            (tasks["mean_s"] or 0.0) < MEASURABLE_CPU:
        return None
    cores = tasks["cpu_s"] / wall
    if cores > 1.2:
        return None
    return 1.1 - cores / workers, (
        f"The threads took turns: the tasks computed ({percent(share)} of their time on "
        f"the CPU) but used {seconds(tasks['cpu_s'])} of CPU in a {seconds(wall)} run, at "
        f"most one core's worth, while {workers} threads ran them. Python code holds the "
        f"GIL: use backend='processes' (threads suit code that releases it: numpy, I/O).")


def _waiting(d: dict[str, Any]) -> tuple[float, str] | None:
    tasks, t = d["tasks"], d["time"]
    share = tasks["cpu_share"]
    if share is None or share >= 0.3 or t["compute"] < 0.5 or d["backend"] == "sequential":
        return None
    more = "more threads (a higher n_jobs)" if d["backend"] == "threading" else \
        "more workers than cores (a higher n_jobs) or backend='threading'"
    return 0.5 * (1 - share), (
        f"Tasks spent {percent(1 - share)} of their time waiting, not computing (I/O, sleep, "
        f"locks): {more} would overlap the waits.")
