"""The CPU time this process may use, from its cgroup: the allotment a latency was measured under.

A pod's CPU limit becomes a CFS quota: ``quota / period`` cores per period, enforced by throttling.
A latency measured under 1.5 cores or with no limit on a shared node means something else than one
measured under 2 whole cores of a Guaranteed pod, so the model card records which it was.

cgroup v2 keeps ``cpu.max`` ("max 100000" or "200000 100000") in each cgroup below the root; cgroup v1
keeps ``cpu.cfs_quota_us`` (-1: none) and ``cpu.cfs_period_us`` in the ``cpu`` hierarchy. A parent's
quota bounds its children, so the effective allotment is the smallest along the path to the root.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def cpu_allotment(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> dict:
    """``{"cpu_quota_cores": 2.0 or None (no quota), "whole_cores": bool or None, "cgroup": "v2",
    "v1" or None (none readable), "cpus_usable": CPUs in this process's affinity mask}``."""
    lines = _read(proc_cgroup) or ""
    entries = [line.split(":", 2) for line in lines.splitlines() if line.count(":") >= 2]
    if (cgroup_root / "cgroup.controllers").is_file():  # the unified (v2 only) hierarchy
        path = next((p for hid, ctl, p in entries if hid == "0" and ctl == ""), "/")
        version, cores = "v2", _smallest(cgroup_root, path, _v2_cores)
    else:
        version, cores = _v1(cgroup_root, entries)
    whole = None if cores is None else abs(cores - round(cores)) < 1e-9
    return {"cpu_quota_cores": None if cores is None else round(cores, 4), "whole_cores": whole,
            "cgroup": version, "cpus_usable": len(os.sched_getaffinity(0))}


def _v1(root: Path, entries: list[list[str]]) -> tuple[str | None, float | None]:
    for _, controllers, path in entries:
        if "cpu" in controllers.split(","):
            for mount in (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu"):
                if (root / mount / "cpu.cfs_quota_us").is_file():
                    return "v1", _smallest(root / mount, path, _v1_cores)
    return None, None


def _smallest(mount: Path, path: str, read_cores) -> float | None:
    """The smallest quota from the process's cgroup up to the mount's root. Inside a container without
    its own cgroup namespace the host's path is not there: the mount's root is the container's cgroup."""
    here = mount / path.strip("/")
    if not here.is_dir():
        here = mount
    levels = [here, *here.parents]
    quotas = [c for c in map(read_cores, levels[:levels.index(mount) + 1]) if c is not None]
    return min(quotas) if quotas else None


def _v2_cores(folder: Path) -> float | None:
    parts = (_read(folder / "cpu.max") or "max").split()
    if parts[0] == "max" or len(parts) != 2:
        return None
    return int(parts[0]) / int(parts[1])


def _v1_cores(folder: Path) -> float | None:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    if quota is None or period is None or int(quota) <= 0:
        return None
    return int(quota) / int(period)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
