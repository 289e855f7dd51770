"""Exact MACs and parameter counts of subnets, from the config arithmetic alone.

The search checks a MACs or params budget for every candidate, tens of thousands of times, so the
counts must come from arithmetic, never from a forward pass; and the model card states them, so they
must equal what the extracted static net really computes (tests check this with forward hooks).

Counting rules (one image, batch 1):
- conv: ``out_elements * in_channels / groups * kh * kw`` MACs; weights as params (no conv bias);
- linear: ``in * out`` MACs; weight and bias as params (the feature mix of an imported official
  supernet has no bias, ``SearchSpace.feature_mix_bias``);
- batch norm: weight and bias as params, no MACs (it folds into the conv at export);
- activations, pooling, residual adds and SE gating are elementwise and not counted.

Spatial sizes: every conv pads ``k // 2`` with odd ``k``, so a stride-``s`` conv maps ``H`` to
``ceil(H / s)``. Because the first block of every unit is always active (depth >= 1), the feature-map
size at each unit depends on the resolution only, which is what makes the per-slot lookup table of
:class:`CostTable` exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .ops import ElasticSqueezeExcite
from .space import SearchSpace, SubnetConfig
from .subnet_batch import BatchLike, as_batch


@dataclass(frozen=True)
class LayerCost:
    """One layer's share: a readable breakdown for model cards and for debugging a mismatch."""

    name: str
    macs: int
    params: int


