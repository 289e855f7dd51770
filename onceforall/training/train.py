"""Training stages: the teacher (full network), then each progressive-shrinking phase.

``run_phase`` is one stage: it starts from the previous phase's checkpoint (or from scratch for the
teacher), samples ``subnets_per_step`` subnets of the phase's space at every step, accumulates their
gradients (label-smoothed cross-entropy plus distillation from the teacher, split as the phase's
recipe fields say: recipe.py), then takes one SGD step.
Everything random at a step (batch order, augmentation, resolution, subnets) is drawn from
generators seeded by ``(seed, phase, epoch, step)``, so a resumed phase and every DDP rank see the
same stream. Checkpoints are written every ``checkpoint_every_s`` and at each epoch's end; with a
``checkpoint_uri`` each is also copied there (durable.py), so that a pod that starts over on another
node continues from the last one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..supernet import checkpoint as ckpt
from . import durable
from ..data import (Dataset, calibration_images, epoch_order, is_streamed, resize, subsample,
                    train_batch)
from .dist import (DistInfo, allreduce_gradients, barrier, broadcast_parameters, broadcast_rng,
                   rank_checksums, rank_device)
from ..supernet.efficiency import CostTable
from ..errors import UserError
from ..supernet.evaluate import accuracy, evaluate_subnets
from ..progress import Progress, append_jsonl
from .recipe import (WeightEMA, freeze_transforms, lr_at, schedule_span, soft_cross_entropy,
                     step_configs, step_resolution, train_step_losses)
from .schedule import PhaseConfig, Schedule
from ..supernet.space import SearchSpace, SubnetConfig
from ..data.stream import StepShares, train_shares
from ..supernet.supernet import OFASupernet

LOG = "log.jsonl"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def reference_configs(space: SearchSpace) -> dict[str, SubnetConfig]:
    """The subnets tracked during training: max, min, and three middle ones."""
    srt = lambda xs: sorted(xs)  # noqa: E731
    mid = lambda xs: srt(xs)[len(xs) // 2]  # noqa: E731
    d, k, e, r = space.depths, space.kernels, space.expands, space.resolutions
    return {
        "max": space.max_config(),
        "min": space.min_config(),
        "mid": space.uniform_config(mid(d), mid(k), mid(e), mid(r)),
        "shallow-wide": space.uniform_config(min(d), max(k), max(e), mid(r)),
        "deep-narrow": space.uniform_config(max(d), min(k), min(e), mid(r)),
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on batch-norm parameters and biases (the paper's recipe); frozen parameters
    (the fixed kernel mode's transforms) are not optimized at all."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)  # BN weights and biases are the 1-D ones
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_teacher(folder: str | Path, space: SearchSpace, dev: torch.device) -> OFASupernet:
    """The teacher for distillation: its full network, frozen, in eval mode."""
    net = OFASupernet(space)
    ckpt.load_weights(net, ckpt.load_checkpoint(folder, space=space))
    return net.to(dev, memory_format=torch.channels_last).eval().requires_grad_(False)


def sgd(model: torch.nn.Module, schedule: Schedule, phase: PhaseConfig,
        data: Dataset) -> tuple[torch.optim.SGD, int]:
    """The recipe's optimizer (Nesterov, no decay on BN and biases) and the steps per epoch."""
    steps_per_epoch = len(data.train) // schedule.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(data.train)} training images are fewer than one batch of "
                        f"{schedule.batch_size}", field="data", fix="use more data or a smaller batch")
    opt = torch.optim.SGD(param_groups(model, schedule.weight_decay), lr=phase.lr,
                          momentum=schedule.momentum, nesterov=True)
    return opt, steps_per_epoch


@dataclass
class PhaseResult:
    phase: str
    folder: Path
    epochs: float
    steps: int
    wall_s: float
    images_per_s: float
    val_accuracy: dict[str, float]
    resumed_from_step: int
    resumed_from: str = ""  # where the checkpoint it continued came from: its output folder or a URI

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["folder"] = str(self.folder)
        return out


def _optimizer_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[f"momentum.{name}"] = buf
    return out


def _load_optimizer_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer,
                            tensors: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        buf = tensors.get(f"momentum.{name}")
        if buf is not None:
            opt.state[p]["momentum_buffer"] = buf.to(p.device).clone()


def _progress_of(meta: dict[str, Any]) -> int:
    return sys.maxsize if meta.get("completed") else int(meta.get("global_step", -1))


