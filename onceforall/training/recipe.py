"""The shrinking recipe's moving parts, each read from a phase's fields (schedule.PhaseConfig).

Learning rate (per phase or across the training, with a floor), the subnets a step trains (sampler,
resolution bias, sandwich ends, kernel coupling), the loss split (cross-entropy, distillation from
the frozen teacher and in-place from the max subnet), the kernel mode's frozen transforms and the
weight EMA. Every field's default is the recipe before these knobs existed, computed the same way,
so that the committed golden numbers and checkpoints stay as they were.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..supernet.efficiency import CostTable
from ..errors import UserError
from .schedule import PhaseConfig, Schedule
from ..supernet.space import SearchSpace, SubnetConfig

# -- learning rate ------------------------------------------------------------------------------


def schedule_span(schedule: Schedule, phase: PhaseConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(steps of the phases before ``phase``, steps of the whole schedule): where a "training" span's
    cosine is when the phase starts, and how long it is."""
    names = [p.name for p in schedule.all_phases()]
    before = schedule.all_phases()[:names.index(phase.name)]
    return (sum(p.steps(steps_per_epoch) for p in before),
            sum(p.steps(steps_per_epoch) for p in schedule.all_phases()))


def lr_at(step: int, phase: PhaseConfig, steps_per_epoch: int, *, teacher_lr: float | None = None,
          span: tuple[int, int] | None = None) -> float:
    """Linear warm-up from 0 over ``warmup_epochs``, then cosine decay to the floor (per step).

    The cosine spans the phase, or with ``lr_span`` "training" the whole schedule (``span``, from
    schedule_span); ``teacher_lr`` is needed when the phase's lr is a fraction of it."""
    if phase.lr_of_teacher and teacher_lr is None:
        raise ValueError(f"phase {phase.name!r}: its lr is a fraction of the teacher's; pass teacher_lr")
    peak = phase.peak_lr(teacher_lr) if phase.lr_of_teacher else phase.lr
    warm = phase.warmup_epochs * steps_per_epoch

    def progress(s: int) -> float:
        if phase.lr_span == "training":
            if span is None:
                raise ValueError(f"phase {phase.name!r} decays across the training; pass span")
            return (span[0] + s) / max(span[1], 1)
        return (s - warm) / max(phase.steps(steps_per_epoch) - warm, 1)

    def decayed(p: float) -> float:
        cosine = 0.5 * peak * (1 + math.cos(math.pi * min(p, 1.0)))
        return cosine if phase.lr_floor == 0 else phase.lr_floor * peak + (1 - phase.lr_floor) * cosine

    if step < warm:
        return decayed(progress(warm)) * (step + 1) / warm
    return decayed(progress(step))


# -- the subnets one step trains -------------------------------------------------------------------


def step_resolution(phase: PhaseConfig, phase_space: SearchSpace, rng: np.random.Generator) -> int:
    """The batch's resolution: uniform, or biased by ``resolution_probs`` (smallest first)."""
    if phase.resolution_probs is None:
        return int(rng.choice(phase_space.resolutions))
    res = sorted(phase_space.resolutions)
    if len(phase.resolution_probs) != len(res):
        raise UserError(f"phase {phase.name!r}: {len(phase.resolution_probs)} resolution_probs for "
                        f"{len(res)} resolutions {res}", field="resolution_probs",
                        fix=f"give one probability per resolution in {res}")
    return int(rng.choice(res, p=np.asarray(phase.resolution_probs) / sum(phase.resolution_probs)))


def has_max_end(phase: PhaseConfig) -> bool:
    """Whether a step's first subnet is the phase's max (the sandwich's max end)."""
    return phase.sandwich and phase.sandwich_ends in ("both", "max")