def _ceil_div(h, s):  # works on ints and integer arrays alike
    return -(-h // s)


def _check_odd_kernels(space: SearchSpace) -> None:
    if any(k % 2 == 0 for k in space.kernels):
        raise UserError(f"kernel sizes must be odd, got {list(space.kernels)}", field="kernels",
                        fix="use odd sizes such as 3, 5, 7")


def _conv(h_out, c_in: int, c_out: int, k: int, groups: int = 1):
    """MACs and params (weights + the BN after it) of a bias-free conv followed by BN."""
    return h_out * h_out * c_out * (c_in // groups) * k * k, c_out * (c_in // groups) * k * k + 2 * c_out


def _linear(c_in: int, c_out: int, bias: bool = True) -> tuple[int, int]:
    return c_in * c_out, c_in * c_out + (c_out if bias else 0)


def _mbconv(c_in: int, c_out: int, hidden: int, k: int, stride: int, h_in, se: bool,
            expand: bool) -> list[tuple[str, object, int]]:
    """(name, macs, params) of each layer of one inverted residual; ``h_in`` may be an array."""
    h_out = _ceil_div(h_in, stride)
    out = []
    if expand:
        out.append(("expand", *_conv(h_in, c_in, hidden, 1)))
    out.append(("depthwise", *_conv(h_out, hidden, hidden, k, groups=hidden)))
    if se:
        mid = ElasticSqueezeExcite.mid_channels(hidden)
        (m1, p1), (m2, p2) = _linear(hidden, mid), _linear(mid, hidden)
        out.append(("se", m1 + m2, p1 + p2))
    out.append(("project", *_conv(h_out, hidden, c_out, 1)))
    return out


def _fixed_layers(space: SearchSpace, r) -> list[tuple[str, object, int]]:
    """Stem, first block and head: the layers every subnet has, at resolution ``r`` (int or array)."""
    h = _ceil_div(r, space.stem_stride)
    layers = [("stem", *_conv(h, space.in_channels, space.stem_width, 3))]
    # The first block keeps hidden == in channels, so it has no expand conv (see MBConv).
    layers += [(f"first_block.{n}", m, p) for n, m, p in
               _mbconv(space.stem_width, space.first_block_width, space.stem_width, 3,
                       space.first_block_stride, h, False, expand=False)]
    h_final = head_input_size(space, r)
    layers.append(("head.expand", *_conv(h_final, space.units[-1].width, space.final_expand_width, 1)))
    layers.append(("head.feature_mix", *_linear(space.final_expand_width, space.feature_width,
                                                       space.feature_mix_bias)))
    layers.append(("head.classifier", *_linear(space.feature_width, space.num_classes)))
    return layers


def unit_input_sizes(space: SearchSpace, r):
    """Feature-map side entering each unit, for resolution ``r`` (int or (R,) array) -> list per unit."""
    h = _ceil_div(_ceil_div(r, space.stem_stride), space.first_block_stride)
    sizes = []
    for unit in space.units:
        sizes.append(h)
        h = _ceil_div(h, unit.stride)
    return sizes


def head_input_size(space: SearchSpace, r):
    """Feature-map side entering the head, for resolution ``r`` (int or (R,) array)."""
    return _ceil_div(unit_input_sizes(space, r)[-1], space.units[-1].stride)


def layer_costs(space: SearchSpace, cfg: SubnetConfig) -> list[LayerCost]:
    """Per-layer MACs and params of ``cfg``, in forward order (head last)."""
    _check_odd_kernels(space)
    cfg = space.validate_config(cfg)
    fixed = _fixed_layers(space, cfg.r)
    out = [LayerCost(n, int(m), int(p)) for n, m, p in fixed[:-3]]
    sizes = unit_input_sizes(space, cfg.r)
    for u, i, k, e in cfg.blocks(space):
        spec = space.units[u]
        c_in = space.block_in_channels(u, i)
        stride = spec.stride if i == 0 else 1
        h_in = sizes[u] if i == 0 else _ceil_div(sizes[u], spec.stride)
        for n, m, p in _mbconv(c_in, spec.width, space.hidden_channels(c_in, e), k, stride, h_in,
                               spec.se, expand=True):
            out.append(LayerCost(f"units.{u}.{i}.{n}", int(m), int(p)))
    out += [LayerCost(n, int(m), int(p)) for n, m, p in fixed[-3:]]
    return out


def subnet_macs(space: SearchSpace, cfg: SubnetConfig) -> int:
    """Multiply-accumulates of one forward pass of one image through the subnet ``cfg``."""
    return sum(c.macs for c in layer_costs(space, cfg))


def subnet_params(space: SearchSpace, cfg: SubnetConfig) -> int:
    """Parameters of the extracted static subnet (conv and linear weights, biases, BN affine)."""
    return sum(c.params for c in layer_costs(space, cfg))


@dataclass(frozen=True, eq=False)
class CostTable:
    """Per-slot MACs and params for every choice, so a batch of configs costs a few numpy gathers.

    Build it once per space (milliseconds) and reuse it in the search's inner loop.
    """

    space: SearchSpace
    fixed_macs: np.ndarray  # (R,) stem + first block + head, per resolution
    fixed_params: int
    block_macs: np.ndarray  # (S, R, K, E) one block at each slot, resolution, kernel, expand
    block_params: np.ndarray  # (S, K, E)

    @classmethod
    def build(cls, space: SearchSpace) -> "CostTable":
        _check_odd_kernels(space)
        res = np.asarray(sorted(space.resolutions), dtype=np.int64)  # (R,)
        kernels, expands = sorted(space.kernels), sorted(space.expands)
        fixed = _fixed_layers(space, res)
        fixed_macs = sum(np.broadcast_to(m, res.shape).astype(np.int64) for _, m, _ in fixed)
        fixed_params = sum(p for _, _, p in fixed)
        shape = (space.num_slots, len(res), len(kernels), len(expands))
        block_macs = np.zeros(shape, dtype=np.int64)
        block_params = np.zeros((space.num_slots, len(kernels), len(expands)), dtype=np.int64)
        sizes = unit_input_sizes(space, res)
        for u, spec in enumerate(space.units):
            for i in range(space.max_depth):
                slot = u * space.max_depth + i
                c_in = space.block_in_channels(u, i)
                stride = spec.stride if i == 0 else 1
                h_in = sizes[u] if i == 0 else _ceil_div(sizes[u], spec.stride)
                for ki, k in enumerate(kernels):
                    for ei, e in enumerate(expands):
                        layers = _mbconv(c_in, spec.width, space.hidden_channels(c_in, e), k, stride,
                                         h_in, spec.se, expand=True)
                        block_macs[slot, :, ki, ei] = sum(
                            np.broadcast_to(m, res.shape) for _, m, _ in layers)
                        block_params[slot, ki, ei] = sum(p for _, _, p in layers)
        return cls(space, np.asarray(fixed_macs, dtype=np.int64), int(fixed_params), block_macs,
                   block_params)

    def macs(self, cfgs: BatchLike) -> np.ndarray:
        """(N,) int64 MACs of each config."""
        r_idx, k_idx, e_idx, act = as_batch(cfgs).indices(self.space)
        slots = np.arange(self.space.num_slots)[None, :]  # (1, S)
        per_slot = self.block_macs[slots, r_idx[:, None], k_idx, e_idx]  # (N, S)
        return self.fixed_macs[r_idx] + np.where(act, per_slot, 0).sum(axis=1)

    def params(self, cfgs: BatchLike) -> np.ndarray:
        """(N,) int64 params of each config (resolution does not matter)."""
        _, k_idx, e_idx, act = as_batch(cfgs).indices(self.space)
        slots = np.arange(self.space.num_slots)[None, :]
        per_slot = self.block_params[slots, k_idx, e_idx]  # (N, S)
        return self.fixed_params + np.where(act, per_slot, 0).sum(axis=1)


def subnet_macs_batch(space: SearchSpace, cfgs: BatchLike) -> np.ndarray:
    """(N,) int64 MACs; builds a :class:`CostTable` each call, so keep one for repeated use."""
    return CostTable.build(space).macs(cfgs)


def subnet_params_batch(space: SearchSpace, cfgs: BatchLike) -> np.ndarray:
    """(N,) int64 params; builds a :class:`CostTable` each call, so keep one for repeated use."""
    return CostTable.build(space).params(cfgs)
