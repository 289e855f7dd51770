"""Bad input: one line naming the file, the field and the fix; exit 2; no traceback."""

import subprocess
import sys

import pytest

from onceforall.supernet import checkpoint as ckpt
from onceforall.training.schedule import smoke
from onceforall.supernet.space import get_space
from onceforall.training.train import run_phase


def ofa(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onceforall", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ofa: error:") and "Traceback" not in proc.stderr
    assert "fix:" in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("ckpt") / "teacher"
    run_phase(get_space("fashion-mnist"), smoke(), "teacher", tiny_data, out, progress=False)
    return out


def test_space_yaml_malformed(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nunits: [\n")
    assert_user_error(ofa("space", "show", str(path)), str(path), "YAML")


def test_space_yaml_inconsistent(tmp_path):
    text = get_space("fashion-mnist").to_dict()
    text["kernels"] = [3, 6]
    import yaml

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(text))
    assert_user_error(ofa("train", "--space", str(path), "--data", "synthetic", "--out",
                          str(tmp_path / "o")), str(path), "kernels")


def test_unknown_schedule(tmp_path):
    assert_user_error(ofa("train", "--schedule", "fast", "--data", "synthetic", "--out",
                          str(tmp_path)), "schedule", "smoke")


def test_missing_dataset_folder(tmp_path):
    assert_user_error(ofa("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")),
                      "missing", "data")


def test_malformed_dataset_folder(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"garbage!")
    assert_user_error(ofa("train", "--data", str(tmp_path), "--out", str(tmp_path / "o")),
                      "train-images")


def test_corrupted_checkpoint(teacher, tmp_path):
    import shutil

    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    raw = bytearray((copy / ckpt.WEIGHTS).read_bytes())
    raw[-3] ^= 0x55
    (copy / ckpt.WEIGHTS).write_bytes(bytes(raw))
    assert_user_error(ofa("evaluate", "--checkpoint", str(copy), "--data", "synthetic"),
                      "weights.safetensors", "sha256")


def test_checkpoint_sidecar_not_json(teacher, tmp_path):
    import shutil

    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    (copy / ckpt.SIDECAR).write_text("{not json")
    assert_user_error(ofa("evaluate", "--checkpoint", str(copy), "--data", "synthetic"),
                      "checkpoint.json")


def test_checkpoint_of_another_space(teacher, tmp_path):
    import yaml

    raw = get_space("fashion-mnist").to_dict()
    raw["feature_width"] = 256
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert_user_error(ofa("phase", "kernel", "--space", str(path), "--schedule", "smoke", "--data",
                          "synthetic", "--init", str(teacher), "--teacher", str(teacher), "--out",
                          str(tmp_path / "k")), "space", "checkpoint.json")


def test_bad_subnet_config(teacher):
    assert_user_error(ofa("evaluate", "--checkpoint", str(teacher), "--data", "synthetic",
                          "--config", '{"r": 28, "d": [4, 4], "k": [7], "e": [6]}'), "d")


def test_space_count_and_sample():
    out = ofa("space", "count", "imagenet-mbv3")
    assert out.returncode == 0 and '"architectures"' in out.stdout
    out = ofa("sample", "-n", "3", "--seed", "1")
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 3


def test_search_refined_without_the_predictors_rows(tmp_path):
    proc = ofa("search", "--target", "phone-macs", "--predictor", str(tmp_path / "p.safetensors"),
               "--out", str(tmp_path / "s"), "--supernet", str(tmp_path / "supernet"))
    assert_user_error(proc, "--rows", "accuracy data")