def sandwich_ends(phase: PhaseConfig, phase_space: SearchSpace, resolution: int) -> list[SubnetConfig]:
    """The sandwich's ends in training order (max first), at their own resolutions or the batch's."""
    ends = {"both": [phase_space.max_config(), phase_space.min_config()],
            "max": [phase_space.max_config()], "min": [phase_space.min_config()]}[phase.sandwich_ends]
    if phase.sandwich_resolution == "batch":
        ends = [dataclasses.replace(c, r=resolution) for c in ends]
    return ends


def spread_sample(phase_space: SearchSpace, rng: np.random.Generator, resolution: int,
                  n: int) -> list[SubnetConfig]:
    """Subnets whose sizes span the whole range: each draws a size ``t`` uniform in [0, 1], then every
    depth, kernel and expand choice independently as Binomial(choices - 1, t) into its sorted options.
    (Per-block uniform choices average out to the middle: they almost never come near the max.)"""
    t = rng.uniform(size=(n, 1))  # (n, 1)

    def pick(options, width: int) -> np.ndarray:  # (n, width)
        opts = np.asarray(sorted(options))
        return opts[rng.binomial(len(opts) - 1, np.broadcast_to(t, (n, width)))]

    d = pick(phase_space.depths, len(phase_space.units))
    k, e = pick(phase_space.kernels, phase_space.num_slots), pick(phase_space.expands, phase_space.num_slots)
    return [SubnetConfig(resolution, tuple(map(int, d[i])), tuple(map(int, k[i])),
                         tuple(map(int, e[i]))).canonical(phase_space) for i in range(n)]


def cost_stratified(phase_space: SearchSpace, rng: np.random.Generator, resolution: int, n: int,
                    candidates: int, costs: CostTable) -> list[SubnetConfig]:
    """AttentiveNAS's sampling: for each subnet a MACs level uniform between the phase's min and max
    subnet at this resolution, then the closest to it of ``candidates`` subnets (spread_sample)."""
    at_r = lambda c: dataclasses.replace(c, r=resolution)  # noqa: E731
    lo, hi = costs.macs([at_r(phase_space.min_config()), at_r(phase_space.max_config())])
    levels = rng.uniform(float(lo), float(hi), size=n)  # (n,)
    pool = spread_sample(phase_space, rng, resolution, n * candidates)
    macs = costs.macs(pool).reshape(n, candidates)
    picked = np.abs(macs - levels[:, None]).argmin(axis=1)  # (n,)
    return [pool[i * candidates + int(j)] for i, j in enumerate(picked)]


def couple_kernels(cfg: SubnetConfig, phase_space: SearchSpace) -> SubnetConfig:
    """Each block's kernel from its expand ratio's rank: the smallest expand gets the smallest kernel,
    the largest the largest (ranks scaled when the two have different numbers of choices)."""
    ks, es = sorted(phase_space.kernels), sorted(phase_space.expands)
    frac = lambda e: es.index(e) / (len(es) - 1) if len(es) > 1 else 1.0  # noqa: E731
    k = tuple(ks[round(frac(e) * (len(ks) - 1))] for e in cfg.e)
    return dataclasses.replace(cfg, k=k).canonical(phase_space)


def step_configs(phase: PhaseConfig, phase_space: SearchSpace, rng: np.random.Generator,
                 resolution: int, costs: CostTable | None = None) -> list[SubnetConfig]:
    """The subnets one step trains, each with the resolution it sees: random ones at the batch's
    ``resolution`` (uniform per block, or cost-stratified with ``costs``), or with the sandwich rule
    the phase's largest and/or smallest subnet first, by default at their own resolutions as BigNAS
    and AttentiveNAS train them (drawn from ``rng`` either way, so that the stream does not depend on
    it)."""
    n = phase.subnets_per_step
    if phase.sampler == "cost":
        if costs is None:
            raise ValueError("the cost sampler needs the space's CostTable")
        cfgs = cost_stratified(phase_space, rng, resolution, n, phase.cost_candidates, costs)
    else:
        cfgs = [dataclasses.replace(c, r=resolution) for c in phase_space.sample_many(rng, n)]
    if phase.kernel_mode == "coupled":
        cfgs = [couple_kernels(c, phase_space) for c in cfgs]
    if phase.sandwich:
        ends = sandwich_ends(phase, phase_space, resolution)
        cfgs[:len(ends)] = ends
    return cfgs


