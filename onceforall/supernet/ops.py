"""Elastic ops and their static counterparts.

An elastic op holds the weights of its largest size and is told the active size in each call
(``forward(x, kernel=5)``); it keeps no "active" state of its own. ``extract(...)`` returns the
static ``nn.Module`` that computes the same function for one size, with copied weights.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .space import make_divisible

BN_MOMENTUM = 0.1
BN_EPS = 1e-5


def activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "hswish": nn.Hardswish}[name](inplace=True)


# Extraction builds static modules on the meta device (no memory, no random init) and then gives them
# copies of the supernet's slices: a subnet is extracted for every measured subnet and every export,
# and initialising weights only to overwrite them was a third of the time.


def _own(t: torch.Tensor) -> torch.Tensor:
    """A detached copy with its own memory (a slice of the supernet's weights must not alias them)."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _conv(weight: torch.Tensor, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bias-free static conv holding a copy of ``weight`` (out, in/groups, k, k)."""
    out_c, in_per_group, k, _ = weight.shape
    kind = DepthwiseConv2d if groups > 1 and groups == out_c and in_per_group == 1 else nn.Conv2d
    conv = kind(in_per_group * groups, out_c, k, stride, k // 2, groups=groups, bias=False,
                device="meta")
    conv.weight = nn.Parameter(_own(weight))
    return conv


# MIT's reference code pools and applies the pooled-feature layers in its own way; an imported
# official supernet (SearchSpace.reference_numerics) computes them as it does, so that its logits
# equal the reference's bit for bit (tests/test_official.py). Ours keep the faster forms: in a
# Fashion-MNIST training step (5 subnets, batch 128, 1 thread) the reference forms took 3-6% longer
# (medians of 6-8 interleaved rounds on a loaded 2-core host).


def pooled(x: torch.Tensor, reference: bool = False) -> torch.Tensor:
    """Global average pool, (B, C, H, W) -> (B, C, 1, 1); ``reference``: the mean over W, then over
    H, as the reference (one mean over both axes rounds differently)."""
    if reference:
        return x.mean(3, keepdim=True).mean(2, keepdim=True)
    return x.mean((2, 3), keepdim=True)


def pointwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     reference: bool = False) -> torch.Tensor:
    """A linear layer on pooled features (B, C_in, 1, 1) -> (B, C_out, 1, 1); ``weight`` is
    (C_out, C_in). ``reference``: as the 1x1 convolution the reference uses (a matmul rounds
    differently)."""
    if reference:
        return F.conv2d(x, weight.contiguous()[:, :, None, None], bias)
    return F.linear(x.flatten(1), weight, bias)[:, :, None, None]


class PointwiseLinear(nn.Linear):
    """``nn.Linear``'s parameters (and state-dict keys) on pooled features (B, C, 1, 1)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 reference: bool = False, device=None):
        super().__init__(in_features, out_features, bias, device=device)
        self.reference = reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_linear(x, self.weight, self.bias, self.reference)


def _linear(weight: torch.Tensor, bias: torch.Tensor, reference: bool) -> PointwiseLinear:
    layer = PointwiseLinear(weight.shape[1], weight.shape[0], reference=reference, device="meta")
    layer.weight, layer.bias = nn.Parameter(_own(weight)), nn.Parameter(_own(bias))
    return layer


def _copy_bn(src: nn.BatchNorm2d, n: int) -> nn.BatchNorm2d:
    """A static BN over the first ``n`` channels of ``src``: parameters and running statistics."""
    bn = nn.BatchNorm2d(n, eps=src.eps, momentum=src.momentum, device="meta")
    bn.weight, bn.bias = nn.Parameter(_own(src.weight[:n])), nn.Parameter(_own(src.bias[:n]))
    bn.running_mean, bn.running_var = _own(src.running_mean[:n]), _own(src.running_var[:n])
    bn.num_batches_tracked = _own(src.num_batches_tracked)
    return bn


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """Batch norm over the first C channels of its max-size parameters and running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.num_features:
            return super().forward(x)
        # Slices of the running buffers are views: training updates the active slice in place.
        return F.batch_norm(x, self.running_mean[:c], self.running_var[:c], self.weight[:c],
                            self.bias[:c], self.training, self.momentum, self.eps)

    def extract(self, c: int) -> nn.BatchNorm2d:
        return _copy_bn(self, c)

    def permute_(self, idx: torch.Tensor) -> None:
        with torch.no_grad():
            for t in (self.weight, self.bias, self.running_mean, self.running_var):
                t.copy_(t[idx])


