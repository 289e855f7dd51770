"""The `paper` schedule against the reference's train_ofa_net.py, and the GPU-hours it expects
(issue #24, item 5)."""

import dataclasses

import pytest

from onceforall.training import train
from onceforall.training.gpu_hours import expected_gpu_hours, v100_macs_per_s
from onceforall.training.recipe import lr_at
from onceforall.training.schedule import get_schedule, paper, smoke
from onceforall.supernet.space import get_space

IMAGENET = get_space("imagenet-mbv3")
GPUS = 32  # the paper's: batch 2048 = 64 per GPU x 32; the reference's lr = base_lr x GPUs
# train_ofa_net.py per task and phase: (n_epochs, base_lr, warmup_epochs, dynamic_batch_size)
REFERENCE = {"kernel": (120, 3e-2, 5, 1), "depth-1": (25, 2.5e-3, 0, 2), "depth-2": (120, 7.5e-3, 5, 2),
             "width-1": (25, 2.5e-3, 0, 4), "width-2": (120, 7.5e-3, 5, 4)}


def test_paper_is_the_reference_recipe():
    s = paper()
    assert s.batch_size == 64 * GPUS and s.val_images == 10_000
    assert (s.momentum, s.weight_decay, s.label_smoothing) == (0.9, 3e-5, 0.1)
    assert IMAGENET.resolutions == tuple(range(128, 225, 4))  # continuous_size: 128-224 in steps of 4
    for p in s.phases:
        epochs, base_lr, warmup, subnets = REFERENCE[p.name]
        assert (p.epochs, p.warmup_epochs, p.subnets_per_step) == (epochs + warmup, warmup, subnets)
        assert p.lr == pytest.approx(base_lr * GPUS)
        assert (p.kd_ratio, p.kd_resolution, p.sandwich, p.resolution_probs) == (1.0, "batch", False, None)
        spe = 10
        # the cosine spans n_epochs after the warm-up, as the reference's adjust_learning_rate does
        assert lr_at(warmup * spe, p, spe) == pytest.approx(p.lr)
        assert lr_at(warmup * spe + epochs * spe // 2, p, spe) == pytest.approx(p.lr / 2)
    assert (s.teacher.epochs, s.teacher.lr) == (180, 2.6)


def test_other_presets_keep_the_teacher_at_the_largest_resolution():
    for name in ("smoke", "quick", "standard"):
        assert {p.kd_resolution for p in get_schedule(name).all_phases()} == {"max"}


def test_expected_gpu_hours_are_written_beside_the_preset():
    hours = expected_gpu_hours(IMAGENET, paper())
    assert hours["total"] == pytest.approx(1610, rel=0.03)
    assert hours["teacher"] == pytest.approx(310, rel=0.03)
    shrinking = hours["total"] - hours["teacher"]
    assert shrinking == pytest.approx(1200, rel=0.10)  # the paper's figure for OFA's training
    assert "1,610 V100-hours" in paper().notes and "1,610 V100-hours" in paper.__doc__
    # the calibration: MobileNetV3-Large's 180 epochs in 180 V100-hours (Table 1)
    assert 3 * 219e6 * 1_281_167 / v100_macs_per_s() / 3600 == pytest.approx(1.0)
    # distilling at the max resolution costs more than at the batch's
    at_max = dataclasses.replace(paper(), phases=tuple(dataclasses.replace(p, kd_resolution="max")
                                                       for p in paper().phases))
    assert expected_gpu_hours(IMAGENET, at_max)["kernel"] > hours["kernel"] * 1.05


def test_kd_resolution_batch_shows_the_teacher_the_batch_resolution(tiny_data, tmp_path, monkeypatch):
    space = get_space("fashion-mnist")
    s = dataclasses.replace(smoke(), train_images=128)
    train.run_phase(space, s, "teacher", tiny_data, tmp_path / "teacher", progress=False)
    seen = {}

    def recording_teacher(folder, space_, dev):
        net = load(folder, space_, dev)
        net.register_forward_pre_hook(lambda _m, args: seen[mode].append(args[0].shape[-1]))
        return net

    load = train.load_teacher
    monkeypatch.setattr(train, "load_teacher", recording_teacher)
    for mode in ("max", "batch"):
        seen[mode] = []
        phase = dataclasses.replace(s.phase("kernel"), kd_resolution=mode, n_resolutions=None)
        sched = dataclasses.replace(s, phases=(phase,) + s.phases[1:])
        train.run_phase(space, sched, "kernel", tiny_data, tmp_path / mode, init=tmp_path / "teacher",
                        teacher=tmp_path / "teacher", progress=False)
    assert set(seen["max"]) == {28} and len(seen["max"]) == 2
    assert len(set(seen["batch"])) > 1 and set(seen["batch"]) <= set(space.resolutions)
