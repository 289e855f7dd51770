"""Subnet evaluation: BN recalibration, then accuracy on a split."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .bn import recalibrate_bn, recalibrate_bn_batches
from ..data import Dataset, calibration_batches, device_of, eval_batches, head_rows
from .space import SubnetConfig
from .supernet import OFASupernet


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, split: str, resolution: int, *,
             forward=None, limit: int | None = None, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent of ``model`` (eval mode) on ``split`` at ``resolution``, among the
    dataset's classes (data.head_rows), on the model's device."""
    forward = forward or model
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in eval_batches(data, split, resolution, batch_size, limit, device=device_of(model)):
        logits = forward(x)
        rows = head_rows(data, logits.shape[1])
        correct += int(((logits if rows is None else logits[:, rows]).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def evaluate_subnets(net: OFASupernet, configs: dict[str, SubnetConfig], data: Dataset,
                     calib_images: torch.Tensor | None, split: str = "val",
                     limit: int | None = None, *, seed: int = 0) -> dict[str, float]:
    """Accuracy of each named subnet after BN recalibration (``net.bn_semantics``), on a copy:
    ``net`` is left untouched.

    ``calib_images``: normalized full-size training images; None for a streamed dataset
    (imagefolder.py), whose 2,000 calibration images (``seed``) are read at each subnet's resolution.
    Runs on ``net``'s device."""
    work = copy.deepcopy(net)
    out = {}
    for name, cfg in configs.items():
        fwd = lambda x, cfg=cfg: work(x, cfg)  # noqa: E731
        if calib_images is None:
            recalibrate_bn_batches(work, calibration_batches(data, 2000, seed, cfg.r, device=device_of(net)),
                                   forward=fwd, semantics=net.bn_semantics)
        else:
            recalibrate_bn(work, calib_images, cfg.r, forward=fwd, semantics=net.bn_semantics)
        out[name] = round(accuracy(work, data, split, cfg.r, forward=fwd, limit=limit), 3)
    return out
