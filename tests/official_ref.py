"""MIT's reference OFA-MobileNetV3 supernet with random weights, in the published checkpoint layout.

Shared by the parity tests (test_official.py) and the specialize-only end-to-end test
(test_specialize_only.py). The reference is the `ofa` package (0.1.0.post202307202001, a test
dependency in pyproject.toml); its networks are built as its model zoo builds
`ofa_mbv3_d234_e346_k357_w1.0` and `w1.2`.
"""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import torch


def stub_reference_loaders() -> None:
    """`ofa.utils` star-imports its data loaders, which need torchvision and torch._six (gone in
    torch 2); the networks and tables never use them. Without that one module the package imports
    on torch 2."""
    sys.modules.setdefault("ofa.utils.my_dataloader", types.ModuleType("ofa.utils.my_dataloader"))


def reference_class():
    stub_reference_loaders()
    from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3

    return OFAMobileNetV3


def reference_net(width: float, seed: int = 0):
    """The model zoo's OFAMobileNetV3 with every weight and BN statistic random (seeded)."""
    net = reference_class()(dropout_rate=0, width_mult=width, ks_list=[3, 5, 7],
                            expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif ".bn." in name and name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("_matrix"):  # kernel transforms: identity plus noise
                t.copy_(torch.eye(t.shape[0]) + torch.randn(t.shape, generator=g) * 0.1)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(2.0 / t[0].numel()))
    return net.eval()


def published_file(net, path: str | Path) -> Path:
    """``net``'s weights saved as MIT publishes them: ``{"state_dict": ...}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict()}, path)
    return path
