"""Export a searched subnet: extract, recalibrate BN, measure, ONNX, verify, model card.

The exported graph takes what the dataset holds: images as float32 ``pixel / 255`` in NCHW at the
dataset's native size. Normalization and the resize to the subnet's resolution are inside the graph
(the resize as two matrix products that equal torch's antialiased bilinear resize exactly), so
anyone with onnxruntime and the dataset reproduces the card's accuracy without knowing our
preprocessing.

A streamed ImageNet-layout dataset (imagefolder.py) has no native size: its graph takes the image
after the reference's evaluation transform (shorter side resized to ceil(r / 0.875), center crop r,
done by the caller, as the card says) and normalizes it inside.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..supernet import checkpoint as ckpt
from ..supernet.bn import SEMANTICS, recalibrate_bn_batches
from .cpu_allotment import cpu_allotment
from ..data import Dataset, calibration_batches, device_of, head_rows, is_streamed, normalize, resize
from ..supernet.efficiency import subnet_macs, subnet_params
from ..errors import UserError
from ..supernet.evaluate import accuracy
from .latency import card_profiler, onnx_bytes
from .ort_timing import ort_session
from ..supernet.space import SearchSpace, SubnetConfig
from ..supernet.supernet import OFASupernet, StaticSubnet
from .targets import Target

CARD = "model_card.json"
MODEL = "model.onnx"
OPSET = 17


def resize_matrix(src: int, dst: int) -> torch.Tensor:
    """(dst, src) matrix A with ``A @ X @ A.T`` == torch's antialiased bilinear resize of X."""
    eye = torch.eye(src).view(src, 1, src, 1).expand(src, 1, src, src)  # basis images e_i along H
    cols = F.interpolate(eye.contiguous(), size=(dst, src), mode="bilinear", antialias=True,
                         align_corners=False)  # (src, 1, dst, src)
    return cols[:, 0, :, 0].T.contiguous()  # (dst, src)


class DeployModel(nn.Module):
    """``pixel / 255`` at native size -> normalize -> resize to r -> subnet -> logits (of the
    classifier's ``rows`` only, when given: the dataset's classes, data.head_rows)."""

    def __init__(self, subnet: StaticSubnet, mean: tuple[float, ...], std: tuple[float, ...],
                 native: int, resolution: int, rows: torch.Tensor | None = None):
        super().__init__()
        self.subnet = subnet
        self.rows = None if rows is None else nn.Buffer(rows)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.register_buffer("resize", resize_matrix(native, resolution))  # (r, native)
        self.identity = native == resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std  # (B, C, native, native)
        if not self.identity:
            x = self.resize @ x @ self.resize.T  # (B, C, r, r)
        logits = self.subnet(x)  # (B, num_classes)
        return logits if self.rows is None else logits.index_select(1, self.rows)  # (B, classes)


def test_pixels(data: Dataset, resolution: int, batch: int = 500, limit: int | None = None):
    """The test split as the exported graph takes it: ((B, C, H, W) uint8, labels) batches; native
    size for data held in memory, the evaluation transform at ``resolution`` for streamed data."""
    if is_streamed(data):
        from ..data.imagefolder import pixel_batches

        yield from pixel_batches(data, "test", resolution, min(batch, 200), limit)  # type: ignore
        return
    n = len(data.test) if limit is None else min(limit, len(data.test))
    for start in range(0, n, batch):
        end = min(start + batch, n)
        yield data.test.images[start:end], data.test.labels[start:end]


def _ort_accuracy(sess, data: Dataset, resolution: int) -> float:
    correct = total = 0
    for images, labels in test_pixels(data, resolution):
        x = images.float().numpy() / 255.0
        out = sess.run(None, {"input": x.astype(np.float32)})[0]
        correct += int((out.argmax(1) == labels.numpy()).sum())
        total += len(labels)
    return 100.0 * correct / max(total, 1)


