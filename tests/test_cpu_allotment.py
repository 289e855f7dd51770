"""The CPU allotment a latency is measured under, from cgroup files: laid out as v2 and v1 kernels and
container runtimes lay them out, and from a real cgroup where this machine lets root make one."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from onceforall.specialization.cpu_allotment import cpu_allotment


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_v2_the_smallest_quota_on_the_path_to_the_root(tmp_path):
    root, proc = tmp_path / "cgroup", tmp_path / "proc-cgroup"
    _write(root / "cgroup.controllers", "cpu memory")
    _write(root / "kubepods.slice" / "cpu.max", "400000 100000")           # the node's pods: 4 cores
    _write(root / "kubepods.slice" / "pod1" / "cpu.max", "200000 100000")  # the pod's limit: 2 cores
    _write(root / "kubepods.slice" / "pod1" / "ctr" / "cpu.max", "max 100000")
    _write(proc, "0::/kubepods.slice/pod1/ctr")
    got = cpu_allotment(root, proc)
    assert got["cpu_quota_cores"] == 2.0 and got["whole_cores"] is True and got["cgroup"] == "v2"
    assert got["cpus_usable"] == len(os.sched_getaffinity(0))
    _write(root / "kubepods.slice" / "pod1" / "cpu.max", "150000 100000")  # a Burstable 1500m limit
    assert cpu_allotment(root, proc)["cpu_quota_cores"] == 1.5
    assert cpu_allotment(root, proc)["whole_cores"] is False


def test_v2_in_a_cgroup_namespace_and_without_any_limit(tmp_path):
    root, proc = tmp_path / "cgroup", tmp_path / "proc-cgroup"
    _write(root / "cgroup.controllers", "cpu")
    _write(root / "cpu.max", "300000 100000")  # a container's own namespace: its cgroup is the root
    _write(proc, "0::/")
    assert cpu_allotment(root, proc)["cpu_quota_cores"] == 3.0
    _write(root / "cpu.max", "max 100000")
    got = cpu_allotment(root, proc)
    assert got["cpu_quota_cores"] is None and got["whole_cores"] is None and got["cgroup"] == "v2"


def test_v1_container_sees_its_cgroup_at_the_mount_root(tmp_path):
    root, proc = tmp_path / "cgroup", tmp_path / "proc-cgroup"
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "100000")  # the host's path is not mounted here
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000")
    _write(proc, "4:memory:/kubepods/pod1/abc\n3:cpu,cpuacct:/kubepods/pod1/abc\n0::/")
    got = cpu_allotment(root, proc)
    assert got == {**got, "cpu_quota_cores": 1.0, "whole_cores": True, "cgroup": "v1"}
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1")
    assert cpu_allotment(root, proc)["cpu_quota_cores"] is None


def test_no_readable_cgroup_is_unknown_not_an_error(tmp_path):
    got = cpu_allotment(tmp_path / "none", tmp_path / "none-either")
    assert got["cgroup"] is None and got["cpu_quota_cores"] is None


V1_CPU = Path("/sys/fs/cgroup/cpu")


@pytest.mark.skipif(not (V1_CPU / "cpu.cfs_quota_us").is_file(), reason="needs the cgroup v1 cpu hierarchy")
def test_a_real_cgroup_quota_is_read():
    folder = V1_CPU / f"ofa-test-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
    except PermissionError:
        pytest.skip("making a cgroup needs root")
    try:
        (folder / "cpu.cfs_period_us").write_text("100000")
        (folder / "cpu.cfs_quota_us").write_text("150000")
        code = ("import json; from onceforall.specialization.cpu_allotment import cpu_allotment; "
                "print(json.dumps(cpu_allotment()))")
        # the shell joins the cgroup, then becomes the Python process that reads it
        proc = subprocess.run(["sh", "-c", f'echo $$ > {folder}/cgroup.procs && exec "$0" -c "$1"',
                               sys.executable, code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)
        assert got["cpu_quota_cores"] == 1.5 and got["whole_cores"] is False and got["cgroup"] == "v1"
    finally:
        folder.rmdir()  # empty again: the process has exited
