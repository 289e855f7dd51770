"""Durable checkpoints: a training stage killed mid-phase continues, in a fresh pod, from its copy in S3."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onceforall.supernet import checkpoint as ckpt
from onceforall.training import durable
from onceforall.infra import store
from onceforall.errors import UserError
from onceforall.training.schedule import smoke
from onceforall.supernet.space import get_space
from onceforall.training.train import run_phase

SPACE = get_space("fashion-mnist")
# The quick schedule's teacher on 880 synthetic training images: 2 epochs of 6 steps (128 images),
# so that the kill lands mid-phase with room to spare; a checkpoint after every step (interval 0 s).
PHASE = ["teacher", "--schedule", "quick", "--data", "synthetic:1000", "--val-size", "120",
         "--checkpoint-every-s", "0"]


def _phase(out: Path, uri: str, **popen) -> subprocess.Popen:
    """``ofa phase`` in a process of its own, as a pod runs it (one thread: the same float sums)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "onceforall", "phase", *PHASE, "--out", str(out),
                             "--checkpoint-uri", uri], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _finish(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out), err


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _epochs(folder: Path) -> list[tuple]:
    lines = (folder / "log.jsonl").read_text().splitlines()
    return [(r["epoch"], r["global_step"], r["val_accuracy"]) for r in map(json.loads, lines)]