def _durable_start(uri: str | None, phase: str, out_dir: Path,
                   info: DistInfo) -> tuple[dict[str, Any] | None, bool]:
    """Check that ``uri`` takes writes; when its checkpoint is further on than the one in ``out_dir``
    (none: a retried or rescheduled pod), the first rank of every node copies it there (never over
    another phase's): nodes do not share ``out_dir``. Returns the durable pointer (rank 0) and
    whether it was copied."""
    if uri is None:
        return None, False
    pointer, pulled = None, False
    if info.is_main:
        durable.check_writable(uri)
    if info.local_rank == 0:
        pointer = durable.latest(uri, phase)
        local = ckpt.read_meta(out_dir) if (out_dir / ckpt.SIDECAR).is_file() else {"phase": phase}
        newer = pointer is not None and _progress_of(pointer) > _progress_of(local)
        if newer and local.get("phase") == phase:
            durable.pull(uri, pointer, out_dir)
            pulled = True
    barrier(info)  # the other ranks read out_dir next
    return (pointer if info.is_main else None), pulled


def _check_same_run(meta: dict[str, Any], seed: int, schedule: Schedule, phase: str,
                    where: str | None) -> None:
    """A checkpoint continues only the run that wrote it: the same seed and schedule, and the same
    recipe up to this phase (a preset's recipe may change under its name: `standard` did)."""
    theirs = {"seed": meta.get("seed"), "schedule": meta.get("schedule", {}).get("name")}
    ours = {"seed": seed, "schedule": schedule.name}
    if theirs != ours:
        raise UserError(f"holds a checkpoint of another run ({theirs}, this one is {ours})", source=where,
                        field="seed" if theirs["seed"] != seed else "schedule",
                        fix="give this run its own --out (and --checkpoint-uri), or the same settings")
    if "teacher" not in meta["schedule"]:
        return  # written before checkpoints kept the schedule's phases
    mine = _weights_recipe(json.loads(json.dumps(schedule.to_dict())), phase)
    old = _weights_recipe(meta["schedule"], phase)
    if old != mine:
        what = _first_difference(old, mine)
        raise UserError(f"holds a checkpoint of schedule {schedule.name!r} trained with another recipe "
                        f"({what})", source=where, field="schedule",
                        fix="give this run its own --out (and --checkpoint-uri), or delete the folder "
                            "to train the phase again with today's recipe")


# A run's settings that decide its weights besides the phases: the optimizer and the data each step sees.
_RUN_FIELDS = ("batch_size", "momentum", "weight_decay", "label_smoothing", "train_images")


def _weights_recipe(raw: dict[str, Any], phase: str) -> dict[str, Any]:
    """What decides a phase's weights, from a schedule's dict: that phase and the ones before it (a
    field a checkpoint predates takes its default, which is what training did before the field
    existed), the run's settings, and where one of those phases decays across the whole training,
    every phase's epochs (the cosine's length)."""
    defaults = {f.name: f.default for f in dataclasses.fields(PhaseConfig)
                if f.default is not dataclasses.MISSING}
    phases = [{**defaults, **p} for p in (raw["teacher"], *raw["phases"])]
    names = [p["name"] for p in phases]
    upto = phases[:names.index(phase) + 1] if phase in names else phases
    run = {f.name: raw.get(f.name, f.default) for f in dataclasses.fields(Schedule) if f.name in _RUN_FIELDS}
    out = {"phases": upto, **run}
    if any(p["lr_span"] == "training" for p in upto):
        out["epochs of every phase"] = [p["epochs"] for p in phases]
    return out


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The first field of ``_weights_recipe`` that differs, phases first, in words."""
    for a, b in zip(old["phases"], new["phases"]):
        for field in a:
            if a[field] != b.get(field):
                return f"phase {a['name']!r}: {field} {a[field]!r}, today {b.get(field)!r}"
    key = next(k for k in ("phases", *sorted(set(old) | set(new))) if old.get(k) != new.get(k))
    return f"{key} {old.get(key)!r}, today {new.get(key)!r}"


def _files_digest(data: Dataset) -> str | None:
    """sha256 of a streamed dataset's training file list (its order is the batches'); None in memory."""
    if not is_streamed(data):
        return None
    return hashlib.sha256("\n".join(data.train.files).encode()).hexdigest()


def _check_same_files(meta: dict[str, Any], data: Dataset, where: str | None) -> None:
    """A streamed run resumes on the files it started with: other files give other batches."""
    theirs = meta.get("train_files_sha256")
    if theirs is not None and theirs != _files_digest(data):
        raise UserError("holds a checkpoint of a run on other training files (files added, removed or "
                        "renamed since: the batches after the resumed step would differ)", source=where,
                        field="data", fix="resume on the same files, or give this run its own --out "
                                          "(and --checkpoint-uri)")


def _start_weights(net: OFASupernet, space: SearchSpace, schedule: Schedule, phase: PhaseConfig,
                   out_dir: Path, init: str | Path | None, seed: int,
                   resumed_from: str) -> ckpt.Checkpoint | None:
    """Load the weights the phase starts from: its own checkpoint (returned, to resume) or the previous
    phase's (channels re-sorted if the phase says so); the teacher may start from scratch."""
    if (out_dir / ckpt.SIDECAR).is_file():
        meta = ckpt.read_meta(out_dir)
        if meta.get("phase") != phase.name:
            raise UserError(f"holds a checkpoint of phase {meta.get('phase')!r}, not {phase.name!r}",
                            source=str(out_dir), field="phase",
                            fix="give each phase its own output folder")
        resume = ckpt.load_checkpoint(out_dir, space=space, with_optimizer=True)
        _check_same_run(resume.meta, seed, schedule, phase.name, resumed_from)
        if not resume.meta.get("completed"):
            ckpt.load_weights(net, resume)
        return resume
    if init is not None:
        ckpt.load_weights(net, ckpt.load_checkpoint(init, space=space))
        if phase.sort_channels:
            prev = schedule.previous(phase.name)
            net.sort_channels_(prev.space(space).expands if prev else ())
    elif phase.name != schedule.teacher.name:
        raise UserError(f"phase {phase.name!r} needs the previous phase's checkpoint", field="init",
                        fix="pass --init with the previous phase's output folder")
    return None


