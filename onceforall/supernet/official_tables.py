"""Import the published accuracy predictor and latency lookup tables of MIT's OFA into ours.

- The accuracy predictor of the reference tutorial (``ofa/tutorial/accuracy_predictor.py``, the
  file ``acc_predictor.pth``, for the w1.2 supernet): an MLP 128 -> 400 -> 400 -> 400 -> 1 whose
  input is [60 kernel one-hots | 60 expand one-hots | 8 resolution one-hots for 112..224 step 16]
  (20 block slots, skipped slots all zeros) and whose output is a fraction. It becomes an
  :class:`onceforall.specialization.predictor.AccuracyPredictor` of one member with the same weights,
  its first layer's columns reordered to our encoding, predicting percent.
- The latency lookup tables (``ofa/tutorial/latency_table.py``,
  ``ofa/nas/efficiency_predictor/latency_lookup_table.py``): one YAML file per device and input
  resolution, mapping a layer's key, e.g.
  ``expanded_conv-input:112x112x24-output:56x56x32-expand:72-kernel:3-stride:2-idskip:0-se:0-hs:0``,
  ``Conv``, ``Conv_1``, ``AvgPool2D``, ``Conv_2`` and ``Logits``, to ``{mean: ms, ...}``. They
  become an :class:`onceforall.specialization.latency.LatencyTable` whose entries are the tables' means,
  summed as the reference sums them. They describe phones we cannot measure: the table records that its
  numbers are the published ones (``LatencyTable.source``), not measured here.

Both describe a subset of our resolutions (the predictor knows 112..224 in steps of 16; the tables
come for a few resolutions): import them for the supernet's space restricted to those
(``space.restrict(resolutions=...)``).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .checkpoint import sha256
from .efficiency import head_input_size, unit_input_sizes
from ..errors import UserError
from ..specialization.latency import LatencyTable
from ..specialization.predictor import AccuracyPredictor, PredictorMLP, encoding_size
from .space import SearchSpace

PREDICTOR_RESOLUTIONS = tuple(range(112, 225, 16))
_REF_KERNELS, _REF_EXPANDS, _REF_SLOTS = (3, 5, 7), (3, 4, 6), 20
_PREDICTOR_SHAPES = {"0.weight": (400, 128), "0.bias": (400,), "2.weight": (400, 400), "2.bias": (400,),
                     "4.weight": (400, 400), "4.bias": (400,), "6.weight": (1, 400), "6.bias": (1,)}


def _check_reference_choices(space: SearchSpace, what: str, resolutions: tuple[int, ...]) -> None:
    if (space.kernels, space.expands, space.num_slots) != (_REF_KERNELS, _REF_EXPANDS, _REF_SLOTS):
        raise UserError(f"{what} is for kernels {list(_REF_KERNELS)}, expand ratios {list(_REF_EXPANDS)} "
                        f"and {_REF_SLOTS} block slots; space {space.name!r} differs", field="space",
                        fix="use the space of an imported OFA-MobileNetV3 supernet")
    outside = [r for r in space.resolutions if r not in resolutions]
    if outside:
        inside = [r for r in space.resolutions if r in resolutions]
        raise UserError(f"{what} has no entry for resolutions {outside}", field="space.resolutions",
                        fix=f"import it for space.restrict(resolutions={inside})")


def reference_columns(space: SearchSpace) -> np.ndarray:
    """For each column of our encoding of ``space``, the tutorial predictor's input column."""
    cols = []
    for slot in range(space.num_slots):
        # The tutorial's one-hot maps come from list(set(keys)): ascending for these small ints.
        cols += [slot * 3 + _REF_KERNELS.index(k) for k in space.kernels]
        cols += [60 + slot * 3 + _REF_EXPANDS.index(e) for e in space.expands]
    cols += [120 + (r - 112) // 16 for r in space.resolutions]
    assert len(cols) == encoding_size(space)
    return np.asarray(cols)


def _load_torch_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"not a readable weights-only PyTorch file ({first})", source=str(path),
                        fix="download acc_predictor.pth again") from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise UserError("not a state dict", source=str(path), fix="give the tutorial's acc_predictor.pth")
    return raw


def import_accuracy_predictor(source: str | Path, space: SearchSpace, out: str | Path) -> tuple[Path, Path]:
    """The tutorial's ``acc_predictor.pth`` as our predictor for ``space``; writes ``out``
    (.safetensors and .json) and returns both paths. It predicts percent (the file: a fraction).
    MIT fitted it on the w1.2 supernet: for another width its numbers are w1.2's."""
    source = Path(source)
    _check_reference_choices(space, "the tutorial's accuracy predictor", PREDICTOR_RESOLUTIONS)
    state = _load_torch_tensors(source)
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    if shapes != _PREDICTOR_SHAPES:
        raise UserError(f"not the tutorial's 128-400-400-400-1 predictor (tensors {shapes})",
                        source=str(source),
                        fix="give ofa's acc_predictor.pth (tutorial/accuracy_predictor.py)")
    w = {k: v.detach().to(torch.float32) for k, v in state.items()}
    model = PredictorMLP(encoding_size(space), (400, 400, 400), members=1)
    cols = torch.from_numpy(reference_columns(space))
    with torch.no_grad():
        model.weights[0].copy_(w["0.weight"][:, cols].T[:, None, :])  # (F, 1, 400)
        model.weights[1].copy_(w["2.weight"].T[None])
        model.weights[2].copy_(w["4.weight"].T[None])
        model.weights[3].copy_(w["6.weight"].T[None])  # (1, 400, 1)
        for i, name in enumerate(("0.bias", "2.bias", "4.bias")):
            model.biases[i].copy_(w[name][None])
        # ours: base_acc + acc_scale * (h @ w); the tutorial's: 100 * (h @ w + b) in percent
        model.acc_scale.fill_(100.0)
        model.base_acc.copy_(100.0 * w["6.bias"])
    metrics = {"imported": {"from": "mit-han-lab/once-for-all tutorial accuracy predictor",
                            "fitted_on": "ofa_mbv3_d234_e346_k357_w1.2 (ImageNet), by MIT",
                            "file": source.name, "sha256": sha256(source),
                            "note": "published weights, not fitted or evaluated here"}}
    return AccuracyPredictor(space, model.eval(), (400, 400, 400), metrics).save(out)