def _input_spec(data: Dataset, resolution: int) -> dict[str, Any]:
    if is_streamed(data):
        from ..data.imagefolder import eval_size

        return {"values": "pixel / 255 in [0, 1] of the RGB image after the preprocessing below",
                "preprocessing": {"resize_shorter_side_to": eval_size(resolution),
                                  "resize_method": "bilinear (Pillow, antialiased)",
                                  "center_crop": resolution, "in_graph": False,
                                  "as": "the reference's (mit-han-lab/once-for-all) evaluation transform"},
                "normalization": {"mean": list(data.mean), "std": list(data.std), "in_graph": True}}
    return {"values": "pixel / 255 in [0, 1], the dataset's native size",
            "normalization": {"mean": list(data.mean), "std": list(data.std), "in_graph": True},
            "resize": {"to": resolution, "method": "bilinear, antialiased (torch semantics)",
                       "in_graph": True}}


def load_supernet(folder: str | Path, space: SearchSpace | None = None) -> OFASupernet:
    """The supernet of checkpoint ``folder``, with the BN recalibration semantics its sidecar records
    (``bn_recalibration``, written by `ofa import-official --bn`; "ours" when absent)."""
    c = ckpt.load_checkpoint(folder, space=space)
    semantics = c.meta.get("bn_recalibration", "ours")
    if semantics not in SEMANTICS:
        raise UserError(f"unknown BN recalibration {semantics!r}", source=str(Path(folder) / ckpt.SIDECAR),
                        field="bn_recalibration", fix=f"use one of {list(SEMANTICS)}, or import it again")
    net = OFASupernet(c.space, bn_semantics=semantics)
    ckpt.load_weights(net, c)
    return net.eval()


