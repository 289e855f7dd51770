import numpy as np
import pytest
import torch

from onceforall.supernet.space import get_space
from onceforall.supernet.supernet import OFASupernet


def _randomized(space):
    """A supernet whose BN statistics and kernel transforms are far from their initial values."""
    torch.manual_seed(0)
    net = OFASupernet(space)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        for name, p in net.named_parameters():
            if "transforms" in name:
                p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.mark.parametrize("name", ["fashion-mnist", "imagenet-mbv3"])
def test_extracted_subnet_matches_supernet(name):
    space = get_space(name)
    net = _randomized(space)
    rng = np.random.default_rng(1)
    configs = space.sample_many(rng, 20) + [space.max_config(), space.min_config()]
    worst = 0.0
    for cfg in configs:
        r = cfg.r if name == "fashion-mnist" else min(space.resolutions)
        x = torch.randn(2, space.in_channels, r, r)
        with torch.no_grad():
            expected = net(x, cfg)
            static = net.get_active_subnet(cfg).eval()
            got = static(x)
        assert not any(type(m).__name__.startswith("Elastic") for m in static.modules())
        worst = max(worst, (expected - got).abs().max().item())
    assert worst <= 1e-5


def test_kernel_transforms_start_as_identity():
    net = OFASupernet(get_space("fashion-mnist"))
    block = net.units[0][1]
    w7 = block.dw_conv.weight
    assert torch.equal(block.dw_conv.active_weight(8, 3), w7[:8, :, 2:5, 2:5])


@pytest.mark.parametrize("hw,k,stride", [((4, 4), 7, 1), ((2, 2), 7, 1), ((4, 4), 7, 2), ((3, 5), 5, 1),
                                         ((6, 6), 7, 2), ((2, 2), 3, 1)])
def test_small_map_depthwise_gradients_are_the_convolution_s(hw, k, stride):
    """The hand-written weight gradient where the kernel is larger than the map: torch's own check in
    float64, then against F.conv2d's autograd in the float32 channels-last layout of training."""
    from onceforall.supernet.ops import _SmallMapDepthwise, depthwise_conv2d

    torch.manual_seed(0)
    x = torch.randn(3, 4, *hw, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, k, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _SmallMapDepthwise.apply(a, b, stride), (x, w))

    x = torch.randn(8, 16, *hw).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(16, 1, k, k, requires_grad=True)
    y_ref = torch.nn.functional.conv2d(x, w, None, stride, k // 2, 1, 16)
    y = depthwise_conv2d(x, w, stride)
    assert y.grad_fn is not None and "SmallMapDepthwise" in type(y.grad_fn).__name__
    g = torch.randn_like(y_ref)
    ref, got = torch.autograd.grad(y_ref, (x, w), g), torch.autograd.grad(y, (x, w), g)
    assert torch.allclose(y, y_ref, atol=1e-5)
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_extracted_subnet_trains_with_the_small_map_gradient_and_exports_plain_convs():
    from onceforall.supernet.ops import DepthwiseConv2d

    space = get_space("fashion-mnist")
    static = _randomized(space).get_active_subnet(space.max_config()).train()
    dws = [m for m in static.modules() if isinstance(m, DepthwiseConv2d)]
    assert len(dws) == sum(space.max_config().d) + 1  # every block's, and the first block's
    x = torch.randn(4, 1, 28, 28)
    paths = []
    hooks = [m.register_forward_hook(lambda m, i, out: paths.append(type(out.grad_fn).__name__))
             for m in dws]
    torch.manual_seed(0)  # the same dropout mask both times
    static(x).sum().backward()
    got = [m.weight.grad.clone() for m in dws]
    for h in hooks:
        h.remove()
    # 7x7 kernels on the last units' 4x4 and 2x2 maps take the hand-written gradient, the rest not
    assert 0 < sum("SmallMapDepthwise" in p for p in paths) < len(dws)
    static.zero_grad()
    for m in dws:  # the same module as a plain nn.Conv2d
        m.forward = lambda inp, m=m: torch.nn.Conv2d.forward(m, inp)
    torch.manual_seed(0)
    static(x).sum().backward()
    for a, m in zip(got, dws):
        assert torch.allclose(a, m.weight.grad, rtol=1e-4, atol=1e-5)
    static.eval()
    with torch.no_grad():
        assert torch.equal(dws[0](x.new_ones(1, dws[0].in_channels, 5, 5)),
                           torch.nn.functional.conv2d(x.new_ones(1, dws[0].in_channels, 5, 5),
                                                      dws[0].weight, None, dws[0].stride,
                                                      dws[0].padding, 1, dws[0].groups))


def test_set_active_subnet_is_what_forward_runs():
    space = get_space("fashion-mnist")
    net = _randomized(space)
    cfg = space.sample(np.random.default_rng(3))
    x = torch.randn(2, 1, cfg.r, cfg.r)
    net.set_active_subnet(cfg)
    with torch.no_grad():
        assert torch.equal(net(x), net(x, cfg))


def test_channel_sorting_keeps_the_max_network_function():
    space = get_space("fashion-mnist")
    net = _randomized(space)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = net(x, space.max_config())
        net.sort_channels_()
        after = net(x, space.max_config())
    assert (before - after).abs().max() < 1e-5
    block = net.units[1][1]
    importance = block.project_conv.weight.abs().sum((0, 2, 3))
    assert torch.all(importance[:-1] >= importance[1:] - 1e-7)


def test_channel_sorting_respects_trained_bands():
    space = get_space("fashion-mnist")
    net = _randomized(space)
    block = net.units[1][1]
    edge = block.hidden(4)
    first_band = set(block.project_conv.weight[:, :edge].abs().sum((0, 2, 3)).tolist())
    net.sort_channels_(trained_expands=[4, 6])
    assert set(block.project_conv.weight[:, :edge].abs().sum((0, 2, 3)).tolist()) == first_band