def _carry_momentum(net: OFASupernet, opt: torch.optim.Optimizer, phase: PhaseConfig,
                    init: str | Path | None) -> None:
    """Momentum 'carry': start from the momentum buffers the previous phase's output kept."""
    if phase.momentum != "carry" or init is None:
        return
    previous = ckpt.load_checkpoint(init, with_optimizer=True)
    if previous.optimizer is None:
        raise UserError(f"phase {phase.name!r} carries momentum, but the previous phase's output keeps "
                        "none", source=str(init), field="momentum",
                        fix="retrain the previous phase with this schedule, or use momentum 'fresh'")
    _load_optimizer_tensors(net, opt, previous.optimizer)


def _keeps_momentum(schedule: Schedule, phase: PhaseConfig) -> bool:
    """Whether the phase after this one carries momentum, so this one's output must keep it."""
    names = [p.name for p in schedule.all_phases()]
    i = names.index(phase.name)
    return i + 1 < len(names) and schedule.all_phases()[i + 1].momentum == "carry"


def _torch_rng(dev: torch.device, state: tuple | None = None) -> tuple | None:
    """The torch generators' state (CPU, and the device's), or restore ``state``."""
    if state is None:
        return (torch.get_rng_state(), torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], dev)
    return None


def _subnets_step(net: OFASupernet, kd_net: OFASupernet | None, phase: PhaseConfig,
                  cfgs: list[SubnetConfig], x: torch.Tensor, y: torch.Tensor,
                  criterion: torch.nn.Module, teacher_res: int, space: SearchSpace) -> float:
    """Forward and backward the step's subnets on one batch (gradients accumulate); its loss."""
    # the batch at each resolution this step needs, resized once (the teacher's is often the
    # sandwich's largest subnet's too)
    needed = {c.r for c in cfgs} | ({teacher_res} if kd_net is not None else set())
    inputs = {r: resize(x, r) for r in needed}
    soft = None
    if kd_net is not None:
        with torch.no_grad():  # the teacher sees the images at the largest resolution
            soft = F.softmax(kd_net(inputs[teacher_res], space.max_config()), dim=1)
    return train_step_losses(net, phase, cfgs, inputs, y, criterion, soft)


def _streamed_shares(data: Dataset, schedule: Schedule, seed: int, steps_per_epoch: int, start: int,
                     stop: int, resolution_of, info: DistInfo, micro_batches: int = 1):
    """A streamed dataset's training shares from global step ``start`` (stream.py), or None for data
    held in memory (data.train_batch)."""
    if not is_streamed(data):
        return None
    sampler = StepShares(len(data.train), schedule.batch_size, seed, steps_per_epoch, start, stop,
                         resolution_of, rank=info.rank, world=info.world, micro_batches=micro_batches)
    return train_shares(data, sampler, seed=seed)


def _close(shares) -> None:
    if shares is not None:
        shares.close()  # stops the DataLoader's workers