def _pointer(server, uri: str) -> dict | None:
    bucket, key = store.split_s3(store.join(uri, durable.POINTER))
    try:
        return json.loads(server.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    except server.client().exceptions.NoSuchKey:
        return None


def test_killed_stage_resumes_from_s3_in_a_fresh_pod(s3_server, tmp_path):
    bucket = s3_server.bucket()
    full, _ = _finish(_phase(tmp_path / "full", f"{bucket}/full.checkpoints"))

    uri = f"{bucket}/teacher.checkpoints"
    proc = _phase(tmp_path / "pod-1", uri)
    deadline, seen = time.monotonic() + 120, None
    while time.monotonic() < deadline and proc.poll() is None:
        seen = _pointer(s3_server, uri)
        if seen and seen["global_step"] >= 3:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # preempted: no chance to clean up or upload anything
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and seen and not seen["completed"], "killed too late"
    reached = ckpt.read_meta(tmp_path / "pod-1")["global_step"]  # the last step pod 1 finished

    # The retried pod starts with an empty output folder: everything it knows comes from S3.
    result, err = _finish(_phase(tmp_path / "pod-2", uri))
    resumed = result["resumed_from_step"]
    assert result["resumed_from"] == uri and f"resumed at step {resumed}/" in err
    # nothing published was lost; at most one interval (one step here) is done again
    assert seen["global_step"] <= resumed <= reached <= resumed + 1
    assert result["steps"] == full["steps"] == 12
    weights = [tmp_path / d / ckpt.WEIGHTS for d in ("full", "pod-2")]
    assert _sha256(weights[0]) == _sha256(weights[1])
    # the per-epoch log travels with the checkpoint: both epochs' validation, as uninterrupted
    assert _epochs(tmp_path / "pod-2") == _epochs(tmp_path / "full") and len(_epochs(tmp_path / "full")) == 2

    # A pod retried after the phase finished (its output's upload failed) trains nothing again.
    again, _ = _finish(_phase(tmp_path / "pod-3", uri))
    assert again == result | {"folder": str(tmp_path / "pod-3")}
    assert _sha256(tmp_path / "pod-3" / ckpt.WEIGHTS) == _sha256(weights[0])


def _cut(data, out: Path, uri: str, steps: int = 2):
    """A smoke teacher stopped after ``steps`` steps, each checkpointed to ``uri``."""
    import dataclasses

    schedule = dataclasses.replace(smoke(), checkpoint_every_s=0.0)
    return run_phase(SPACE, schedule, "teacher", data, out, progress=False, stop_after_steps=steps,
                     checkpoint_uri=uri)


def test_an_upload_cut_short_leaves_the_previous_checkpoint(s3_server, tiny_data, tmp_path):
    uri = f"{s3_server.bucket()}/teacher.checkpoints"
    _cut(tiny_data, tmp_path / "pod-1", uri)
    pointer = durable.latest(uri, "teacher")
    assert pointer["global_step"] == 2 and not pointer["completed"]
    # the next checkpoint's upload dies halfway: new files in the other slot, the pointer not moved
    other = durable.SLOTS[1 - durable.SLOTS.index(pointer["slot"])]
    for name in (ckpt.WEIGHTS, ckpt.SIDECAR):
        store.write_text(store.join(uri, other, name), "half an upload")
    assert durable.latest(uri, "teacher") == pointer
    durable.pull(uri, pointer, tmp_path / "pod-2")
    restored = ckpt.load_checkpoint(tmp_path / "pod-2", space=SPACE, with_optimizer=True)
    assert restored.meta["global_step"] == 2 and restored.optimizer
    assert _sha256(tmp_path / "pod-2" / ckpt.WEIGHTS) == _sha256(tmp_path / "pod-1" / ckpt.WEIGHTS)
    assert not list((tmp_path / "pod-2").glob(".restore-*"))


def test_a_durable_checkpoint_further_on_than_the_local_one_wins(tiny_data, tmp_path):
    import shutil

    uri = str(tmp_path / "durable")
    _cut(tiny_data, tmp_path / "pod-1", uri)
    shutil.copytree(tmp_path / "pod-1", tmp_path / "stale")  # a node's leftover at step 2
    _cut(tiny_data, tmp_path / "pod-1", uri)  # the run went on to step 4 elsewhere
    result = _cut(tiny_data, tmp_path / "stale", uri, steps=1)
    assert (result.resumed_from, result.resumed_from_step, result.steps) == (uri, 4, 5)


def test_a_damaged_or_foreign_durable_checkpoint_is_refused(tiny_data, tmp_path):
    uri = str(tmp_path / "durable")  # a folder works as a checkpoint URI too
    _cut(tiny_data, tmp_path / "pod-1", uri)
    with pytest.raises(UserError, match="another run") as info:  # seed 0's, continued with seed 1
        run_phase(SPACE, smoke(), "teacher", tiny_data, tmp_path / "seed-1", progress=False, seed=1,
                  checkpoint_uri=uri)
    assert info.value.field == "seed" and info.value.source == uri
    pointer = durable.latest(uri, "teacher")
    weights = Path(uri) / pointer["slot"] / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(UserError) as info:
        run_phase(SPACE, smoke(), "teacher", tiny_data, tmp_path / "pod-2", progress=False,
                  checkpoint_uri=uri)
    assert info.value.field == "checkpoint_uri" and "damaged" in info.value.what
    assert not (tmp_path / "pod-2" / ckpt.SIDECAR).exists()  # nothing half restored
    with pytest.raises(UserError, match="phase 'teacher', not 'kernel'") as info:
        run_phase(SPACE, smoke(), "kernel", tiny_data, tmp_path / "kernel", init=tmp_path / "pod-1",
                  teacher=tmp_path / "pod-1", progress=False, checkpoint_uri=uri)
    assert info.value.field == "checkpoint_uri"


# Refused on any S3 server: a bucket that is not there, with a secret the server does not know. A
# server that ignores credentials (moto) refuses the bucket; one that creates a bucket on its first
# PUT (SeaweedFS) refuses the secret.
REFUSED = "s3://no-such-bucket-for-ofa/teacher.checkpoints"
WRONG_SECRET = {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}


def test_unwritable_checkpoint_uri_fails_before_training(s3_server, tiny_data, tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    for uri, env in ((REFUSED, WRONG_SECRET), (str(tmp_path / "a-file" / "ckpt"), {})):
        with pytest.MonkeyPatch.context() as mp, pytest.raises(UserError) as info:
            for k, v in env.items():
                mp.setenv(k, v)
            store.client.cache_clear()
            run_phase(SPACE, smoke(), "teacher", tiny_data, tmp_path / "out", progress=False,
                      checkpoint_uri=uri)
        store.client.cache_clear()  # the fixture's credentials again
        assert info.value.field == "checkpoint_uri" and info.value.source == uri
        assert "not writable" in info.value.what and info.value.fix
        assert not (tmp_path / "out").exists()  # no step trained, nothing written
    # through the CLI: one line naming the field and the fix, exit 2
    proc = subprocess.run([sys.executable, "-m", "onceforall", "phase", "teacher", "--schedule", "smoke",
                           "--data", "synthetic:600", "--val-size", "120", "--out", str(tmp_path / "out"),
                           "--checkpoint-uri", REFUSED], env={**os.environ, **WRONG_SECRET},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"ofa: error: {REFUSED}: checkpoint_uri: not writable")
    assert "(fix: " in proc.stderr and not (tmp_path / "out").exists()
    # durable storage that works is left as it was found: the probe is gone
    uri = f"{s3_server.bucket()}/probe-only"
    durable.check_writable(uri)
    assert not store.exists(uri + "/")


def test_components_keep_checkpoints_next_to_their_output():
    from onceforall.stages import checkpoint_uri_for

    assert checkpoint_uri_for("s3://b/root/run/train-teacher/salt/teacher") == \
        "s3://b/root/run/train-teacher/salt/teacher.checkpoints"
    # KFP's default pipeline root (MinIO, SeaweedFS) is S3 at the same bucket and key
    assert checkpoint_uri_for("minio://mlpipeline/v2/artifacts/x/teacher") == \
        "s3://mlpipeline/v2/artifacts/x/teacher.checkpoints"
    assert checkpoint_uri_for("/tmp/root/teacher/") == "/tmp/root/teacher.checkpoints"  # kfp.local
    assert checkpoint_uri_for("gs://b/x/teacher") is None  # not spoken by onceforall.infra.store


def test_scratch_baseline_resumes_from_its_durable_checkpoint(s3_server, tiny_data, tmp_path):
    import dataclasses

    from onceforall.training.train import RESUME_DIR, reference_configs, train_static

    schedule = dataclasses.replace(smoke(), checkpoint_every_s=0.0)
    cfg, uri = reference_configs(SPACE)["mid"], f"{s3_server.bucket()}/scratch.checkpoints"
    first = train_static(SPACE, schedule, cfg, tiny_data, tmp_path / "pod-1", progress=False,
                         checkpoint_uri=uri)
    assert first["resumed_from_step"] == 0 and not (tmp_path / "pod-1" / RESUME_DIR).exists()
    # the last mid-run checkpoint (one step before the end) stays in S3: a pod that starts over with
    # an empty folder trains that one step only, and ends with the same weights
    assert durable.latest(uri, "scratch")["global_step"] == first["steps"] - 1
    again = train_static(SPACE, schedule, cfg, tiny_data, tmp_path / "pod-2", progress=False,
                         checkpoint_uri=uri)
    assert again["resumed_from_step"] == first["steps"] - 1
    timing = ("train_wall_s", "images_per_s", "resumed_from_step")
    assert {k: v for k, v in again.items() if k not in timing} == \
        {k: v for k, v in first.items() if k not in timing}
    weights = [tmp_path / pod / "model.safetensors" for pod in ("pod-1", "pod-2")]
    assert _sha256(weights[0]) == _sha256(weights[1])


def test_a_checkpoint_of_the_same_schedule_name_under_another_recipe_is_refused(tiny_data, tmp_path):
    """A preset's recipe may change under its name (issue #21 changed `standard`'s lr): a checkpoint
    continues, or stands as a finished phase, only under the recipe that decided its weights."""
    import dataclasses

    old = smoke()
    run_phase(SPACE, old, "teacher", tiny_data, tmp_path / "teacher", progress=False, stop_after_steps=2)
    # what does not decide the teacher's weights may change: a later phase's recipe, the notes
    later = dataclasses.replace(old, notes="changed", phases=(
        dataclasses.replace(old.phases[0], lr_floor=0.05), *old.phases[1:]))
    run_phase(SPACE, later, "teacher", tiny_data, tmp_path / "teacher", progress=False, stop_after_steps=3)
    for changed, what in [
            (dataclasses.replace(old, teacher=dataclasses.replace(old.teacher, lr=0.02)),
             "phase 'teacher': lr 0.05, today 0.02"),
            (dataclasses.replace(old, label_smoothing=0.0), "label_smoothing 0.1, today 0.0"),
            # one cosine over the whole training: every phase's epochs set the teacher's lr
            (old.continuous_lr(), "phase 'teacher': lr_span 'phase', today 'training'")]:
        with pytest.raises(UserError, match="trained with another recipe") as err:
            run_phase(SPACE, changed, "teacher", tiny_data, tmp_path / "teacher", progress=False)
        assert err.value.field == "schedule" and what in err.value.what
    cont = tmp_path / "continuous"
    run_phase(SPACE, old.continuous_lr(), "teacher", tiny_data, cont, progress=False, stop_after_steps=2)
    cosine = old.continuous_lr()
    longer = dataclasses.replace(cosine, phases=tuple(dataclasses.replace(p, epochs=2)
                                                      for p in cosine.phases))
    with pytest.raises(UserError, match=r"epochs of every phase \[1, 1, 1, 1, 1, 1\], today \[1, 2, 2"):
        run_phase(SPACE, longer, "teacher", tiny_data, cont, progress=False)
