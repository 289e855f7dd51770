"""Batch-norm recalibration: the statistics a subnet needs before it can be evaluated.

Running statistics accumulated while training the supernet mix every sampled subnet. Before a
subnet is evaluated, its BN statistics are recomputed on a few training images (the paper: 2,000 in
batches), as the exact average of the per-batch statistics written into the active slice.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .data import resize


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, resolution: int, *,
                   batch_size: int = 200,
                   forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Recompute every BN layer's running mean and variance of ``model`` on ``images``.

    ``images`` are normalized full-size training images, resized here to ``resolution``.
    ``forward`` runs the model (e.g. ``lambda x: supernet(x, cfg)``); default ``model(x)``.
    Only the BN buffers change; the model's train/eval mode is restored.
    """
    batches = (resize(images[start:start + batch_size], resolution)
               for start in range(0, len(images), batch_size))
    recalibrate_bn_batches(model, batches, forward=forward)


@torch.no_grad()
def recalibrate_bn_batches(model: nn.Module, batches: Iterable[torch.Tensor], *,
                           forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """:func:`recalibrate_bn` on batches already at the subnet's resolution (a streamed dataset's,
    data.calibration_batches)."""
    forward = forward or model
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved_momentum = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.running_mean.zero_()
        bn.running_var.fill_(1)
    model.train()
    try:
        for i, x in enumerate(batches):
            # momentum 1/(i+1) turns the exponential average into the exact mean over batches
            for bn in bns:
                bn.momentum = 1.0 / (i + 1)
            forward(x)
    finally:
        for bn, momentum in zip(bns, saved_momentum):
            bn.momentum = momentum
        model.train(was_training)
