import dataclasses
import json
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from onceforall.supernet import checkpoint as ckpt
from onceforall.errors import UserError
from onceforall.training.schedule import SCHEDULES, get_schedule, smoke
from onceforall.supernet.space import get_space
from onceforall.training.train import lr_at, run_phase, step_configs, train_supernet

SPACE = get_space("fashion-mnist")


def _two_epoch_teacher():
    s = smoke()
    return dataclasses.replace(s, teacher=dataclasses.replace(s.teacher, epochs=2),
                               train_images=320, checkpoint_every_s=0.0)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_are_the_papers_phase_order(name):
    s = get_schedule(name)
    assert [p.name for p in s.all_phases()] == ["teacher", "kernel", "depth-1", "depth-2",
                                               "width-1", "width-2"]
    assert [p.subnets_per_step for p in s.phases] == [1, 2, 2, 4, 4]
    spaces = [p.space(SPACE) for p in s.phases]
    assert spaces[0].kernels == (3, 5, 7) and spaces[0].depths == (4,) and spaces[0].expands == (6,)
    assert spaces[2].depths == (2, 3, 4) and spaces[3].expands == (4, 6)
    assert spaces[4] == SPACE
    assert s.teacher.kd_ratio == 0 and all(p.kd_ratio > 0 for p in s.phases)


def test_teacher_is_the_full_network_at_the_largest_resolution_except_in_paper():
    assert get_schedule("standard").teacher.space(SPACE).resolutions == (28,)
    assert get_schedule("paper").teacher.space(SPACE).resolutions == SPACE.resolutions


def test_sandwich_trains_the_phases_largest_and_smallest_subnets_each_step():
    import numpy as np

    width1, width2 = get_schedule("standard").phases[3:]
    assert width1.sandwich and width2.sandwich
    sub = width1.space(SPACE)
    for step in range(3):
        cfgs = step_configs(width1, sub, np.random.default_rng(step), 24)
        assert cfgs[0] == sub.max_config() and cfgs[1] == sub.min_config()
        assert len(cfgs) == width1.subnets_per_step and min(sub.expands) == 4
        # the ends at their own resolutions (28 and 20 px), the random ones at the batch's
        assert [c.r for c in cfgs] == [28, 20] + [24] * (len(cfgs) - 2)
    # without it, the same generator gives random ones, and the stream advances the same either way
    plain = dataclasses.replace(width1, sandwich=False)
    a, b = np.random.default_rng(0), np.random.default_rng(0)
    assert {c.r for c in step_configs(plain, sub, a, 20)} == {20}
    step_configs(width1, sub, b, 20)
    assert a.integers(1 << 30) == b.integers(1 << 30)
    # the baseline keeps the sampling of each phase
    assert [p.sandwich for p in get_schedule("standard").without_progressive_shrinking().phases] == \
        [False, False, False, True, True]
    with pytest.raises(UserError, match="subnets_per_step"):
        dataclasses.replace(width1, subnets_per_step=2)


def test_lr_warmup_then_cosine():
    phase = dataclasses.replace(smoke().teacher, epochs=10, warmup_epochs=1, lr=1.0)
    lrs = [lr_at(i, phase, 10) for i in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_whole_smoke_schedule_trains_every_phase(tiny_data, tmp_path):
    results = train_supernet(SPACE, smoke(), tiny_data, tmp_path, progress=False)
    assert [r.phase for r in results] == ["teacher", "kernel", "depth-1", "depth-2", "width-1",
                                          "width-2"]
    for r in results:
        meta = ckpt.read_meta(tmp_path / r.phase)
        assert meta["completed"] and set(r.val_accuracy) == {"max", "mid", "min"}
        assert not (tmp_path / r.phase / ckpt.OPTIMIZER).exists()
        log = [json.loads(line) for line in (tmp_path / r.phase / "log.jsonl").read_text().splitlines()]
        assert log[-1]["val_accuracy"]["max"] >= 0 and log[-1]["images_per_s"] > 0
    # A finished phase is not trained again.
    again = train_supernet(SPACE, smoke(), tiny_data, tmp_path, progress=False, phases=["kernel"])
    assert again[0].wall_s == results[1].wall_s


def test_resume_after_stop_continues_the_same_stream(tiny_data, tmp_path):
    schedule = _two_epoch_teacher()
    full = run_phase(SPACE, schedule, "teacher", tiny_data, tmp_path / "full", progress=False)
    part = run_phase(SPACE, schedule, "teacher", tiny_data, tmp_path / "cut", progress=False,
                     stop_after_steps=3)
    assert part.steps == 3 and not ckpt.read_meta(tmp_path / "cut")["completed"]
    resumed = run_phase(SPACE, schedule, "teacher", tiny_data, tmp_path / "cut", progress=False)
    assert resumed.resumed_from_step == 3 and resumed.steps == full.steps
    a = load_file(str(tmp_path / "full" / ckpt.WEIGHTS))
    b = load_file(str(tmp_path / "cut" / ckpt.WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _train_forever(out, data, threads):
    torch.set_num_threads(threads)  # same float reduction order as the uninterrupted run
    run_phase(SPACE, _two_epoch_teacher(), "teacher", data, out, progress=False)


def test_killed_phase_resumes_from_its_last_checkpoint(tiny_data, tmp_path):
    schedule = _two_epoch_teacher()
    full = run_phase(SPACE, schedule, "teacher", tiny_data, tmp_path / "full", progress=False)
    proc = mp.get_context("spawn").Process(target=_train_forever,
                                      args=(tmp_path / "killed", tiny_data, torch.get_num_threads()))
    proc.start()
    deadline = time.time() + 120
    while time.time() < deadline:
        side = tmp_path / "killed" / ckpt.SIDECAR
        if side.exists() and json.loads(side.read_text()).get("global_step", 0) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    meta = ckpt.read_meta(tmp_path / "killed")
    assert not meta["completed"]
    resumed = run_phase(SPACE, schedule, "teacher", tiny_data, tmp_path / "killed", progress=False)
    assert resumed.resumed_from_step == meta["global_step"] > 0
    a = load_file(str(tmp_path / "full" / ckpt.WEIGHTS))
    b = load_file(str(tmp_path / "killed" / ckpt.WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.steps == resumed.steps


def test_shrink_phase_needs_init_and_teacher(tiny_data, tmp_path):
    with pytest.raises(UserError, match="previous phase"):
        run_phase(SPACE, smoke(), "kernel", tiny_data, tmp_path / "k", progress=False)


def test_checkpoint_of_another_space_is_rejected(tiny_data, tmp_path):
    run_phase(SPACE, smoke(), "teacher", tiny_data, tmp_path / "t", progress=False)
    other = dataclasses.replace(SPACE, feature_width=256)
    with pytest.raises(UserError) as info:
        ckpt.load_checkpoint(tmp_path / "t", space=other)
    assert info.value.field == "space" and "feature_width" in info.value.what


def test_corrupted_weights_are_detected(tiny_data, tmp_path):
    run_phase(SPACE, smoke(), "teacher", tiny_data, tmp_path / "t", progress=False)
    path = tmp_path / "t" / ckpt.WEIGHTS
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError) as info:
        ckpt.load_checkpoint(tmp_path / "t")
    assert info.value.field == "sha256"


def test_checkpoint_never_unpickles(tmp_path):
    ckpt.save_checkpoint(tmp_path, {"w": torch.ones(2)}, {"phase": "x", "space": SPACE.to_dict()})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint.json", "weights.safetensors"]
    assert json.loads((tmp_path / "checkpoint.json").read_text())["files"]["weights.safetensors"]
