"""How many CPUs this process may use: affinity mask, cgroup v1/v2 CPU quota, physical cores.

A leaf module: it imports nothing from parmap, so the worker pool can use it too.
"""
from __future__ import annotations

import math
import os

from ._public import public

__all__ = ["cpu_count", "cgroup_cpu_limit", "physical_core_count"]


@public
def cpu_count(only_physical_cores: bool = False) -> int:
    """CPUs this process may use: affinity mask and cgroup CPU quota taken into account.

    With ``only_physical_cores=True``, hyper-threads sharing a core count once (where the
    system says which they are).
    """
    count = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        try:
            count = len(os.sched_getaffinity(0)) or count
        except OSError:
            pass
    quota = cgroup_cpu_limit()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    if only_physical_cores:
        physical = physical_core_count()
        if physical:
            count = min(count, physical)
    return max(1, count)


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup",
                     proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's cgroup (v2 or v1) in CPUs, or None when unlimited."""
    candidates = []
    try:
        with open(proc_cgroup) as f:
            for line in f:
                parts = line.strip().split(":", 2)
                if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
                    candidates.append(os.path.join(root, parts[2].lstrip("/"), "cpu.max"))
    except OSError:
        pass
    candidates.append(os.path.join(root, "cpu.max"))
    for path in candidates:  # cgroup v2: "max 100000" or "200000 100000"
        text = _read(path)
        if text:
            quota, _, period = text.partition(" ")
            return _ratio(quota, period)
    for sub in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):  # cgroup v1
        v1_quota = _read(os.path.join(root, sub, "cpu.cfs_quota_us"))
        v1_period = _read(os.path.join(root, sub, "cpu.cfs_period_us"))
        if v1_quota and v1_period:
            return _ratio(v1_quota, v1_period)
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": no limit
        return None
    return q / p if q > 0 and p > 0 else None


def physical_core_count(cpuinfo: str = "/proc/cpuinfo") -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo, or None where that is unknown."""
    text = _read(cpuinfo)
    if not text:
        return None
    cores = set()
    package = core = None
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not key:
            if core is not None:
                cores.add((package, core))
            package = core = None
    return len(cores) or None
