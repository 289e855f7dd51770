"""Batch-norm recalibration: the statistics a subnet needs before it can be evaluated.

Running statistics accumulated while training the supernet mix every sampled subnet. Before a
subnet is evaluated, its BN statistics are recomputed on a few training images (the paper: 2,000 in
batches), as the exact average of the per-batch statistics written into the active slice.

Two semantics:
- ``"ours"`` (the default): every BN layer's buffers are reset, then each batch's statistics go in
  through BN's own update (unbiased variance), averaged over batches with equal weight. Inactive
  channels end up at mean 0 / variance 1.
- ``"reference"``: MIT's ``set_running_statistics`` (ofa/imagenet_classification/elastic_nn/utils.py):
  each BN normalizes with its batch's mean and *biased* variance, the averages are weighted by batch
  size, and only the channels that were active are written; everything else keeps its value. Use it
  to reproduce the published accuracies of an imported official supernet.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import device_of, resize

SEMANTICS = ("ours", "reference")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, resolution: int, *,
                   batch_size: int = 200,
                   forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   semantics: str = "ours") -> None:
    """Recompute every BN layer's running mean and variance of ``model`` on ``images``.

    ``images`` are normalized full-size training images, resized here to ``resolution``.
    ``forward`` runs the model (e.g. ``lambda x: supernet(x, cfg)``); default ``model(x)``.
    ``semantics``: "ours" or "reference" (see the module's docstring).
    Only the BN buffers change; the model's train/eval mode is restored. The images go to the
    model's device a batch at a time.
    """
    dev = device_of(model)
    batches = (resize(images[start:start + batch_size].to(dev, non_blocking=True), resolution)
               for start in range(0, len(images), batch_size))
    recalibrate_bn_batches(model, batches, forward=forward, semantics=semantics)


@torch.no_grad()
def recalibrate_bn_batches(model: nn.Module, batches: Iterable[torch.Tensor], *,
                           forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                           semantics: str = "ours") -> None:
    """:func:`recalibrate_bn` on batches already at the subnet's resolution (a streamed dataset's,
    data.calibration_batches), moved to the model's device where they are not there yet."""
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    forward = forward or model
    dev = device_of(model)
    batches = (b.to(dev, non_blocking=True) for b in batches)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if semantics == "reference":
        _reference_statistics(model, bns, (b.contiguous() for b in batches), forward)
    else:
        _our_statistics(model, bns, batches, forward)


def _our_statistics(model, bns, batches, forward) -> None:
    saved_momentum = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.running_mean.zero_()
        bn.running_var.fill_(1)
    model.train()
    try:
        for i, batch in enumerate(batches):
            # momentum 1/(i+1) turns the exponential average into the exact mean over batches
            for bn in bns:
                bn.momentum = 1.0 / (i + 1)
            forward(batch)
    finally:
        for bn, momentum in zip(bns, saved_momentum):
            bn.momentum = momentum
        model.train(was_training)


def _pooled(t: torch.Tensor) -> torch.Tensor:
    """Per-channel mean over batch, H, W, in the reference's order: (B, C, H, W) -> (C,)."""
    return t.mean(0, keepdim=True).mean(2, keepdim=True).mean(3, keepdim=True).flatten()


def _reference_statistics(model, bns, batches, forward) -> None:
    sums: dict[nn.Module, list] = {bn: [0, 0, 0] for bn in bns}  # mean * n, var * n, n

    def batch_stats_norm(bn: nn.Module, inputs: tuple, _output: torch.Tensor) -> torch.Tensor:
        # A forward hook's return value replaces the layer's output: BN with this batch's statistics.
        x = inputs[0]
        mean = _pooled(x)
        centred = x - mean[None, :, None, None]
        var = _pooled(centred * centred)  # biased
        acc, n, c = sums[bn], x.shape[0], mean.shape[0]
        acc[0], acc[1], acc[2] = acc[0] + mean * n, acc[1] + var * n, acc[2] + n
        return F.batch_norm(x, mean, var, bn.weight[:c], bn.bias[:c], False, 0.0, bn.eps)

    handles = [bn.register_forward_hook(batch_stats_norm) for bn in bns]
    was_training = model.training
    model.eval()  # the layers' own forward then reads the buffers and never writes them
    try:
        for batch in batches:
            forward(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for bn, (mean_sum, var_sum, count) in sums.items():
        if count:
            c = mean_sum.shape[0]
            bn.running_mean[:c] = mean_sum / count
            bn.running_var[:c] = var_sum / count
