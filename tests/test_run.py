"""``ofa run`` / ``submit`` / ``schedule`` from the outside: bad input, S3 end to end, failed runs."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from onceforall.supernet.space import UnitSpec, get_space, space_yaml

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
CHEAP_TARGETS = {"targets": [
    {"name": "phone-macs", "runtime": "onnxruntime", "constraint": {"kind": "macs", "budget": 4.0e6}},
    {"name": "mcu-params", "runtime": "onnxruntime", "constraint": {"kind": "params", "budget": 7.0e5}}]}


def ofa(*args, env=None, timeout=900):
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "onceforall", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=full)


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith("ofa: error:") and "fix:" in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def targets_file(tmp_path):
    def write(doc, name="targets.yaml"):
        path = tmp_path / name
        path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
        return path
    return write


def test_run_bad_targets(tmp_path, targets_file):
    assert_user_error(ofa("run", "--data", "synthetic:300", "--targets", tmp_path / "nope.yaml"), "nope.yaml")
    assert_user_error(ofa("run", "--data", "synthetic:300", "--targets", targets_file("targets: [\n")),
                      "targets.yaml", "YAML")
    tiny = {"targets": [{**CHEAP_TARGETS["targets"][0], "constraint": {"kind": "macs", "budget": 10}}]}
    assert_user_error(ofa("run", "--data", "synthetic:300", "--targets", targets_file(tiny)),
                      "constraint.budget", "phone-macs", "at least")


def test_run_bad_space_schedule_data(tmp_path):
    assert_user_error(ofa("run", "--schedule", "weekly"), "schedule", "weekly")
    assert_user_error(ofa("run", "--space", "resnet"), "resnet")
    assert_user_error(ofa("run", "--data", tmp_path / "missing"), "missing", "data")


def test_run_bad_s3(s3_server, tmp_path):
    bucket = s3_server.bucket()
    assert_user_error(ofa("run", "--data", "s3://no-such-bucket/fmnist"), "no-such-bucket")
    assert_user_error(ofa("run", "--data", f"{bucket}/empty/", "--out", tmp_path / "o"), f"{bucket}/empty")
    assert_user_error(ofa("run", "--data", "synthetic:300", "--out", "s3://no-such-bucket/out"),
                      "no-such-bucket")
    unreachable = ofa("run", "--data", f"{bucket}/x", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
                      timeout=60)
    assert_user_error(unreachable, "127.0.0.1:9")


def test_cluster_commands_bad_input():
    assert_user_error(ofa("schedule", "--host", "http://127.0.0.1:9", "--cron", "0 25 * * *"), "cron", "hour")
    assert_user_error(ofa("submit", "--host", "http://127.0.0.1:9", timeout=60), "127.0.0.1:9", "--host")
    assert_user_error(ofa("submit", "--host", "http://127.0.0.1:9", "--param", "seed"), "param")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_run_reads_data_from_s3_and_publishes_to_s3(s3_server, tmp_path, targets_file):
    """A whole local run: dataset read from a bucket, models, report and stage artifacts written there."""
    bucket = s3_server.bucket()
    s3 = s3_server.client()
    for f in FASHION.iterdir():
        s3.upload_file(str(f), bucket[5:], f"datasets/fashion-mnist/{f.name}")
    proc = ofa("run", "--schedule", "smoke", "--data", f"{bucket}/datasets/fashion-mnist",
               "--targets", targets_file(CHEAP_TARGETS), "--out", f"{bucket}/published",
               "--pipeline-root", f"{bucket}/pipeline-root", env={"OFA_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket[5:])
            for o in page.get("Contents", [])}
    for name in ("phone-macs", "mcu-params"):
        assert {f"published/models/{name}/model.onnx", f"published/models/{name}/model_card.json"} <= keys
    assert {"published/report.json", "published/report.md", "published/current.json"} <= keys
    release = json.loads(s3.get_object(Bucket=bucket[5:], Key="published/current.json")["Body"].read())
    assert f"published/releases/{release['release']}/models/phone-macs/model.onnx" in keys
    assert any(k.startswith("pipeline-root/") and k.endswith("checkpoint.json") for k in keys)
    card = json.loads(s3.get_object(Bucket=bucket[5:], Key="published/models/phone-macs/model_card.json")
                      ["Body"].read())
    assert card["dataset"]["source"] == f"{bucket}/datasets/fashion-mnist" and card["macs"] <= 4.0e6
    assert (tmp_path / "cache").is_dir()  # the dataset was downloaded once, into the cache


SMALL = dataclasses.replace(
    get_space("fashion-mnist"), name="small", stem_width=8, first_block_width=8,
    units=(UnitSpec(16, 2, "relu", False), UnitSpec(24, 2, "hswish", True)),
    kernels=(3, 5), expands=(3, 6), resolutions=(16, 20), final_expand_width=64, feature_width=64)


@pytest.mark.slow
def test_failed_run_publishes_nothing_and_keeps_what_was_there(tmp_path, targets_file):
    space = tmp_path / "small.yaml"
    space.write_text(space_yaml(SMALL))
    out = tmp_path / "published"
    earlier = {"models/mcu-params/model.onnx": b"earlier model", "models/mcu-params/model_card.json": b"{}",
               "report.json": b'{"run_id": "earlier"}'}
    for rel, data in earlier.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    # the second target's latency budget is found infeasible only once its table is measured
    doomed = {"targets": [CHEAP_TARGETS["targets"][1],
                          {"name": "too-fast", "runtime": "onnxruntime", "threads": 1,
                           "constraint": {"kind": "latency_ms", "budget": 1e-6}}]}
    proc = ofa("run", "--schedule", "smoke", "--space", space, "--data", "synthetic:600",
               "--targets", targets_file(doomed), "--out", out, "--pipeline-root", tmp_path / "root")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "a stage failed" in proc.stderr and "latency_ms budget" in proc.stderr
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == earlier