# -- the loss --------------------------------------------------------------------------------------


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target_probs * F.log_softmax(logits, dim=1), dim=1).mean()


def train_step_losses(net: torch.nn.Module, phase: PhaseConfig, cfgs: list[SubnetConfig],
                      inputs: dict[int, torch.Tensor], y: torch.Tensor, criterion: torch.nn.Module,
                      teacher_soft: torch.Tensor | None) -> float:
    """Forward and backward every subnet of the step (gradients accumulate); returns their summed loss.

    Each subnet's loss: label-smoothed cross-entropy (only the max subnet's with ``ce_max_only``),
    plus ``kd_ratio`` times distillation from the frozen teacher's ``teacher_soft``, plus for the
    others ``kd_inplace`` times distillation from the max subnet's detached outputs (trained first)."""
    max_soft, total = None, 0.0
    for i, cfg in enumerate(cfgs):
        logits = net(inputs[cfg.r], cfg)
        is_max = i == 0 and has_max_end(phase)
        loss = criterion(logits, y) if is_max or not phase.ce_max_only else logits.new_zeros(())
        if teacher_soft is not None:
            loss = loss + phase.kd_ratio * soft_cross_entropy(logits, teacher_soft)
        if max_soft is not None:
            loss = loss + phase.kd_inplace * soft_cross_entropy(logits, max_soft)
        loss.backward()
        if is_max and phase.kd_inplace > 0:
            max_soft = F.softmax(logits.detach(), dim=1)
        total += float(loss.detach())
    return total


# -- kernel mode -------------------------------------------------------------------------------


def transform_parameters(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in net.named_parameters() if ".transforms." in name]


def freeze_transforms(net: torch.nn.Module, phase: PhaseConfig) -> None:
    """The fixed kernel mode: a smaller kernel is the plain centre of the larger, so the transform
    matrices stay at identity (then ``x @ I`` is the crop, exactly) and out of the optimizer."""
    if phase.kernel_mode != "fixed":
        return
    for p in transform_parameters(net):
        if not torch.equal(p.detach(), torch.eye(p.shape[0], dtype=p.dtype, device=p.device)):
            raise UserError(f"phase {phase.name!r}: kernel_mode 'fixed' crops kernels, but an earlier "
                            "phase trained the transform matrices", field="kernel_mode",
                            fix="use 'fixed' in every phase that opens the kernel, or 'transform'")
        p.requires_grad_(False)


# -- weight EMA -------------------------------------------------------------------------------------


class WeightEMA:
    """An exponential moving average of a network's parameters (buffers copied): the weights that a
    phase with ``ema_decay`` evaluates and saves. Its BN statistics are whatever the live network's
    were; every evaluation recalibrates them (evaluate.evaluate_subnets)."""

    PREFIX = "ema."

    def __init__(self, net: torch.nn.Module, decay: float):
        self.decay = decay
        self.net = copy.deepcopy(net).requires_grad_(False)

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        for mine, theirs in zip(self.net.parameters(), net.parameters()):
            mine.lerp_(theirs, 1 - self.decay)
        for mine, theirs in zip(self.net.buffers(), net.buffers()):
            mine.copy_(theirs)

    def tensors(self) -> dict[str, torch.Tensor]:
        """For a mid-phase checkpoint (beside the momentum buffers)."""
        return {self.PREFIX + k: v for k, v in self.net.state_dict().items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {k[len(self.PREFIX):]: v for k, v in tensors.items() if k.startswith(self.PREFIX)}
        if own:
            self.net.load_state_dict(own)
