"""Analytic MACs/params must equal what the extracted static net really computes.

The independent count comes from forward hooks on every nn.Conv2d / nn.Linear of
``OFASupernet(space).get_active_subnet(cfg)`` and ``sum(p.numel())`` over its parameters.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from torch import nn

from onceforall.supernet.efficiency import (CostTable, layer_costs, subnet_macs, subnet_macs_batch,
                                            subnet_params, subnet_params_batch)
from onceforall.errors import UserError
from onceforall.supernet.space import SubnetConfig, fashion_mnist_space, imagenet_mbv3_space
from onceforall.supernet.subnet_batch import SubnetBatch
from onceforall.supernet.supernet import OFASupernet


def hook_count(net: nn.Module, resolution: int, in_channels: int) -> tuple[int, int]:
    """MACs by forward hooks (batch 1) and params by numel: independent of efficiency.py."""
    macs = 0

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            macs += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, in_channels, resolution, resolution))
    finally:
        for h in handles:
            h.remove()
    return macs, sum(p.numel() for p in net.parameters())


@pytest.fixture(scope="module")
def fashion():
    space = fashion_mnist_space()
    return space, OFASupernet(space)


@pytest.fixture(scope="module")
def imagenet():
    space = imagenet_mbv3_space()
    return space, OFASupernet(space)


def _configs(space, rng, n, resolution=None):
    cfgs = space.sample_many(rng, n) + [space.min_config(), space.max_config()]
    if resolution is not None:
        cfgs = [dataclasses.replace(c, r=resolution) for c in cfgs]
    return cfgs


def test_fashion_matches_hooks_on_random_configs(fashion):
    space, net = fashion
    for cfg in _configs(space, np.random.default_rng(0), 22):
        macs, params = hook_count(net.get_active_subnet(cfg), cfg.r, space.in_channels)
        assert subnet_macs(space, cfg) == macs, cfg
        assert subnet_params(space, cfg) == params, cfg


def test_imagenet_matches_hooks_at_min_resolution(imagenet):
    space, net = imagenet
    cfgs = _configs(space, np.random.default_rng(1), 10, resolution=min(space.resolutions))
    # 132 is not a multiple of the total stride 32: checks the ceil(H / stride) rounding.
    cfgs.append(dataclasses.replace(space.min_config(), r=132))
    for cfg in cfgs:
        macs, params = hook_count(net.get_active_subnet(cfg), cfg.r, space.in_channels)
        assert subnet_macs(space, cfg) == macs, cfg
        assert subnet_params(space, cfg) == params, cfg


@pytest.mark.parametrize("make_space", [fashion_mnist_space, imagenet_mbv3_space])
def test_batch_equals_scalar(make_space):
    space = make_space()
    rng = np.random.default_rng(2)
    batch = SubnetBatch.sample(space, rng, 300)  # skipped slots hold random latent choices
    table = CostTable.build(space)
    cfgs = batch.to_configs(space)
    assert table.macs(batch).tolist() == [subnet_macs(space, c) for c in cfgs]
    assert table.params(batch).tolist() == [subnet_params(space, c) for c in cfgs]
    # The canonical form (skipped slots at the smallest choice) costs the same.
    assert np.array_equal(table.macs(batch.canonical(space)), table.macs(batch))
    assert np.array_equal(subnet_macs_batch(space, cfgs[:5]), table.macs(batch.take(np.arange(5))))
    assert np.array_equal(subnet_params_batch(space, cfgs[:5]),
                          table.params(batch.take(np.arange(5))))


def test_imagenet_resolution_scaling():
    """Params do not depend on resolution; MACs grow with it and with the config."""
    space = imagenet_mbv3_space()
    cfg = space.max_config()
    small, big = dataclasses.replace(cfg, r=128), dataclasses.replace(cfg, r=224)
    assert subnet_params(space, small) == subnet_params(space, big)
    assert subnet_macs(space, small) < subnet_macs(space, big)
    # Monotone in every dimension from min to max.
    assert subnet_macs(space, space.min_config()) < subnet_macs(space, space.max_config())


def test_layer_breakdown_names_every_layer():
    space = fashion_mnist_space()
    cfg = space.min_config()
    names = [c.name for c in layer_costs(space, cfg)]
    assert names[0] == "stem" and names[-1] == "head.classifier"
    # 2 blocks per unit; units with SE have 4 layers per block, the first unit 3.
    assert sum(n.startswith("units.") for n in names) == 2 * 3 + 3 * 2 * 4


def test_batch_speed_10k():
    space = imagenet_mbv3_space()
    batch = SubnetBatch.sample(space, np.random.default_rng(3), 10_000)
    start = time.process_time()  # CPU time: the machine is shared, wall time would be noise
    table = CostTable.build(space)
    table.macs(batch)
    table.params(batch)
    assert time.process_time() - start < 0.2


def test_rejects_configs_outside_the_space():
    space = fashion_mnist_space()
    table = CostTable.build(space)
    bad = SubnetConfig(29, (2,) * 4, (3,) * 16, (3,) * 16)
    with pytest.raises(UserError, match="r"):
        table.macs([bad])
    with pytest.raises(UserError):
        subnet_macs(space, bad)
    wrong_shape = SubnetBatch.from_configs([imagenet_mbv3_space().min_config()])
    with pytest.raises(UserError, match="units"):
        table.macs(wrong_shape)
