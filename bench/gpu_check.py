"""The CUDA path checked and timed on one GPU (issue #24, items 4 and 6): the one script a session
with a lent GPU machine runs (`device`: 15 minutes of device time, one try and a rerun).

1. train: the smoke schedule's teacher and kernel phase through run_phase on the device (synthetic
   Fashion-MNIST-shaped data), the end-of-epoch evaluation included; its images/s;
2. step throughput: images/s of one supernet training step (forward, label-smoothed cross-entropy,
   backward, SGD) on the `imagenet-mbv3` space at 224 px, batch 64 per GPU (the reference's
   train_ofa_net.py batch), for the max subnet and a new random subnet every step, float32 as the
   trainer runs it;
3. predictor data: the same subnets measured by collect_accuracy on the device and on the CPU:
   their labels side by side, and seconds per subnet each;
4. export: export_subnet with the supernet on the device (BN recalibration and torch's test accuracy
   there; the ONNX graph, its parity and onnxruntime on the CPU): both accuracies of the card.

One GPU gives images/s per GPU, not scaling efficiency across GPUs (no lent machine has two).

    PYTHONPATH=. python3 bench/gpu_check.py --out $OUT/gpu_check.json  # on the device machine
    python bench/gpu_check.py --device cpu --quick --out /tmp/g.json     # here: the script itself

The device machine's image has its own torch (2.11 when last read, Python 3.12), onnx, onnxruntime,
safetensors and scipy, and no network: the project runs from the working tree (PYTHONPATH=.), not
installed; codecarbon is not there, so nothing is metered (the meter says `none`). Its numbers are
that torch's, not the CUDA image's 2.13.0: say so beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from progressive_shrinking import machine  # noqa: E402

from onceforall.supernet import checkpoint as ckpt  # noqa: E402
from onceforall.specialization.accuracy_data import collect_accuracy, read_rows  # noqa: E402
from onceforall.data import load_dataset  # noqa: E402
from onceforall.specialization.export import export_subnet, load_supernet  # noqa: E402
from onceforall.training.schedule import get_schedule  # noqa: E402
from onceforall.supernet.space import get_space  # noqa: E402
from onceforall.supernet.supernet import OFASupernet  # noqa: E402
from onceforall.specialization.targets import Target  # noqa: E402
from onceforall.training.train import run_phase  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def train(dev: torch.device, work: Path, quick: bool) -> dict:
    """The trainer's own path on the device: teacher, then the kernel phase (random subnets, KD)."""
    space = get_space("fashion-mnist")
    schedule = dataclasses.replace(get_schedule("smoke"), train_images=256 if quick else 4096)
    data = load_dataset("synthetic:600" if quick else "synthetic:6000", val_size=100)
    out = {}
    prev = None
    for phase in ("teacher", "kernel"):
        r = run_phase(space, schedule, phase, data, work / phase, init=prev, seed=0, device=str(dev),
                      teacher=work / "teacher" if phase != "teacher" else None, progress=False)
        out[phase] = {"images_per_s": r.images_per_s, "wall_s": r.wall_s, "val_accuracy": r.val_accuracy}
        prev = work / phase
    return out


def step_throughput(dev: torch.device, quick: bool) -> dict:
    space = get_space("imagenet-mbv3")
    res, batch, steps = (128, 8, 3) if quick else (224, 64, 12)
    net = OFASupernet(space).to(dev, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    x = torch.randn(batch, 3, res, res, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, space.num_classes, (batch,), device=dev)
    rng = np.random.default_rng(0)
    out = {"space": space.name, "resolution": res, "batch": batch, "dtype": "float32"}
    for name in ("max", "random"):
        times = []
        for step in range(steps + 2):  # two warm-up steps (cuDNN picks its algorithms)
            cfg = space.max_config() if name == "max" else space.sample(rng)
            cfg = dataclasses.replace(cfg, r=res)
            sync(dev)
            t = time.perf_counter()
            loss_fn(net(x, cfg), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            sync(dev)
            if step >= 2:
                times.append(time.perf_counter() - t)
        out[f"{name}_images_per_s"] = round(batch / statistics.median(times), 1)
    return out


def predictor_data(dev: torch.device, work: Path, quick: bool) -> dict:
    space = get_space("fashion-mnist")
    torch.manual_seed(0)
    net = OFASupernet(space)
    folder = work / "supernet"
    ckpt.save_checkpoint(folder, net.state_dict(), {"phase": "width-2", "space": space.to_dict()})
    data = load_dataset("synthetic:1200", val_size=500)
    n = 4 if quick else 16
    rows = {}
    for key, where in (("cpu", "cpu"), ("device", dev)):
        path = work / f"rows-{key}.jsonl"
        t = time.perf_counter()
        collect_accuracy(load_supernet(folder).to(where), data, path, n)
        rows[key] = (read_rows(path), (time.perf_counter() - t) / n)
    cpu, gpu = rows["cpu"][0], rows["device"][0]
    diffs = [abs(a["val_acc"] - b["val_acc"]) for a, b in zip(cpu, gpu)]
    return {"subnets": n, "val_images": 500, "s_per_subnet": {k: round(v[1], 3) for k, v in rows.items()},
            "val_acc_max_abs_diff": round(max(diffs), 3), "same_configs": [a["config"] for a in cpu]
            == [b["config"] for b in gpu], "supernet": str(folder)}


def export(dev: torch.device, work: Path) -> dict:
    folder = work / "supernet"
    net = load_supernet(folder).to(dev)
    data = load_dataset("synthetic:1200", val_size=500)
    target = Target.from_dict({"name": "gpu-check", "runtime": "onnxruntime", "threads": 1, "batch_size": 1,
                               "constraint": {"kind": "macs", "budget": 1e9}}, where="gpu_check")
    card = export_subnet(folder, net.space.max_config(), data, target, work / "export", net=net)
    return {"torch_device": card["accuracy"]["torch_device"], **{k: card["accuracy"][k] for k in (
        "test_top1_pct_torch", "test_top1_pct_onnxruntime")}, "parity": card["onnx"]["max_abs_diff_vs_torch"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes: the script itself, in seconds")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device(args.device)
    doc: dict = {"command": " ".join(["python bench/gpu_check.py", *sys.argv[1:]]), "machine": machine(),
                 "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "checks": {}}
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("train", lambda: train(dev, Path(tmp) / "train", args.quick)),
                         ("step_throughput", lambda: step_throughput(dev, args.quick)),
                         ("predictor_data", lambda: predictor_data(dev, Path(tmp), args.quick)),
                         ("export", lambda: export(dev, Path(tmp)))):
            t = time.perf_counter()
            try:
                doc["checks"][name] = {"ok": True, **fn()}
            except Exception as exc:  # noqa: BLE001 - every check reports, the next one still runs
                doc["checks"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            doc["checks"][name]["s"] = round(time.perf_counter() - t, 1)
            out.write_text(json.dumps(doc, indent=1))
            print(name, json.dumps(doc["checks"][name])[:300], flush=True)
    return 0 if all(c["ok"] for c in doc["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
