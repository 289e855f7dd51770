"""Import MIT's published Once-for-All MobileNetV3 supernets into our checkpoint format.

The published files (``ofa_mbv3_d234_e346_k357_w1.0`` and ``w1.2`` of mit-han-lab/once-for-all)
are ``torch.save``-d state dicts of the reference ``OFAMobileNetV3``. Every one of their tensors
maps onto one of ours (see ``_RULES``); the search space comes from the tensor shapes, the rest of
it (strides, activations, choices) is the paper's, our ``imagenet-mbv3`` preset. The weights are
copied as they are: the published channels are already sorted by importance, so nothing is
re-sorted, and the imported supernet computes the reference's logits bit for bit
(tests/test_official.py).

Loading uses ``torch.load(weights_only=True)``: no code from the file runs.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch

from . import checkpoint as ckpt
from ..infra import store
from ..errors import UserError
from .space import SearchSpace, UnitSpec, imagenet_mbv3_space, ofa_mbv3_space

PHASE = "imported"
BN_SEMANTICS = ("ours", "reference")
# The reference's ImageNet normalization (ofa/imagenet_classification/data_providers/imagenet.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_FIX = ("give a published OFAMobileNetV3 supernet, e.g. ofa_mbv3_d234_e346_k357_w1.2 from "
        "mit-han-lab/once-for-all")

# (official name pattern, our name template); blocks.N with N >= 1 is unit (N-1)//4, block (N-1)%4,
# filled in by _our_name. Dynamic layers nest one level deeper (conv.conv, bn.bn) than static ones.
_RULES: list[tuple[str, str]] = [
    (r"first_conv\.conv\.weight", "stem.0.weight"),
    (rf"first_conv\.bn\.{_BN}", r"stem.1.\1"),
    (r"blocks\.0\.conv\.depth_conv\.conv\.weight", "first_block.depthwise.0.weight"),
    (rf"blocks\.0\.conv\.depth_conv\.bn\.{_BN}", r"first_block.depthwise.1.\1"),
    (r"blocks\.0\.conv\.point_linear\.conv\.weight", "first_block.project.0.weight"),
    (rf"blocks\.0\.conv\.point_linear\.bn\.{_BN}", r"first_block.project.1.\1"),
    (r"blocks\.(\d+)\.conv\.inverted_bottleneck\.conv\.conv\.weight", "{block}.expand_conv.weight"),
    (rf"blocks\.(\d+)\.conv\.inverted_bottleneck\.bn\.bn\.{_BN}", r"{block}.expand_bn.\2"),
    (r"blocks\.(\d+)\.conv\.depth_conv\.conv\.conv\.weight", "{block}.dw_conv.weight"),
    (r"blocks\.(\d+)\.conv\.depth_conv\.conv\.(\d)to(\d)_matrix", r"{block}.dw_conv.transforms.\2to\3"),
    (rf"blocks\.(\d+)\.conv\.depth_conv\.bn\.bn\.{_BN}", r"{block}.dw_bn.\2"),
    (r"blocks\.(\d+)\.conv\.depth_conv\.se\.fc\.(reduce|expand)\.(weight|bias)", r"{block}.se.\2.\3"),
    (r"blocks\.(\d+)\.conv\.point_linear\.conv\.conv\.weight", "{block}.project_conv.weight"),
    (rf"blocks\.(\d+)\.conv\.point_linear\.bn\.bn\.{_BN}", r"{block}.project_bn.\2"),
    (r"final_expand_layer\.conv\.weight", "head.expand.0.weight"),
    (rf"final_expand_layer\.bn\.{_BN}", r"head.expand.1.\1"),
    (r"feature_mix_layer\.conv\.weight", "head.feature_mix.0.weight"),
    (r"classifier\.linear\.(weight|bias)", r"head.classifier.\1"),
]
_COMPILED = [(re.compile(p), t) for p, t in _RULES]
# 1x1 convolutions of the reference that are linear layers (out, in) in ours.
_SQUEEZE = re.compile(r"(\.se\.(reduce|expand)|head\.feature_mix\.0)\.weight$")
_REQUIRED = ("first_conv.conv.weight", "blocks.0.conv.depth_conv.conv.weight",
             "final_expand_layer.conv.weight", "feature_mix_layer.conv.weight",
             "classifier.linear.weight")


def import_official(source: str | Path, out: str | Path, *, bn: str = "ours") -> Path:
    """Import a published OFA-MobileNetV3 supernet (a local file or an s3:// URI) into ``out``.

    ``bn``: the BN recalibration the imported model is meant for, recorded in the sidecar
    (``bn_recalibration``): "ours" (unbiased variance, inactive channels reset) or "reference"
    (the reference's ``set_running_statistics``: biased variance, only active channels written;
    ``onceforall.supernet.bn.recalibrate_bn(..., semantics="reference")``). Returns the checkpoint folder.
    """
    if bn not in BN_SEMANTICS:
        raise UserError(f"unknown BN recalibration {bn!r}", field="bn",
                        fix=f"use one of {list(BN_SEMANTICS)}")
    with tempfile.TemporaryDirectory(prefix="ofa-import-") as tmp:
        path = store.download(source, tmp) if store.is_s3(source) else Path(source)
        if not path.is_file():
            raise UserError("no such file", source=str(source),
                            fix="give the path or s3:// URI of the downloaded .pth file")
        digest = ckpt.sha256(path)
        official = read_state_dict(path)
    weights = convert_state_dict(official, str(source))
    space = space_from_weights(weights, str(source))
    check_fits(space, weights, str(source))
    meta = {"phase": PHASE, "completed": True, "space": space.to_dict(), "bn_recalibration": bn,
            "source": {"uri": str(source), "name": Path(str(source)).name, "sha256": digest,
                       "format": "mit-han-lab/once-for-all OFAMobileNetV3 state dict"},
            "preprocessing": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
    return ckpt.save_checkpoint(out, weights, meta)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors by name: ``{"state_dict": ...}`` or a bare state dict, ``module.`` removed."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
            zipfile.BadZipFile) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        if "Weights only load failed" in str(exc):
            raise UserError("holds Python objects, not only tensors, which safe (weights-only) "
                            "loading refuses", source=str(path), fix=_FIX) from None
        raise UserError(f"not a readable PyTorch file, truncated or damaged ({first})",
                        source=str(path),
                        fix="download it again and compare its sha256 with the published file's") from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()):
        raise UserError("not a state dict (a mapping of names to tensors)", source=str(path), fix=_FIX)
    out = {}
    for key, value in raw.items():
        key = key.removeprefix("module.")  # saved from DataParallel
        out[key.replace(".mobile_inverted_conv.", ".conv.")] = value  # the older checkpoints' name
    return out


def _our_name(key: str, max_depth: int) -> str | None:
    for pattern, template in _COMPILED:
        m = pattern.fullmatch(key)
        if m is None:
            continue
        if "{block}" in template:
            n = int(m.group(1))
            if n == 0:
                return None
            template = template.replace("{block}", f"units.{(n - 1) // max_depth}.{(n - 1) % max_depth}")
        return m.expand(template)
    return None


def convert_state_dict(official: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Our names and shapes for every official tensor; anything that does not map is an error."""
    missing = [k for k in _REQUIRED if k not in official]
    if missing:
        sample = ", ".join(sorted(official)[:3])
        raise UserError(f"not an OFA MobileNetV3 supernet: no tensor {missing[0]!r} (it holds {sample}, ...)",
                        source=source, fix=_FIX)
    max_depth = max(imagenet_mbv3_space().depths)
    out: dict[str, torch.Tensor] = {}
    for key, value in official.items():
        ours = _our_name(key, max_depth)
        if ours is None:
            raise UserError(f"not an OFA MobileNetV3 supernet: tensor {key!r} has no place in it",
                            source=source, fix=_FIX)
        if _SQUEEZE.search(ours):
            if value.dim() != 4 or value.shape[2:] != (1, 1):
                raise UserError(f"tensor {key!r} has shape {tuple(value.shape)}, not (out, in, 1, 1)",
                                source=source, fix=_FIX)
            value = value[:, :, 0, 0]
        out[ours] = value.contiguous()
    return out


def _width(weights: dict[str, torch.Tensor], name: str, source: str) -> int:
    if name not in weights:
        raise UserError(f"not an OFA MobileNetV3 supernet of the paper's layout: no {name!r} "
                        "(5 units of 4 blocks)", source=source, fix=_FIX)
    return int(weights[name].shape[0])


def space_from_weights(weights: dict[str, torch.Tensor], source: str) -> SearchSpace:
    """The paper's space (``imagenet-mbv3``) with the widths these weights have."""
    paper = imagenet_mbv3_space()
    md = paper.max_depth
    units = []
    for u, spec in enumerate(paper.units):
        widths = {_width(weights, f"units.{u}.{i}.project_conv.weight", source) for i in range(md)}
        if len(widths) != 1:
            raise UserError(f"unit {u} has blocks of different widths {sorted(widths)}", source=source,
                            field=f"units[{u}]", fix="an OFA supernet's blocks of one unit share a width")
        has_se = f"units.{u}.0.se.reduce.weight" in weights
        if has_se != spec.se:
            raise UserError(f"unit {u} {'has' if has_se else 'lacks'} squeeze-excite, the paper's "
                            "MobileNetV3 space does not", source=source, fix=_FIX)
        units.append(UnitSpec(widths.pop(), spec.stride, spec.act, spec.se))
    found = {int(k.split(".")[1]) for k in weights if k.startswith("units.")}
    if len(found) != len(units):
        raise UserError(f"has {len(found)} units of 4 blocks, the paper's space has {len(units)}",
                        source=source, fix=_FIX)
    stem = weights["stem.0.weight"]
    space = dataclasses.replace(
        paper, in_channels=int(stem.shape[1]), stem_width=int(stem.shape[0]),
        first_block_width=_width(weights, "first_block.project.0.weight", source), units=tuple(units),
        final_expand_width=_width(weights, "head.expand.0.weight", source),
        feature_width=_width(weights, "head.feature_mix.0.weight", source),
        num_classes=_width(weights, "head.classifier.weight", source),
        feature_mix_bias="head.feature_mix.0.bias" in weights, reference_numerics=True)
    return dataclasses.replace(space, name=f"ofa-mbv3-{_width_tag(space)}")


def _width_tag(space: SearchSpace) -> str:
    """``w1.2`` where one width multiplier (the reference's rule) gives every width, else ``custom``."""
    for tenths in range(5, 31):
        scaled = ofa_mbv3_space(tenths / 10)
        if dataclasses.replace(space, name=scaled.name) == scaled:
            return f"w{tenths / 10}"
    return "custom"


def check_fits(space: SearchSpace, weights: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor has the shape our supernet of ``space`` has (expand ratios, kernels, SE widths)."""
    from .supernet import OFASupernet

    with torch.device("meta"):
        expected = OFASupernet(space).state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise UserError(f"not a complete OFA MobileNetV3 supernet: no tensor for {missing[0]!r} "
                        f"({len(missing)} missing)", source=source, fix=_FIX)
    for name, tensor in expected.items():
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise UserError(
                f"width does not fit the space: {name} is {tuple(weights[name].shape)}, the paper's "
                f"space (kernels {list(space.kernels)}, expand ratios {list(space.expands)}) with these "
                f"unit widths needs {tuple(tensor.shape)}", source=source,
                fix="import an OFA MobileNetV3 supernet with kernels 3/5/7 and expand ratios 3/4/6 "
                    "(ofa_mbv3_d234_e346_k357_w*)")

