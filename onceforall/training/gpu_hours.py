"""The GPU-hours a schedule expects on ImageNet, derived from its steps' MACs (issue #24, item 5).

The model, stated so that it can be checked:

* one training image through one subnet costs 3x its forward MACs (forward, and a backward of twice
  the forward); the frozen teacher's distillation forward costs 1x, once per step, at the resolution
  the phase gives it (``kd_resolution``);
* a phase's expected MACs per image come from its own step sampler (recipe.step_resolution and
  step_configs over ``samples`` seeded steps, as training draws them), times its epochs and the
  training images;
* the rate of a GPU is calibrated on the paper's own figure for a MobileNet-sized network: Table 1
  gives MobileNetV3-Large (219M MACs at 224 px) 180 V100-hours of training, i.e. 180 ImageNet epochs
  at about one V100-hour each (docs/results/paper_table1.json). Small mobile networks are bound by
  memory traffic, not arithmetic, so the rate is an effective one (~0.23 TMAC/s), not the V100's peak.

This is an estimate of the compute, not of overheads (data loading, evaluation, BN calibration,
communication); the paper's 1,200 GPU-hours for OFA's training are the yardstick (tests/test_stream.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..supernet.efficiency import CostTable
from .schedule import PhaseConfig, Schedule
from ..supernet.space import SearchSpace

IMAGENET_TRAIN = 1_281_167
MBV3_LARGE_MACS, MBV3_LARGE_EPOCHS, MBV3_LARGE_GPU_HOURS = 219e6, 180, 180.0  # the paper's Table 1
BACKWARD = 2.0  # a backward pass costs about twice the forward


def v100_macs_per_s() -> float:
    """The effective V100 rate implied by Table 1's MobileNetV3-Large row."""
    work = (1 + BACKWARD) * MBV3_LARGE_MACS * IMAGENET_TRAIN * MBV3_LARGE_EPOCHS
    return work / (MBV3_LARGE_GPU_HOURS * 3600)


def macs_per_image(space: SearchSpace, schedule: Schedule, phase: PhaseConfig, *, samples: int = 256,
                   seed: int = 0, costs: CostTable | None = None) -> float:
    """A training image's expected MACs in ``phase``: its subnets' forward and backward, and the
    teacher's forward when the phase distils."""
    from .recipe import step_configs, step_resolution

    costs = costs or CostTable.build(space)
    index = [p.name for p in schedule.all_phases()].index(phase.name)
    phase_space = phase.space(space)
    total = 0.0
    for step in range(samples):
        rng = np.random.default_rng([seed, index, step])
        resolution = step_resolution(phase, phase_space, rng)
        cfgs = step_configs(phase, phase_space, rng, resolution, costs if phase.sampler == "cost" else None)
        total += (1 + BACKWARD) * float(costs.macs(cfgs).sum())
        if phase.kd_ratio > 0:
            r = max(space.resolutions) if phase.kd_resolution == "max" else resolution
            total += float(costs.macs([dataclasses.replace(space.max_config(), r=r)])[0])
    return total / samples


def expected_gpu_hours(space: SearchSpace, schedule: Schedule, *, train_images: int | None = None,
                       samples: int = 256) -> dict[str, float]:
    """V100-hours of every phase of ``schedule`` on ``train_images`` images (ImageNet's, less the
    schedule's held-out validation images), and their ``total``."""
    n = train_images if train_images is not None else IMAGENET_TRAIN - (schedule.val_images or 0)
    costs, rate = CostTable.build(space), v100_macs_per_s()
    out = {p.name: round(macs_per_image(space, schedule, p, samples=samples, costs=costs)
                         * n * p.epochs / rate / 3600, 1)
           for p in schedule.all_phases()}
    out["total"] = round(sum(out.values()), 1)
    return out