def export_subnet(supernet_dir: str | Path, cfg: SubnetConfig, data: Dataset, target: Target,
                  out_dir: str | Path, *, predicted_accuracy: float | None = None,
                  predicted_latency_ms: float | None = None, host_probe_reference_ms: float | None = None,
                  seed: int = 0, calib_images: int = 2000, extra: dict[str, Any] | None = None,
                  net: OFASupernet | None = None,
                  latency_source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model.onnx`` then ``model_card.json`` (last, so readers never see half a model).

    ``net``: the supernet of ``supernet_dir`` when the caller has loaded it already.
    ``latency_source``: where ``predicted_latency_ms`` comes from when the target's latency table was
    imported (LatencyTable.source, search.json's ``latency_source``): the card then says that the
    predicted latency is the published table's and that ``measured_ms`` is this host's, not the
    device's.
    ``host_probe_reference_ms``: the host probe's time when the target's latency table was
    measured (search.json's verification); while the host runs slower than that, the card's latency
    is measured for longer (latency.card_profiler). The card records the probe's time next to the
    model's, the reference onceforall.reproduce checks its host against.
    """
    t0 = time.monotonic()
    net = net or load_supernet(supernet_dir)
    space = net.space
    cfg = space.validate_config(cfg)
    # BN recalibration and torch's test accuracy on the supernet's device (a GPU where the pod has
    # one); the graph, its parity and its latency on the CPU, as it is deployed.
    subnet = net.get_active_subnet(cfg)
    torch_device = device_of(subnet)
    recalibrate_bn_batches(subnet, calibration_batches(data, calib_images, seed, cfg.r, device=torch_device),
                           semantics=net.bn_semantics)
    subnet.eval()
    torch_acc = accuracy(subnet, data, "test", cfg.r)
    subnet = subnet.cpu()

    native = cfg.r if is_streamed(data) else data.image_size
    rows = head_rows(data, space.num_classes)
    deploy = DeployModel(subnet, data.mean, data.std, native, cfg.r, rows).eval()
    example_pixels = next(iter(test_pixels(data, cfg.r, 8, 8)))[0]  # (8, C, native, native) uint8
    example = example_pixels.float() / 255.0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL
    tmp = out_dir / (MODEL + ".tmp")
    tmp.write_bytes(onnx_bytes(deploy, example, dynamic_batch=True, opset=OPSET))
    import onnx

    onnx.checker.check_model(onnx.load(str(tmp)))
    os.replace(tmp, model_path)

    # Latency, in a fresh process (card_profiler): inside the pipeline's export stage a 2-thread
    # card came out ~1.5x what the search and reproduce measured in 5 of 6 runs, whether taken
    # before or after the accuracy passes.
    shape = (space.in_channels, native, native)
    profiler = card_profiler(target.runtime, target.threads, target.batch_size, host_probe_reference_ms)
    probe_ms = None
    if target.runtime == "onnxruntime":  # the published file itself, as onceforall.reproduce times it
        ms, probe_ms = profiler.measure_onnx([model_path.read_bytes()], [shape])
        latency_ms = float(ms[0])
    else:
        latency_ms = profiler.measure(deploy, shape)

    # Parity: the graph computes what torch computes, on real images and on a batch of 3 (dynamic).
    sess = ort_session(model_path, target.threads)
    with torch.inference_mode():
        ref = deploy(example).numpy()
        # The same subnet the way training feeds it (antialiased resize in torch) agrees too.
        via_train_path = subnet(resize(normalize(example_pixels, data.mean, data.std), cfg.r))
        via_train_path = via_train_path if rows is None else via_train_path[:, rows]
    got = sess.run(None, {"input": example.numpy()})[0]
    parity = float(np.abs(got - ref).max())
    preprocessing_diff = float(np.abs(via_train_path.numpy() - ref).max())
    got3 = sess.run(None, {"input": example[:3].numpy()})[0]
    if parity > 1e-4 or got3.shape[0] != 3:
        raise RuntimeError(f"onnxruntime differs from torch by {parity:.2e} (> 1e-4)")
    ort_acc = _ort_accuracy(sess, data, cfg.r)

    card = {
        "format": "onceforall-model-card/1",
        "target": target.to_dict(),
        "subnet": cfg.to_dict(),
        "resolution": cfg.r,
        "space": space.name,
        "input": {
            "name": "input", "shape": ["batch", *shape], "dtype": "float32", "layout": "NCHW",
            **_input_spec(data, cfg.r),
        },
        "output": {"name": "output", "shape": ["batch", space.num_classes if rows is None else len(rows)],
                   "kind": "logits", "classes": list(data.classes),
                   **({"classifier_rows": rows.tolist()} if rows is not None else {})},
        "dataset": {"name": data.name, "split": "test", "images": len(data.test),
                    "source": data.source},
        "accuracy": {"test_top1_pct_onnxruntime": round(ort_acc, 3),
                     "test_top1_pct_torch": round(torch_acc, 3), "torch_device": torch_device.type,
                     "predicted_val_top1_pct": None if predicted_accuracy is None
                     else round(float(predicted_accuracy), 3)},
        "latency": {"measured_ms": round(latency_ms, 5),
                    "predicted_ms": None if predicted_latency_ms is None
                    else round(float(predicted_latency_ms), 5),
                    "runtime": target.runtime, "threads": target.threads,
                    "batch_size": target.batch_size, "statistic": profiler.statistic,
                    "protocol": profiler.protocol,
                    "host_probe_ms": None if probe_ms is None else round(probe_ms, 5),
                    "host_probe_reference_ms": host_probe_reference_ms,
                    "machine": f"{platform.machine()} {platform.processor()}".strip(),
                    # the cgroup's CPU quota it was measured under (a pod's CPU limit; None: no limit)
                    "cpu_allotment": cpu_allotment(),
                    "what": "the whole graph above, normalization and resize included"},
        **({"latency_table": {**latency_source, "what": (
            f"predicted_ms is the published {latency_source.get('device')} table's, not measured here; "
            "measured_ms is this host's, not that device's")}} if latency_source else {}),
        "macs": subnet_macs(space, cfg),
        "params": subnet_params(space, cfg),
        "onnx": {"file": MODEL, "sha256": ckpt.sha256(model_path), "opset": OPSET,
                 "max_abs_diff_vs_torch": parity,
                 "max_abs_diff_vs_training_preprocessing": preprocessing_diff},
        "bn_recalibration": {"images": min(calib_images, len(data.train)), "from": "training split",
                             "seed": seed, "semantics": net.bn_semantics,
                             **({"transform": "the reference's training transform at the subnet's "
                                 "resolution (random-resized-crop, flip, colour jitter)"}
                                if is_streamed(data) else {})},
        "supernet": str(supernet_dir),
        "export_s": round(time.monotonic() - t0, 2),
    }
    if extra:
        card.update(extra)
    tmp_card = out_dir / (CARD + ".tmp")
    tmp_card.write_text(json.dumps(card, indent=1))
    os.replace(tmp_card, out_dir / CARD)
    return card