# -- latency tables -----------------------------------------------------------------------------

def _shape(dims) -> str:
    return "x".join(str(d) for d in dims)


def _key(kind: str, inp, out, *, mid=None, k=None, stride=None, idskip=None, se=None, hs=None) -> str:
    parts = [kind, f"input:{_shape(inp)}", f"output:{_shape(out)}"]
    if kind == "expanded_conv":
        parts += [f"expand:{mid}", f"kernel:{k}", f"stride:{stride}", f"idskip:{int(idskip)}",
                  f"se:{int(se)}", f"hs:{int(hs)}"]
    return "-".join(parts)


def fixed_keys(space: SearchSpace, r: int) -> list[str]:
    """The table keys of the layers every subnet has at resolution ``r``: stem, first block, head."""
    h = -(-r // space.stem_stride)
    h_first = -(-h // space.first_block_stride)
    fs, c_last = head_input_size(space, r), space.units[-1].width
    return [
        _key("Conv", (r, r, space.in_channels), (h, h, space.stem_width)),
        _key("expanded_conv", (h, h, space.stem_width), (h_first, h_first, space.first_block_width),
             mid=space.stem_width, k=3, stride=space.first_block_stride,
             idskip=space.first_block_stride == 1 and space.stem_width == space.first_block_width,
             se=False, hs=False),
        _key("Conv_1", (fs, fs, c_last), (fs, fs, space.final_expand_width)),
        _key("AvgPool2D", (fs, fs, space.final_expand_width), (1, 1, space.final_expand_width)),
        _key("Conv_2", (1, 1, space.final_expand_width), (1, 1, space.feature_width)),
        _key("Logits", (1, 1, space.feature_width), (space.num_classes,)),
    ]


def block_key(space: SearchSpace, r: int, unit: int, index: int, kernel: int, expand: int) -> str:
    """The table key of block ``index`` of ``unit`` with ``kernel`` and ``expand`` at resolution ``r``."""
    spec = space.units[unit]
    h_in = unit_input_sizes(space, r)[unit]
    stride = spec.stride if index == 0 else 1
    if index > 0:
        h_in = -(-h_in // spec.stride)
    h_out = -(-h_in // stride)
    c_in = space.block_in_channels(unit, index)
    return _key("expanded_conv", (h_in, h_in, c_in), (h_out, h_out, spec.width),
                mid=space.hidden_channels(c_in, expand), k=kernel, stride=stride,
                idskip=stride == 1 and c_in == spec.width, se=spec.se, hs=spec.act == "hswish")


def _read_table(path: Path) -> dict:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read the latency table ({str(exc).splitlines()[0]})", source=str(path),
                        fix="give the published <resolution>_lookup_table.yaml") from None
    if not isinstance(raw, dict):
        raise UserError("not a latency lookup table (a mapping of layer keys)", source=str(path),
                        fix="give the published <resolution>_lookup_table.yaml")
    return raw


def _mean(table: dict, key: str, path: Path) -> float:
    entry = table.get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("mean"), (int, float)):
        raise UserError(f"has no mean for {key}", source=str(path),
                        fix="use the table measured for this supernet's widths (w1.0 and w1.2 have "
                            "their own tables) and this resolution")
    return float(entry["mean"])


def import_latency_tables(tables: Mapping[int, str | Path], space: SearchSpace, out: str | Path, *,
                          device: str) -> Path:
    """The published YAML lookup tables ``{resolution: path}`` of one device as our latency table for
    ``space`` (every resolution of it needs its table); writes ``out`` (JSON) and returns it."""
    _check_reference_choices(space, f"the {device} latency tables", tuple(sorted(tables)))
    res, ks, es = space.resolutions, space.kernels, space.expands
    fixed = np.zeros(len(res))
    block = np.zeros((space.num_slots, len(res), len(ks), len(es)))
    files = {}
    for ri, r in enumerate(res):
        path = Path(tables[r])
        table = _read_table(path)
        files[str(r)] = {"file": path.name, "sha256": sha256(path)}
        fixed[ri] = sum(_mean(table, key, path) for key in fixed_keys(space, r))
        for u in range(len(space.units)):
            for i in range(space.max_depth):
                for ki, k in enumerate(ks):
                    for ei, e in enumerate(es):
                        block[u * space.max_depth + i, ri, ki, ei] = _mean(
                            table, block_key(space, r, u, i, k, e), path)
    source = {"kind": "imported", "format": "mit-han-lab/once-for-all latency lookup table",
              "device": device, "files": files,
              "note": "latency is the published table's (measured by MIT on the device), not measured here"}
    result = LatencyTable(space, "published-table", 0, 1, 0.0, fixed, block, device=device, source=source)
    return result.save(out)
