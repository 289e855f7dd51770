"""Throughput of the accuracy predictor's data collection on streamed ImageNet-layout data at 224 px.

Each measured subnet is BN-recalibrated on training images (the reference's training transform at
its resolution) and scored on validation images and their mirror images (the evaluation
transform), all JPEGs decoded on demand (onceforall.data.imagefolder), exactly as the
fit-accuracy-predictor stage does (accuracy_data.SubnetEvaluator). Here every subnet is at 224 px.
Three figures, so the bottleneck shows:

* ``decode_images_per_s``: JPEG reading + transform alone (the DataLoader, no model),
* ``images_per_s``: images through a subnet (calibration + validation views) per second, end to end,
* ``s_per_subnet``: wall time per measured subnet.

    OMP_NUM_THREADS=2 PYTHONPATH=. python bench/predictor_data_speed.py --data imagefolder:/data/imagenet \\
        [--supernet DIR] [--subnets 8] [--calib 2000] [--val 2000] [--workers N] [--out FILE]
    python bench/predictor_data_speed.py --make-jpegs 60 --subnets 2 --calib 20 --val 10   # smoke

Without --supernet, random weights of the imagenet-mbv3 space (speed does not depend on the weights).
--make-jpegs N writes N synthetic 500 x 375 JPEGs (ImageNet's typical size) per split into a
temporary folder and uses that (noise: larger files than photos, slower to decode, so a lower
bound). Publish a figure only from a machine that ran nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onceforall.specialization.accuracy_data import SubnetEvaluator, stratified_configs  # noqa: E402
from onceforall.data import subsample  # noqa: E402
from onceforall.specialization.export import load_supernet  # noqa: E402
from onceforall.data.imagefolder import open_image_folder, pixel_batches  # noqa: E402
from onceforall.supernet.space import get_space  # noqa: E402
from onceforall.supernet.supernet import OFASupernet  # noqa: E402

RESOLUTION = 224


def make_jpegs(root: Path, per_split: int, classes: int = 4) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(per_split):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)
    return root


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="imagefolder:PATH or imagefolder:s3://...")
    ap.add_argument("--make-jpegs", type=int, default=0, help="synthetic JPEGs per split instead of --data")
    ap.add_argument("--supernet", help="checkpoint folder (default: random imagenet-mbv3 weights)")
    ap.add_argument("--subnets", type=int, default=8)
    ap.add_argument("--calib", type=int, default=2000, help="BN calibration images per subnet")
    ap.add_argument("--val", type=int, default=2000, help="validation images per subnet (x2 views)")
    ap.add_argument("--workers", type=int, help="DataLoader processes (default: the stage's)")
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ofa-jpegs-") as tmp:
        spec = f"imagefolder:{make_jpegs(Path(tmp), args.make_jpegs)}" if args.make_jpegs else args.data
        if not spec:
            ap.error("give --data or --make-jpegs")
        result = measure(spec, args)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def measure(spec: str, args: argparse.Namespace) -> dict:
    data = open_image_folder(spec, val_size=args.val, seed=0, workers=args.workers)
    data = subsample(data, None, args.val)
    if args.supernet:
        net = load_supernet(args.supernet)
    else:
        torch.manual_seed(0)
        net = OFASupernet(get_space("imagenet-mbv3")).eval()
    configs = [dataclasses.replace(c, r=RESOLUTION)
               for c in stratified_configs(net.space, args.subnets, seed=0)]

    t0 = time.perf_counter()
    decoded = sum(len(x) for x, _ in pixel_batches(data, "val", RESOLUTION))
    decode_s = time.perf_counter() - t0

    evaluate = SubnetEvaluator(net, data, split="val", calib_images=args.calib, seed=0, mirror=True)
    t0 = time.perf_counter()
    for cfg in configs:
        evaluate.correct(cfg)
    wall = time.perf_counter() - t0
    calib = min(args.calib, len(data.train))
    per_subnet = calib + 2 * len(data.val)  # calibration forwards + both views of validation
    return {"resolution": RESOLUTION, "subnets": len(configs), "calib_images": calib,
            "val_images": len(data.val), "views": 2, "workers": data.workers,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "decode_images_per_s": round(decoded / decode_s, 2),
            "images_per_s": round(per_subnet * len(configs) / wall, 2),
            "s_per_subnet": round(wall / len(configs), 3),
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "data": spec, "supernet": args.supernet or "random imagenet-mbv3",
            "command": "python bench/predictor_data_speed.py " + " ".join(sys.argv[1:]),
            "code_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                          cwd=Path(__file__).resolve().parents[1]).stdout.strip()}


if __name__ == "__main__":
    main()
