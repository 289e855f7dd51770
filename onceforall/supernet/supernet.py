"""The elastic supernet (OFA-MobileNetV3 family) and the static subnets extracted from it."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from .ops import BN_EPS, BN_MOMENTUM, ElasticMBConv, MBConv, PointwiseLinear, activation, pooled
from .space import SearchSpace, SubnetConfig


def _stem(space: SearchSpace) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(space.in_channels, space.stem_width, 3, space.stem_stride, 1, bias=False),
        nn.BatchNorm2d(space.stem_width, BN_EPS, BN_MOMENTUM), activation("hswish"))


class Head(nn.Module):
    """1x1 expand, BN, h-swish -> global pool -> linear feature mix, h-swish -> dropout -> classifier.

    The feature mix has no bias where the space says so (MIT's published supernets have none), and
    the pool and feature mix compute as the reference does where it says ``reference_numerics``."""

    def __init__(self, space: SearchSpace):
        super().__init__()
        self.expand = nn.Sequential(
            nn.Conv2d(space.units[-1].width, space.final_expand_width, 1, bias=False),
            nn.BatchNorm2d(space.final_expand_width, BN_EPS, BN_MOMENTUM), activation("hswish"))
        self.reference = space.reference_numerics
        self.feature_mix = nn.Sequential(
            PointwiseLinear(space.final_expand_width, space.feature_width, bias=space.feature_mix_bias,
                            reference=self.reference),
            activation("hswish"))
        self.dropout = nn.Dropout(space.dropout)
        self.classifier = nn.Linear(space.feature_width, space.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pooled(self.expand(x), self.reference)  # (B, final_expand_width, 1, 1)
        x = self.feature_mix(x).flatten(1)  # (B, feature_width)
        return self.classifier(self.dropout(x))  # (B, classes)


class StaticSubnet(nn.Module):
    """A plain network for one subnet config: what export and deployment see."""

    def __init__(self, stem: nn.Module, first_block: nn.Module, blocks: Sequence[nn.Module],
                 head: nn.Module, config: SubnetConfig):
        super().__init__()
        self.stem, self.first_block, self.head = stem, first_block, head
        self.blocks = nn.Sequential(*blocks)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.first_block(self.stem(x))))


class OFASupernet(nn.Module):
    """Elastic depth (first D blocks of each unit), kernel and expand ratio; any input resolution.

    ``bn_semantics``: how its subnets' BN statistics are recalibrated (bn.recalibrate_bn): "ours",
    or "reference" for an imported official supernet imported so (its sidecar's
    ``bn_recalibration``, read by export.load_supernet). Every stage that recalibrates this
    supernet's subnets passes it on.
    """

    def __init__(self, space: SearchSpace, *, bn_semantics: str = "ours"):
        super().__init__()
        self.space = space
        self.bn_semantics = bn_semantics
        self.stem = _stem(space)
        self.first_block = MBConv(space.stem_width, space.first_block_width, space.stem_width, 3,
                                  space.first_block_stride, "relu", False)
        self.units = nn.ModuleList()
        for u, spec in enumerate(space.units):
            self.units.append(nn.ModuleList(
                ElasticMBConv(space.block_in_channels(u, i), spec.width, space.kernels,
                              space.expands, spec.stride if i == 0 else 1, spec.act, spec.se,
                              space.reference_numerics)
                for i in range(space.max_depth)))
        self.head = Head(space)
        self.active = space.max_config()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # The last BN of each residual block starts at zero: every block starts as identity.
        for unit in self.units:
            for block in unit:
                if block.residual:
                    nn.init.zeros_(block.project_bn.weight)

    def set_active_subnet(self, cfg: SubnetConfig) -> None:
        """Make ``cfg`` the config that ``forward(x)`` runs when it is given none."""
        self.active = self.space.validate_config(cfg)

    def forward(self, x: torch.Tensor, cfg: SubnetConfig | None = None) -> torch.Tensor:
        cfg = self.active if cfg is None else cfg
        x = self.first_block(self.stem(x))  # (B, first_block_width, H/stem_stride, W/stem_stride)
        md = self.space.max_depth
        for u, unit in enumerate(self.units):
            for i in range(cfg.d[u]):
                x = unit[i](x, cfg.k[u * md + i], cfg.e[u * md + i])
        return self.head(x)

    def get_active_subnet(self, cfg: SubnetConfig | None = None) -> StaticSubnet:
        """A static copy of the subnet ``cfg`` (default: the active one), with its own weights."""
        cfg = self.active if cfg is None else self.space.validate_config(cfg)
        blocks = [self.units[u][i].extract(k, e) for u, i, k, e in cfg.blocks(self.space)]
        net = StaticSubnet(copy.deepcopy(self.stem), copy.deepcopy(self.first_block), blocks,
                           copy.deepcopy(self.head), cfg)
        return net.train(self.training)

    def elastic_blocks(self) -> list[ElasticMBConv]:
        return [block for unit in self.units for block in unit]

    def sort_channels_(self, trained_expands: Sequence[int] = ()) -> None:
        """Re-sort every block's hidden channels by importance, keeping bands of trained widths."""
        for block in self.elastic_blocks():
            bands = [block.hidden(e) for e in trained_expands if block.hidden(e) < block.hidden(
                max(self.space.expands))]
            block.sort_channels_(bands)