def run_phase(space: SearchSpace, schedule: Schedule, phase_name: str, data: Dataset,
              out_dir: str | Path, *, init: str | Path | None = None,
              teacher: str | Path | None = None, seed: int = 0, device: str = "auto",
              progress: bool = True, stop_after_steps: int | None = None,
              checkpoint_uri: str | None = None, micro_batches: int = 1) -> PhaseResult:
    """Train one phase into ``out_dir``; resumes from ``out_dir`` if a previous run was cut short.

    ``init``: checkpoint folder of the previous phase (required except for the teacher).
    ``teacher``: checkpoint folder of the teacher, for distillation when the phase's kd_ratio > 0.
    ``stop_after_steps``: stop (with a checkpoint) after this many steps; used to test resuming.
    ``checkpoint_uri``: durable storage (``s3://bucket/prefix`` or a folder) that every checkpoint is
    copied to; when ``out_dir`` has none, the phase resumes from the newest one there. It must be
    writable, checked before anything else.
    ``micro_batches``: split this rank's share of every global batch into that many, their gradients
    averaged (accumulation): one process then takes the steps that ``micro_batches`` data-parallel
    ranks take, batch-norm statistics per share and dropout draws included (tests/test_ddp.py).
    Under torchrun (``WORLD_SIZE`` > 1) the ranks share every global batch; only rank 0 writes.
    With ``ema_decay`` the per-epoch validation and the saved output are the EMA's weights (mid-phase
    checkpoints keep the live weights, the EMA beside the momentum buffers).
    """
    run = _PhaseRun(space, schedule, phase_name, data, Path(out_dir), seed=seed, device=device,
                    checkpoint_uri=checkpoint_uri, micro_batches=micro_batches)
    done = run.start(init, teacher)
    if done is not None:
        return done
    return run.train(progress, stop_after_steps)