class ElasticPointwiseConv(nn.Module):
    """1x1 convolution whose output channels are elastic; input channels follow the input."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def forward(self, x: torch.Tensor, out_channels: int) -> torch.Tensor:
        return F.conv2d(x, self.weight[:out_channels, : x.shape[1]])

    def extract(self, in_channels: int, out_channels: int) -> nn.Conv2d:
        return _conv(self.weight[:out_channels, :in_channels])


@functools.lru_cache(maxsize=128)
def _kernel_tap_index(h: int, w: int, k: int, stride: int) -> torch.Tensor:
    """For each (output pixel, input pixel) pair of a padded k x k conv, the kernel tap joining them,
    or k*k where none does; flattened, (Ho*Wo*H*W,)."""
    p = k // 2
    ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    ky = (torch.arange(h).view(1, h) - torch.arange(ho).view(ho, 1) * stride + p).view(ho, 1, h, 1)
    kx = (torch.arange(w).view(1, w) - torch.arange(wo).view(wo, 1) * stride + p).view(1, wo, 1, w)
    inside = (ky >= 0) & (ky < k) & (kx >= 0) & (kx < k)
    return torch.where(inside, ky * k + kx, k * k).reshape(-1)


def plain_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """A depthwise conv with padding k // 2, all of it (gradients too) torch's own."""
    return F.conv2d(x, weight, None, stride, weight.shape[-1] // 2, 1, x.shape[1])


class _SmallMapDepthwise(torch.autograd.Function):
    """A depthwise conv whose weight gradient is one batched matmul per channel.

    oneDNN's CPU weight gradient for a depthwise conv whose kernel is larger than its feature map
    (a 7x7 kernel on the last units' 4x4 and 2x2 maps, mostly padding) is 10-30x slower than the
    forward on AVX2 hosts: 75-95 ms for a batch of 128 at 4x4 with 240-384 channels, most of a
    training step. Here the gradient of the dense (output pixel x input pixel) matrix of each channel
    is ``grad_out^T @ x`` over the batch, and each kernel tap sums its entries: ~10x faster on such
    maps, the same numbers to float rounding. Forward and input gradient stay oneDNN's.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        return plain_depthwise_conv2d(x, weight, stride)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        s, (c, _, k, _), (n, _, h, w) = ctx.stride, weight.shape, x.shape
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [s, s], [k // 2, k // 2], [1, 1], False, [0, 0], c,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            xc = x.permute(1, 0, 2, 3).reshape(c, n, h * w).contiguous()
            gc = grad_out.permute(1, 0, 2, 3).reshape(c, n, -1).contiguous()
            dense = torch.bmm(gc.transpose(1, 2), xc).reshape(c, -1)  # (C, Ho*Wo*H*W)
            taps = dense.new_zeros(c, k * k + 1).index_add_(1, _kernel_tap_index(h, w, k, s), dense)
            grad_w = taps[:, :-1].reshape(c, 1, k, k)
        return grad_x, grad_w, None


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """``F.conv2d(x, weight, stride=stride, padding=k // 2, groups=C)``, trained fast on CPU where the
    kernel is larger than the feature map (see ``_SmallMapDepthwise``)."""
    if (x.device.type == "cpu" and weight.shape[-1] > min(x.shape[-2:]) and torch.is_grad_enabled()
            and weight.requires_grad):
        return _SmallMapDepthwise.apply(x, weight, stride)
    return plain_depthwise_conv2d(x, weight, stride)


class DepthwiseConv2d(nn.Conv2d):
    """A static depthwise ``nn.Conv2d`` (padding k // 2) that trains with ``depthwise_conv2d``'s
    gradient: extracted subnets are fine-tuned and trained from scratch too. In eval mode, and so in
    ONNX export, it is the plain convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return depthwise_conv2d(x, self.weight, self.stride[0])
        return super().forward(x)


class ElasticDepthwiseConv(nn.Module):
    """Depthwise convolution with an elastic kernel (OFA's kernel transformation).

    Only the largest kernel is stored. A smaller kernel is the centre of the next larger one passed
    through a learned (k*k x k*k) matrix, initialised to identity and shared by all channels: 7x7 ->
    centre 5x5 -> T(25x25) -> centre 3x3 -> T(9x9).
    """

    def __init__(self, channels: int, kernels: Sequence[int], stride: int):
        super().__init__()
        self.kernels = tuple(sorted(kernels))
        self.stride = stride
        kmax = self.kernels[-1]
        self.weight = nn.Parameter(torch.empty(channels, 1, kmax, kmax))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.transforms = nn.ParameterDict({
            f"{big}to{small}": nn.Parameter(torch.eye(small * small))
            for big, small in zip(self.kernels[:0:-1], self.kernels[-2::-1])
        })

    def active_weight(self, channels: int, kernel: int) -> torch.Tensor:
        w = self.weight[:channels]  # (C, 1, kmax, kmax)
        for big, small in zip(self.kernels[:0:-1], self.kernels[-2::-1]):
            if big <= kernel:
                break
            lo = (big - small) // 2
            centre = w[:, :, lo:lo + small, lo:lo + small].reshape(channels, small * small)
            w = F.linear(centre, self.transforms[f"{big}to{small}"]).view(channels, 1, small, small)
        return w

    def forward(self, x: torch.Tensor, kernel: int) -> torch.Tensor:
        return depthwise_conv2d(x, self.active_weight(x.shape[1], kernel), self.stride)

    def extract(self, channels: int, kernel: int) -> nn.Conv2d:
        with torch.no_grad():
            return _conv(self.active_weight(channels, kernel), self.stride, groups=channels)


class SqueezeExcite(nn.Module):
    """Static squeeze-excite: channel gates from pooled features (ReLU, then hard sigmoid)."""

    def __init__(self, channels: int, mid: int, reduce: PointwiseLinear | None = None,
                 expand: PointwiseLinear | None = None, *, reference: bool = False):
        super().__init__()
        self.reference = reference
        self.reduce = reduce if reduce is not None else PointwiseLinear(channels, mid, reference=reference)
        self.expand = expand if expand is not None else PointwiseLinear(mid, channels, reference=reference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = pooled(x, self.reference)  # (B, C, 1, 1)
        s = F.hardsigmoid(self.expand(F.relu(self.reduce(s))))
        return x * s


class ElasticSqueezeExcite(nn.Module):
    """Squeeze-excite over the first C channels; its bottleneck is make_divisible(C / 4)."""

    REDUCTION = 4

    def __init__(self, max_channels: int, reference: bool = False):
        super().__init__()
        self.reference = reference  # the reference's numerics (see pooled)
        mid = self.mid_channels(max_channels)
        self.reduce = nn.Linear(max_channels, mid)
        self.expand = nn.Linear(mid, max_channels)

    @classmethod
    def mid_channels(cls, channels: int) -> int:
        return make_divisible(channels // cls.REDUCTION, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        m = self.mid_channels(c)
        ref = self.reference
        s = pooled(x, ref)  # (B, C, 1, 1)
        s = F.relu(pointwise_linear(s, self.reduce.weight[:m, :c], self.reduce.bias[:m], ref))
        s = F.hardsigmoid(pointwise_linear(s, self.expand.weight[:c, :m], self.expand.bias[:c], ref))
        return x * s

    def extract(self, c: int) -> SqueezeExcite:
        m = self.mid_channels(c)
        ref = self.reference
        return SqueezeExcite(c, m, _linear(self.reduce.weight[:m, :c], self.reduce.bias[:m], ref),
                             _linear(self.expand.weight[:c, :m], self.expand.bias[:c], ref), reference=ref)


class MBConv(nn.Module):
    """Static inverted residual: [1x1 expand, BN, act] -> kxk depthwise, BN, act -> [SE] -> 1x1, BN."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, kernel: int, stride: int,
                 act: str, se: bool, reference: bool = False):
        super().__init__()
        self.expand = None
        if hidden != in_channels:
            self.expand = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False),
                                        nn.BatchNorm2d(hidden, BN_EPS, BN_MOMENTUM), activation(act))
        self.depthwise = nn.Sequential(
            DepthwiseConv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden, BN_EPS, BN_MOMENTUM), activation(act))
        self.se = (SqueezeExcite(hidden, ElasticSqueezeExcite.mid_channels(hidden), reference=reference)
                   if se else None)
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False),
                                     nn.BatchNorm2d(out_channels, BN_EPS, BN_MOMENTUM))
        self.residual = stride == 1 and in_channels == out_channels

    @classmethod
    def from_parts(cls, expand: nn.Module | None, depthwise: nn.Module, se: nn.Module | None,
                   project: nn.Module, residual: bool) -> "MBConv":
        """A block from ready parts, without building (and randomly initialising) its own first."""
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.expand, block.depthwise, block.se, block.project = expand, depthwise, se, project
        block.residual = residual
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.depthwise(y)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y


class ElasticMBConv(nn.Module):
    """Inverted residual with elastic kernel and expand ratio; one line per op in forward."""

    def __init__(self, in_channels: int, out_channels: int, kernels: Sequence[int],
                 expands: Sequence[int], stride: int, act: str, se: bool, reference: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.act_name, self.use_se = act, se
        max_hidden = self.hidden(max(expands))
        self.expand_conv = ElasticPointwiseConv(in_channels, max_hidden)
        self.expand_bn = ElasticBatchNorm2d(max_hidden, BN_EPS, BN_MOMENTUM)
        self.dw_conv = ElasticDepthwiseConv(max_hidden, kernels, stride)
        self.dw_bn = ElasticBatchNorm2d(max_hidden, BN_EPS, BN_MOMENTUM)
        self.se = ElasticSqueezeExcite(max_hidden, reference) if se else None
        self.project_conv = ElasticPointwiseConv(max_hidden, out_channels)
        self.project_bn = ElasticBatchNorm2d(out_channels, BN_EPS, BN_MOMENTUM)
        self.act = activation(act)
        self.residual = stride == 1 and in_channels == out_channels

    def hidden(self, expand: int) -> int:
        return make_divisible(round(self.in_channels * expand), 8)

    def forward(self, x: torch.Tensor, kernel: int, expand: int) -> torch.Tensor:
        y = self.act(self.expand_bn(self.expand_conv(x, self.hidden(expand))))  # (B, hidden, H, W)
        y = self.act(self.dw_bn(self.dw_conv(y, kernel)))  # (B, hidden, H/s, W/s)
        if self.se is not None:
            y = self.se(y)
        y = self.project_bn(self.project_conv(y, self.out_channels))  # (B, out, H/s, W/s)
        return x + y if self.residual else y

    def extract(self, kernel: int, expand: int) -> MBConv:
        h = self.hidden(expand)
        # The expand conv stays even when hidden == in_channels (MBConv itself would drop it).
        return MBConv.from_parts(
            nn.Sequential(self.expand_conv.extract(self.in_channels, h), self.expand_bn.extract(h),
                          activation(self.act_name)),
            nn.Sequential(self.dw_conv.extract(h, kernel), self.dw_bn.extract(h), activation(self.act_name)),
            self.se.extract(h) if self.se is not None else None,
            nn.Sequential(self.project_conv.extract(h, self.out_channels),
                          self.project_bn.extract(self.out_channels)),
            self.residual)

    @torch.no_grad()
    def sort_channels_(self, bands: Sequence[int] = ()) -> None:
        """Re-order hidden channels by importance (L1 norm of their projection weights).

        ``bands`` are hidden-channel boundaries that a previous width phase already trained; channels
        stay inside their band (sorted within it), so smaller widths keep what they learned.
        """
        importance = self.project_conv.weight.abs().sum((0, 2, 3))  # (max_hidden,)
        band = torch.zeros_like(importance)
        for edge in sorted(bands):
            band[edge:] += 1
        # Sort by band first, then by descending importance (importance < 1e6 in any sane net).
        order = torch.argsort(band * 1e6 - importance, stable=True)
        self.project_conv.weight.copy_(self.project_conv.weight[:, order])
        self.dw_conv.weight.copy_(self.dw_conv.weight[order])
        self.dw_bn.permute_(order)
        self.expand_conv.weight.copy_(self.expand_conv.weight[order])
        self.expand_bn.permute_(order)
        if self.se is not None:
            se = self.se
            se.expand.weight.copy_(se.expand.weight[order])
            se.expand.bias.copy_(se.expand.bias[order])
            se.reduce.weight.copy_(se.reduce.weight[:, order])
            # The SE bottleneck is elastic too: sort its channels by their expand weights.
            mid_order = torch.argsort(se.expand.weight.abs().sum(0), descending=True, stable=True)
            se.expand.weight.copy_(se.expand.weight[:, mid_order])
            se.reduce.weight.copy_(se.reduce.weight[mid_order])
            se.reduce.bias.copy_(se.reduce.bias[mid_order])
