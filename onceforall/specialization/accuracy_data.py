"""Accuracy data for the predictor: sampled subnets, BN recalibrated, measured on validation.

Two stratified samplers, and by default half of each:

* ``balanced``: every dimension (resolution, each unit's depth, each slot's kernel and expand
  ratio) takes each of its choices equally often, in a seeded random arrangement (a Latin
  hypercube over the choices). Slots are independent, so a subnet's mean kernel and expand
  cluster in the middle: of 1200 such subnets (fashion-mnist) one had more than 80% of its active
  blocks at expand 6; of 600 graded ones, 50 had 90% or more.
* ``graded``: each subnet draws a level in [0, 1] for depth, kernel and expand (stratified over
  the sample), and each unit or slot then takes choice j of m with the binomial probability
  C(m-1, j) u^j (1-u)^(m-1-j): near 1 nearly every slot takes the largest choice. These reach the
  corners where generous budgets are spent. A predictor fit on balanced subnets alone put the
  max subnet at 91.45% and the uniform d3 k7 e6 at 91.32% where validation measured 92.11 and
  91.92, so the search never spent more than 2.1 of a 3 ms budget and lost to that uniform subnet.

The list of configs depends only on (space, n, seed, sampler), so chunks of it can be measured by
different workers (``chunk``/``num_chunks``) and a rerun skips rows already in the output file
(JSON lines, one row per subnet, appended as each is measured).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..supernet.bn import recalibrate_bn, recalibrate_bn_batches
from ..data import (Dataset, calibration_batches, calibration_images, device_of, eval_batches, head_rows,
                    is_streamed, normalize, resize)
from ..supernet.efficiency import CostTable
from ..errors import UserError
from ..supernet.space import SearchSpace, SubnetConfig
from ..supernet.supernet import OFASupernet


SAMPLERS = ("mixed", "balanced", "graded")


def stratified_configs(space: SearchSpace, n: int, seed: int, sampler: str = "mixed") -> list[SubnetConfig]:
    """``n`` subnets from ``sampler`` (see the module docstring); ``mixed`` interleaves
    ``balanced`` (even positions) and ``graded`` (odd), so every chunk gets both."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}", field="sampler", fix=f"use one of {SAMPLERS}")
    if sampler == "mixed":
        out: list[SubnetConfig] = [None] * n  # type: ignore[list-item]
        out[0::2] = stratified_configs(space, (n + 1) // 2, seed, "balanced")
        out[1::2] = stratified_configs(space, n // 2, seed, "graded")
        return out
    rng = np.random.default_rng(seed)

    def balanced(choices, shape) -> np.ndarray:
        # Each column takes every choice equally often (up to n % len(choices)), shuffled per column.
        cols = []
        for _ in range(int(np.prod(shape[1:])) if len(shape) > 1 else 1):
            col = np.resize(np.asarray(choices), n)
            cols.append(rng.permutation(col))
        return np.stack(cols, axis=1).reshape(shape)

    def graded(choices, shape) -> np.ndarray:
        # One level per subnet, stratified (one in each 1/n of [0, 1]); binomial per column.
        level = rng.permutation((np.arange(n) + rng.random(n)) / n)
        idx = rng.binomial(len(choices) - 1, np.broadcast_to(level[:, None], shape))
        return np.asarray(sorted(choices))[idx]

    r = balanced(space.resolutions, (n,))
    pick = balanced if sampler == "balanced" else graded
    d = pick(space.depths, (n, len(space.units)))
    k = pick(space.kernels, (n, space.num_slots))
    e = pick(space.expands, (n, space.num_slots))
    return [SubnetConfig(int(r[i]), tuple(map(int, d[i])), tuple(map(int, k[i])),
                         tuple(map(int, e[i]))).canonical(space) for i in range(n)]


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # a row cut short by a kill: measured again
            raise UserError(f"line {i + 1} is not JSON", source=str(path),
                            fix="remove the damaged line; it will be measured again") from None
    return rows


class SubnetEvaluator:
    """Evaluates many subnets of one supernet fast: static subnets, images resized once per
    resolution, BN recalibrated on a fixed set of training images, no autograd.

    With ``mirror``, every image is also scored flipped left-right and the accuracy is the mean
    over both views. Training flips at random, so the mirror image is an image of the same class
    the net was trained to read, and the mean is a less noisy measure of the subnet than one view:
    bench/predictor_noise.py measured the Kendall tau a perfect predictor could reach against
    5,000-image labels at 0.843 with one view and 0.874 with both. The accuracy predictor's data
    and the validation shortlist use it; test accuracy (the numbers reported and reproduced)
    never does.

    A streamed dataset (imagefolder.py) is read again for every subnet, at its resolution: the
    calibration images under the reference's training transform, then ``split`` under its
    evaluation transform; nothing is held but one batch.

    It runs on ``net``'s device: a dataset held in memory is put there once, resized to every
    resolution; a streamed one goes there a batch at a time.
    """

    def __init__(self, net: OFASupernet, data: Dataset, *, split: str = "val",
                 calib_images: int = 2000, seed: int = 0, batch_size: int = 1000,
                 mirror: bool = False):
        self.net = net.eval()
        self.space = net.space
        self.batch_size = batch_size
        self.mirror = mirror
        self.data, self.split, self.calib_images, self.seed = data, split, calib_images, seed
        self.streamed = is_streamed(data)
        self.device = device_of(net)
        if self.streamed:
            return
        calib = calibration_images(data, calib_images, seed).to(self.device)
        images = getattr(data, split)
        x = normalize(images.images.to(self.device), data.mean, data.std)
        self.labels = images.labels.to(self.device)
        self.calib = {r: resize(calib, r) for r in self.space.resolutions}
        self.eval_x = {r: resize(x, r) for r in self.space.resolutions}

    @torch.inference_mode()
    def correct(self, cfg: SubnetConfig) -> torch.Tensor:
        """(views, images) bool on the CPU: which images subnet ``cfg`` classifies right, BN
        recalibrated once; view 0 is the images as they are, view 1 (with ``mirror``) the images
        flipped."""
        subnet = self.net.get_active_subnet(cfg).to(memory_format=torch.channels_last)
        if self.streamed:
            return self._correct_streamed(subnet, cfg.r)
        recalibrate_bn(subnet, self.calib[cfg.r], cfg.r, semantics=self.net.bn_semantics)
        subnet.eval()
        x = self.eval_x[cfg.r]
        return torch.stack([
            torch.cat([subnet(v[s:s + self.batch_size]).argmax(1)
                       for s in range(0, len(v), self.batch_size)]) == self.labels
            for v in ((x, x.flip(-1)) if self.mirror else (x,))]).cpu()

    def _correct_streamed(self, subnet: torch.nn.Module, r: int) -> torch.Tensor:
        recalibrate_bn_batches(subnet, calibration_batches(self.data, self.calib_images, self.seed, r,
                                                           device=self.device),
                               semantics=self.net.bn_semantics)
        subnet.eval()
        rows = head_rows(self.data, self.space.num_classes)

        def predict(x: torch.Tensor) -> torch.Tensor:
            logits = subnet(x)
            return (logits if rows is None else logits[:, rows]).argmax(1)

        right = [torch.stack([predict(v) == y for v in ((x, x.flip(-1)) if self.mirror else (x,))])
                 for x, y in eval_batches(self.data, self.split, r, self.batch_size, device=self.device)]
        return torch.cat(right, dim=1).cpu()

    def __call__(self, cfg: SubnetConfig) -> float:
        return accuracy_pct(self.correct(cfg))


def accuracy_pct(right: torch.Tensor) -> float:
    """Percent right over all views and images of ``SubnetEvaluator.correct``."""
    return 100.0 * int(right.sum()) / right.numel()


def collect_accuracy(net: OFASupernet, data: Dataset, out_path: str | Path, n: int, *,
                     seed: int = 0, chunk: int = 0, num_chunks: int = 1, sample_seed: int | None = None,
                     sampler: str = "mixed", mirror: bool = True,
                     progress: Callable[[int, int, float], None] | None = None,
                     done_in: Sequence[str | Path] = ()) -> Path:
    """Measure this chunk's share of ``stratified_configs(space, n, sample_seed, sampler)`` into
    ``out_path`` (rows already there, or in a file of ``done_in``, are not measured again).

    ``seed`` fixes the measurement (the BN calibration images); ``sample_seed`` (default ``seed``)
    the subnets, so a second stratified set can extend a first one measured the same way.
    ``val_acc`` is over each image and its mirror image (``mirror``, see SubnetEvaluator);
    ``val_acc_plain`` over the images alone. Rows measured another way are an error: one file
    holds one kind of label.
    """
    if not 0 <= chunk < num_chunks:
        raise UserError(f"chunk {chunk} is not in [0, {num_chunks})", field="chunk",
                        fix="number chunks 0 .. num_chunks-1")
    space = net.space
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    views = 2 if mirror else 1
    old = []
    for path in (out_path, *map(Path, done_in)):
        rows = read_rows(path)
        if any(r.get("views", 1) != views for r in rows):
            raise UserError(f"rows measured with views={rows[0].get('views', 1)}, this run measures "
                            f"views={views}", source=str(path), field="mirror",
                            fix="measure into a new file, or pass the same mirror setting")
        old += rows
    done = {json.dumps(r["config"], sort_keys=True) for r in old}
    sample_seed = seed if sample_seed is None else sample_seed
    todo = [c for c in stratified_configs(space, n, sample_seed, sampler)[chunk::num_chunks]
            if json.dumps(c.to_dict(), sort_keys=True) not in done]
    costs = CostTable.build(space)
    evaluate = SubnetEvaluator(net, data, seed=seed, mirror=mirror)
    with open(out_path, "a") as f:
        for i, cfg in enumerate(todo):
            t = time.monotonic()
            right = evaluate.correct(cfg)
            row = {"config": cfg.to_dict(), "r": cfg.r, "val_acc": round(accuracy_pct(right), 3),
                   "val_acc_plain": round(accuracy_pct(right[0]), 3), "views": views,
                   "sampler": sampler,
                   "macs": int(costs.macs([cfg])[0]), "params": int(costs.params([cfg])[0]),
                   "eval_s": round(time.monotonic() - t, 3)}
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            if progress:
                progress(i + 1, len(todo), row["eval_s"])
    return out_path


def collect_accuracy_on(devices: Sequence[str], open_inputs: Callable[[], tuple[OFASupernet, Dataset]],
                        out_path: str | Path, n: int, *, opened: tuple[OFASupernet, Dataset] | None = None,
                        seed: int = 0, sampler: str = "mixed", mirror: bool = True,
                        progress: Callable[[int, int, float], None] | None = None) -> Path:
    """:func:`collect_accuracy` on every device of ``devices`` at once (``["cuda:0", "cuda:1"]``).

    One device: measured here. Several: one process per device (spawned) measures chunk i of them
    into a side file beside ``out_path``; the rows are then merged into ``out_path`` in the sample's
    order (the order one process writes them in), and the side files go. A rerun cut short skips
    the rows in either. ``open_inputs`` (picklable, e.g. a functools.partial of a module-level
    function) gives the supernet and the dataset; each process calls it, and moves the supernet to
    its device; ``opened``: what it gives, where the caller has it already.
    ``progress(done, total, seconds)`` counts the rows of every process.
    """
    out_path = Path(out_path)
    net, data = opened or open_inputs()
    if len(devices) <= 1:
        return collect_accuracy(net.to(devices[0] if devices else "cpu"), data, out_path, n, seed=seed,
                                sampler=sampler, mirror=mirror, progress=progress)
    from torch import multiprocessing as mp

    parts = [out_path.with_name(f"{out_path.stem}.part{i}{out_path.suffix}") for i in range(len(devices))]
    held = sum(_count_lines(p) for p in parts)
    todo = n - len(read_rows(out_path)) - held
    t0 = time.monotonic()
    ctx = mp.start_processes(_collect_part, nprocs=len(devices), join=False, start_method="spawn",
                             args=(list(devices), open_inputs, out_path, parts, n, seed, sampler, mirror))
    while not ctx.join(timeout=2.0):
        if progress:
            done = sum(_count_lines(p) for p in parts) - held
            progress(done, todo, (time.monotonic() - t0) / max(done, 1))
    return _merge_parts(out_path, parts, stratified_configs(net.space, n, seed, sampler))


def _collect_part(i: int, devices: list[str], open_inputs, out_path: Path, parts: list[Path], n: int,
                  seed: int, sampler: str, mirror: bool) -> None:
    device = torch.device(devices[i])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # processes sharing the CPU share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(devices)))
    net, data = open_inputs()
    collect_accuracy(net.to(device), data, parts[i], n, seed=seed, chunk=i, num_chunks=len(devices),
                     sampler=sampler, mirror=mirror, done_in=[out_path])


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _merge_parts(out_path: Path, parts: list[Path], sample: list[SubnetConfig]) -> Path:
    """Every row of ``out_path`` and ``parts`` into ``out_path``, in the order of ``sample`` (rows of
    another sample, an earlier larger n, after them in the order they were)."""
    rows = read_rows(out_path) + [r for p in parts for r in read_rows(p)]
    by_key = {json.dumps(r["config"], sort_keys=True): r for r in rows}
    rank = {json.dumps(c.to_dict(), sort_keys=True): i for i, c in enumerate(sample)}
    keys = sorted(by_key, key=lambda k: rank.get(k, len(rank)))  # stable: the others keep their order
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(by_key[k], sort_keys=True) + "\n" for k in keys))
    os.replace(tmp, out_path)
    for p in parts:
        p.unlink(missing_ok=True)
    return out_path


def load_accuracy_rows(paths: list[str | Path], space: SearchSpace) -> tuple[list[SubnetConfig],
                                                                               np.ndarray]:
    cfgs, accs = [], []
    for path in paths:
        for row in read_rows(path):
            cfgs.append(SubnetConfig.from_dict(row["config"], space, str(path)))
            accs.append(row["val_acc"])
    if not cfgs:
        raise UserError("no measured subnets", source=", ".join(map(str, paths)),
                        fix="run the accuracy-data stage first")
    return cfgs, np.asarray(accs, dtype=np.float64)