class _PhaseRun:
    """One phase's training (run_phase): its state, and the parts of its loop, each a method that
    reads top to bottom. The order of the statements is the order of the draws from the random
    generators, and so part of what a seed reproduces (tests/test_golden.py)."""

    def __init__(self, space: SearchSpace, schedule: Schedule, phase_name: str, data: Dataset,
                 out_dir: Path, *, seed: int, device: str, checkpoint_uri: str | None,
                 micro_batches: int):
        self.space, self.schedule, self.seed, self.out_dir = space, schedule, seed, out_dir
        self.phase = phase = schedule.phase(phase_name)
        self.phase_index = [p.name for p in schedule.all_phases()].index(phase.name)
        if micro_batches < 1 or schedule.batch_size % micro_batches:
            raise UserError(f"micro_batches {micro_batches} must divide the batch size {schedule.batch_size}",
                            field="micro_batches", fix="use a divisor of the schedule's batch size")
        self.micro_batches, self.checkpoint_uri = micro_batches, checkpoint_uri
        self.dev, self.info = rank_device(pick_device(device))
        self.pointer, pulled = _durable_start(checkpoint_uri, phase.name, out_dir, self.info)
        self.resumed_from = checkpoint_uri if pulled else str(out_dir)
        self.data = subsample(data, schedule.train_images, schedule.val_images)
        self.phase_space = phase.space(space)

    # -- state: resume, or start from the previous phase --------------------------------------------

    def start(self, init: str | Path | None, teacher: str | Path | None) -> PhaseResult | None:
        """The weights, teacher, optimizer and data stream; the result instead when the phase is done."""
        phase, space, schedule = self.phase, self.space, self.schedule
        torch.manual_seed(self.seed * 1000 + self.phase_index)  # weight init and dropout; in checkpoints
        self.net = net = OFASupernet(space)
        resume = _start_weights(net, space, schedule, phase, self.out_dir, init, self.seed,
                                self.resumed_from)
        if resume is not None:
            _check_same_files(resume.meta, self.data, self.resumed_from)
        if resume is not None and resume.meta.get("completed"):
            return PhaseResult(**resume.meta["result"] | {"folder": self.out_dir})
        freeze_transforms(net, phase)
        self.kd_net = self._teacher(teacher)
        self._optimizer(resume, init)
        self._sampling()
        return None

    def _teacher(self, teacher: str | Path | None) -> OFASupernet | None:
        if self.phase.kd_ratio <= 0:
            return None
        if teacher is None:
            raise UserError(f"phase {self.phase.name!r} distils from the teacher (kd_ratio "
                            f"{self.phase.kd_ratio})", field="teacher",
                            fix="pass --teacher with the teacher's output folder")
        return load_teacher(teacher, self.space, self.dev)

    def _optimizer(self, resume, init: str | Path | None) -> None:
        """SGD (its buffers from the checkpoint, or carried from ``init``), the EMA, the step counts,
        the lr schedule, and the random generators where the checkpoint left them."""
        phase, schedule = self.phase, self.schedule
        self.net = net = self.net.to(self.dev, memory_format=torch.channels_last).train()
        broadcast_parameters(net, self.info)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.opt, self.steps_per_epoch = sgd(net, schedule, phase, self.data)
        self.ema = WeightEMA(net, phase.ema_decay) if phase.ema_decay > 0 else None
        self.total_steps = phase.steps(self.steps_per_epoch)
        self.n_epochs = math.ceil(self.total_steps / self.steps_per_epoch)  # the last may be partial
        self.span = schedule_span(schedule, phase, self.steps_per_epoch)
        self.global_step, self.elapsed_before = 0, 0.0
        if resume is not None:
            _load_optimizer_tensors(net, self.opt, resume.optimizer or {})
            if self.ema is not None:
                self.ema.load(resume.optimizer or {})
            self.global_step = int(resume.meta["global_step"])
            self.elapsed_before = float(resume.meta.get("wall_s", 0.0))
            ckpt.set_rng_state(resume.meta["rng"])
        else:
            _carry_momentum(net, self.opt, phase, init)
            self.resumed_from = ""
        self.start_step = self.global_step
        self.evaluated = self.ema.net if self.ema is not None else net

    def _sampling(self) -> None:
        """What every step draws from and is judged by: costs, calibration images, streamed shares."""
        schedule, data = self.schedule, self.data
        self.teacher_res = max(self.space.resolutions)
        self.costs = CostTable.build(self.space) if self.phase.sampler == "cost" else None
        self.calib = None if is_streamed(data) else calibration_images(data, schedule.bn_calib_images,
                                                                       self.seed)
        self.shares = _streamed_shares(data, schedule, self.seed * 1000 + self.phase_index,
                                       self.steps_per_epoch, self.global_step, self.total_steps,
                                       self.decode_resolution, self.info, self.micro_batches)
        refs = reference_configs(self.space)
        self.tracked = {k: refs[k] for k in ("max", "mid", "min")}
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=schedule.label_smoothing)

    # -- what a step draws --------------------------------------------------------------------------

    def lr_of(self, step: int) -> float:
        return lr_at(step, self.phase, self.steps_per_epoch, teacher_lr=self.schedule.teacher.lr,
                     span=self.span)

    def plan(self, step: int) -> tuple[int, list[SubnetConfig]]:
        """The step's batch resolution and subnets, drawn from (seed, phase, step) alone."""
        rng = np.random.default_rng([self.seed, self.phase_index, step])
        resolution = step_resolution(self.phase, self.phase_space, rng)
        return resolution, step_configs(self.phase, self.phase_space, rng, resolution, self.costs)

    def kd_resolution(self, resolution: int) -> int:  # where the teacher sees the batch
        return self.teacher_res if self.phase.kd_resolution == "max" else resolution

    def decode_resolution(self, step: int) -> int:  # a streamed batch is decoded at the largest needed
        resolution, cfgs = self.plan(step)
        return max({c.r for c in cfgs}
                   | ({self.kd_resolution(resolution)} if self.kd_net is not None else set()))

    # -- the loop -----------------------------------------------------------------------------------

    def train(self, progress: bool, stop_after_steps: int | None) -> PhaseResult:
        self.bar = Progress(self.phase.name, self.total_steps, enabled=progress and self.info.is_main,
                            start_step=self.start_step)
        if self.resumed_from:  # "" when the phase starts from init
            self.bar.message(f"resumed at step {self.start_step}/{self.total_steps} from {self.resumed_from}")
        self.t_start = time.monotonic()
        self.images_seen, self.loss_sum, self.loss_n = 0, 0.0, 0
        self.val_acc: dict[str, float] = {}
        last_save = time.monotonic()
        while self.global_step < self.total_steps:
            epoch = self.global_step // self.steps_per_epoch
            rate = self.step(epoch)
            end_of_epoch = (self.global_step % self.steps_per_epoch == 0
                            or self.global_step == self.total_steps)
            if end_of_epoch and self.info.is_main:
                self.validate(epoch, rate)
            if end_of_epoch:
                broadcast_rng(self.info, self.dev)  # rank 0's evaluation drew from its generators
            stop = stop_after_steps is not None and self.global_step - self.start_step >= stop_after_steps
            if self.global_step < self.total_steps and (
                    end_of_epoch or time.monotonic() - last_save > self.schedule.checkpoint_every_s or stop):
                self.save(False, self.global_step // self.steps_per_epoch)
                last_save = time.monotonic()
            if stop:
                self.bar.close()
                _close(self.shares)
                return PhaseResult(self.phase.name, self.out_dir, self.phase.epochs, self.global_step,
                                   self.elapsed_before + time.monotonic() - self.t_start, rate,
                                   self.val_acc, self.start_step, self.resumed_from)
        return self.finish()

    def step(self, epoch: int) -> float:
        """One optimizer step over the global batch (its micro-batches); the images/s so far."""
        phase, info, dev = self.phase, self.info, self.dev
        step_in_epoch = self.global_step % self.steps_per_epoch
        order = None if self.shares is not None else epoch_order(
            len(self.data.train), self.seed * 1000 + self.phase_index, epoch)
        resolution, cfgs = self.plan(self.global_step)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_of(self.global_step)
        step_loss, images = 0.0, 0
        rng_state = _torch_rng(dev)
        for share in range(self.micro_batches):
            # each micro-batch is the share of the global batch that rank (rank * micro_batches +
            # share) of a world micro_batches times larger would take, with that rank's dropout draws
            _torch_rng(dev, rng_state)
            x, y = next(self.shares) if self.shares is not None else train_batch(
                self.data, order, step_in_epoch, self.schedule.batch_size,
                seed=self.seed * 1000 + self.phase_index, epoch=epoch,
                rank=info.rank * self.micro_batches + share, world=info.world * self.micro_batches)
            step_loss += _subnets_step(self.net, self.kd_net, phase, cfgs, x.to(dev), y.to(dev),
                                       self.criterion, self.kd_resolution(resolution),
                                       self.space) / self.micro_batches
            images += len(y)
        if self.micro_batches > 1:
            for p in self.params:
                if p.grad is not None:
                    p.grad /= self.micro_batches
        allreduce_gradients(self.params, info)
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        if self.ema is not None:
            self.ema.update(self.net)
        self.global_step += 1
        self.images_seen += images * info.world
        self.loss_sum += step_loss / phase.subnets_per_step
        self.loss_n += 1
        rate = self.images_seen / max(time.monotonic() - self.t_start, 1e-9)
        self.bar.update(self.global_step, epoch=f"{epoch + 1}/{self.n_epochs}",
                        loss=self.loss_sum / self.loss_n, lr=self.opt.param_groups[0]["lr"], res=resolution,
                        **{"img/s": round(rate)})
        return rate

    def validate(self, epoch: int, rate: float) -> None:
        """The end of an epoch (or of the phase's last, partial one): validation, logged."""
        self.val_acc = evaluate_subnets(self.evaluated, self.tracked, self.data, self.calib, split="val")
        record = {"phase": self.phase.name, "epoch": epoch + 1, "global_step": self.global_step,
                  "train_loss": round(self.loss_sum / self.loss_n, 5), "images_per_s": round(rate, 1),
                  "lr": self.opt.param_groups[0]["lr"], "val_accuracy": self.val_acc,
                  "elapsed_s": round(self.elapsed_before + time.monotonic() - self.t_start, 2)}
        append_jsonl(self.out_dir / LOG, record)
        self.bar.message(f"epoch {epoch + 1}/{self.n_epochs} val acc " +
                         " ".join(f"{k} {v:.2f}" for k, v in self.val_acc.items()))
        self.loss_sum, self.loss_n = 0.0, 0

    def finish(self) -> PhaseResult:
        self.bar.close()
        _close(self.shares)
        checksums = rank_checksums(self.net, self.info)
        if not self.val_acc and self.info.is_main:
            self.val_acc = evaluate_subnets(self.evaluated, self.tracked, self.data, self.calib, split="val")
        wall = self.elapsed_before + time.monotonic() - self.t_start
        result = PhaseResult(self.phase.name, self.out_dir, self.phase.epochs, self.global_step,
                             round(wall, 3),
                             round(self.images_seen / max(time.monotonic() - self.t_start, 1e-9), 1),
                             self.val_acc, self.start_step, self.resumed_from)
        self.save(True, self.phase.epochs, {k: v for k, v in result.to_dict().items() if k != "folder"},
                  rank_checksums=checksums)
        return result

    def save(self, completed: bool, epoch: float, result: dict | None = None, **extra: Any) -> None:
        """A checkpoint: mid-phase (live weights, optimizer and EMA buffers) or the phase's output."""
        if not self.info.is_main:
            return
        schedule, phase = self.schedule, self.phase
        meta = {"phase": phase.name, "phase_index": self.phase_index, "space": self.space.to_dict(),
                "schedule": schedule.to_dict(), "seed": self.seed, "completed": completed,
                "epoch": epoch, "global_step": self.global_step, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "lr": self.lr_of(min(self.global_step, self.total_steps - 1)),
                "wall_s": self.elapsed_before + time.monotonic() - self.t_start, "rng": ckpt.rng_state(),
                "dataset": self.data.describe(), "world_size": self.info.world,
                "train_files_sha256": _files_digest(self.data)}
        if result is not None:
            meta["result"] = result
        meta.update(extra)
        buffers = _optimizer_tensors(self.net, self.opt) | (
            self.ema.tensors() if self.ema is not None else {})
        ckpt.save_checkpoint(self.out_dir, (self.evaluated if completed else self.net).state_dict(), meta,
                             optimizer=None if completed and not _keeps_momentum(schedule, phase)
                             else buffers)
        if self.checkpoint_uri is not None:
            self.pointer = durable.push(self.out_dir, self.checkpoint_uri, self.pointer)


def train_supernet(space: SearchSpace, schedule: Schedule, data: Dataset, out_root: str | Path, *,
                   seed: int = 0, device: str = "auto", progress: bool = True,
                   phases: list[str] | None = None) -> list[PhaseResult]:
    """The teacher and every shrinking phase in order, each in ``out_root/<phase>``."""
    out_root = Path(out_root)
    names = phases or [p.name for p in schedule.all_phases()]
    results = []
    teacher_dir = out_root / schedule.teacher.name
    prev = None
    for p in schedule.all_phases():
        if p.name in names:
            results.append(run_phase(space, schedule, p.name, data, out_root / p.name, init=prev,
                                     teacher=teacher_dir if p.kd_ratio > 0 else None, seed=seed,
                                     device=device, progress=progress))
        prev = out_root / p.name
    return results


RESUME_DIR = "resume"  # train_static's mid-run checkpoints, removed when the run is done


def _static_resume(folder: Path, space: SearchSpace, cfg: SubnetConfig, model: torch.nn.Module,
                   opt: torch.optim.Optimizer) -> tuple[int, float]:
    """Continue train_static from its mid-run checkpoint in ``folder``, if any: (step, seconds so far)."""
    if not (folder / ckpt.SIDECAR).is_file():
        return 0, 0.0
    state = ckpt.load_checkpoint(folder, space=space, with_optimizer=True)
    if state.meta.get("config") != cfg.to_dict():
        raise UserError(f"holds a run of another architecture {state.meta.get('config')}",
                        source=str(folder), field="config", fix="give each architecture its own folder")
    model.load_state_dict(state.weights)
    _load_optimizer_tensors(model, opt, state.optimizer or {})
    ckpt.set_rng_state(state.meta["rng"])
    return int(state.meta["global_step"]), float(state.meta["wall_s"])


def train_static(space: SearchSpace, schedule: Schedule, cfg: SubnetConfig, data: Dataset,
                 out_dir: str | Path, *, teacher: str | Path | None = None, kd_ratio: float = 1.0,
                 init: torch.nn.Module | None = None, epochs: float | None = None, lr: float | None = None,
                 seed: int = 0, device: str = "auto", progress: bool = True,
                 checkpoint_uri: str | None = None, test: bool = True) -> dict[str, Any]:
    """Train one architecture as a plain static network: from scratch, the baseline OFA is judged by;
    from ``init`` (an extracted subnet), a fine-tune.

    The teacher phase's recipe (epochs, lr, warm-up, batch size, label smoothing, SGD Nesterov, no
    weight decay on BN and biases, the same data order and augmentation; a cosine to 0 over its own
    steps) at the config's own resolution; ``epochs`` and ``lr`` override it (a fine-tune: fewer
    epochs, no warm-up). With ``teacher``, it also distils from that checkpoint's full network
    (``kd_ratio``). Writes ``model.safetensors`` and ``result.json``; a finished folder is not trained
    again. Mid-run
    checkpoints (every ``schedule.checkpoint_every_s``) go to ``out_dir/resume``, copied to
    ``checkpoint_uri`` if given, and a run cut short continues from them as run_phase does.
    ``test=False`` skips the test-set evaluation (``test_acc`` None): a NAS proxy is picked on
    validation alone and should not pay for a test pass.
    Under torchrun the ranks share every global batch as in run_phase; rank 0 writes.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    done = out_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    # a training alone is a whole training: its cosine spans its own steps and ends at 0, even where
    # the teacher's phase is the start of one schedule across the shrinking (lr_span "training") or
    # stops at a floor; otherwise the scratch baseline would stop at a high lr, weaker than its recipe
    phase = dataclasses.replace(schedule.teacher, lr_span="phase", lr_floor=0.0)
    if epochs is not None or lr is not None:
        phase = dataclasses.replace(phase, epochs=epochs or phase.epochs, lr=lr or phase.lr,
                                    warmup_epochs=0)
    dev, info = rank_device(pick_device(device))
    data = subsample(data, schedule.train_images, schedule.val_images)
    cfg = space.validate_config(cfg)
    name = f"{'finetune' if init is not None else 'scratch'}{'-kd' if teacher is not None else ''}"
    resume_dir = out_dir / RESUME_DIR
    pointer, pulled = _durable_start(checkpoint_uri, name, resume_dir, info)
    torch.manual_seed(seed * 1000 + 99)
    model = init if init is not None else OFASupernet(space).get_active_subnet(cfg)
    model = model.to(dev, memory_format=torch.channels_last).train()
    kd_net = load_teacher(teacher, space, dev) if teacher is not None else None
    opt, steps_per_epoch = sgd(model, schedule, phase, data)
    total = phase.steps(steps_per_epoch)
    start, elapsed_before = _static_resume(resume_dir, space, cfg, model, opt)
    broadcast_parameters(model, info)
    params = [p for p in model.parameters() if p.requires_grad]
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=schedule.label_smoothing)
    bar = Progress(name, total, enabled=progress and info.is_main, start_step=start)
    if start:
        bar.message(f"resumed at step {start}/{total} from {checkpoint_uri if pulled else resume_dir}")
    t0, loss_sum, last_save = time.monotonic(), 0.0, time.monotonic()
    shares = _streamed_shares(data, schedule, seed * 1000, steps_per_epoch, start, total,
                              lambda _step: cfg.r, info)
    n_epochs = math.ceil(total / steps_per_epoch)  # the last one may be part of an epoch
    for step in range(start, total):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if shares is not None:
            x, y = next(shares)
        else:
            order = epoch_order(len(data.train), seed * 1000, epoch)  # the teacher's data stream
            x, y = train_batch(data, order, in_epoch, schedule.batch_size, seed=seed * 1000,
                               epoch=epoch, rank=info.rank, world=info.world)
        x, y = resize(x, cfg.r).to(dev), y.to(dev)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, phase, steps_per_epoch)
        logits = model(x)
        loss = criterion(logits, y)
        if kd_net is not None:
            with torch.no_grad():
                soft = F.softmax(kd_net(x, space.max_config()), dim=1)
            loss = loss + kd_ratio * soft_cross_entropy(logits, soft)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        allreduce_gradients(params, info)
        opt.step()
        loss_sum += float(loss.detach())
        steps_done = step + 1 - start
        bar.update(step + 1, epoch=f"{epoch + 1}/{n_epochs}", loss=loss_sum / steps_done, res=cfg.r,
                   **{"img/s": round(steps_done * schedule.batch_size / max(time.monotonic() - t0, 1e-9))})
        if info.is_main and step + 1 < total and time.monotonic() - last_save > schedule.checkpoint_every_s:
            meta = {"phase": name, "space": space.to_dict(), "config": cfg.to_dict(), "seed": seed,
                    "global_step": step + 1, "wall_s": elapsed_before + time.monotonic() - t0,
                    "rng": ckpt.rng_state()}
            ckpt.save_checkpoint(resume_dir, model.state_dict(), meta,
                                 optimizer=_optimizer_tensors(model, opt))
            if checkpoint_uri is not None:
                pointer = durable.push(resume_dir, checkpoint_uri, pointer)
            last_save = time.monotonic()
    bar.close()
    _close(shares)
    checksums = rank_checksums(model, info)
    if not info.is_main:
        return {"rank": info.rank, "steps": total}  # rank 0 evaluates and writes
    wall = elapsed_before + time.monotonic() - t0
    model.eval()
    result = {"config": cfg.to_dict(), "epochs": phase.epochs, "steps": total, "train_wall_s": round(wall, 3),
              "images_per_s": round((total - start) * schedule.batch_size
                                    / max(time.monotonic() - t0, 1e-9), 1),
              "val_acc": round(accuracy(model, data, "val", cfg.r), 3),
              "test_acc": round(accuracy(model, data, "test", cfg.r), 3) if test else None,
              "kd": kd_net is not None, "fine_tune": init is not None, "lr": phase.lr, "seed": seed,
              "resumed_from_step": start, "world_size": info.world, "rank_checksums": checksums}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()},
              str(out_dir / "model.safetensors"))
    done.write_text(json.dumps(result, indent=1))
    shutil.rmtree(resume_dir, ignore_errors=True)  # the output is what it was before checkpoints
    return result
