"""Streamed training data against the in-memory path (issue #24, item 1): images/s of one epoch.

Streamed: one epoch of training batches of an ImageFolder tree (or tar shards) at 224 px, as
train.run_phase reads them (stream.py: DataLoader workers read each JPEG, decode it, random-resized-
crop to the step's resolution, flip, colour jitter; the batch normalized in the training process).
In memory: one epoch of Fashion-MNIST's batches at 28 px (data.train_batch: crop-and-flip on uint8
tensors, normalized); and, to show where memory wins, the same small images written as PNGs and
streamed at 28 px (--small-images; decoded to RGB as any streamed image is). All without a model:
what the data path alone delivers, the ceiling it puts on training. Without --data, an
ImageNet-like tree is written first: --images JPEGs of 500 x 375 (about
ImageNet's mean size), quality 90, in --classes class folders, of smooth noise (JPEG sizes near
ImageNet's ~110 kB are not the point; decoding cost is mostly pixels).

    .venv/bin/python bench/stream_speed.py                      # writes docs/results/stream_speed.json
    .venv/bin/python bench/stream_speed.py --data imagefolder:/data/imagenet --images 0 --out x.json
    .venv/bin/python bench/stream_speed.py --images 60 --small-images 100 --out /tmp/s.json  # a check

Measure on a quiet machine: other processes on the same cores change both numbers.
"""

from __future__ import annotations

import argparse
import json
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


def write_tree(root: Path, images: int, classes: int, seed: int = 0) -> Path:
    """``train/<class>/*.JPEG`` and a small ``val/``: 500 x 375 JPEGs of smooth noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", images), ("val", max(classes, images // 50))):
        for i in range(n):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
            img.save(folder / f"img{i:07d}.JPEG", quality=90)
    return root


def streamed_epoch(spec: str, resolution: int, batch: int, workers: int) -> dict:
    from onceforall.data import load_dataset
    from onceforall.data.stream import StepShares, train_shares

    data = load_dataset(spec, val_size=0)
    steps = len(data.train) // batch
    sampler = StepShares(len(data.train), batch, 0, steps, 0, steps, lambda _g: resolution)
    t0, seen = time.perf_counter(), 0
    for x, y in train_shares(data, sampler, seed=0, workers=workers):
        seen += len(y)
    wall = time.perf_counter() - t0
    return {"data": spec, "resolution": resolution, "batch": batch, "workers": workers, "images": seen,
            "wall_s": round(wall, 2), "images_per_s": round(seen / wall, 1)}


def in_memory_epoch(spec: str, batch: int) -> dict:
    from onceforall.data import epoch_order, load_dataset, train_batch

    data = load_dataset(spec, val_size=5000)
    steps = len(data.train) // batch
    order = epoch_order(len(data.train), 0, 0)
    t0 = time.perf_counter()
    for step in range(steps):
        train_batch(data, order, step, batch, seed=0, epoch=0)
    wall = time.perf_counter() - t0
    return {"data": spec, "resolution": data.image_size, "batch": batch, "images": steps * batch,
            "wall_s": round(wall, 2), "images_per_s": round(steps * batch / wall, 1)}


def small_as_files(spec: str, root: Path, images: int) -> str:
    """The in-memory dataset's first ``images`` training images as PNGs (the same sizes), to stream
    them at their own resolution: where the in-memory path is the faster one."""
    from PIL import Image

    from onceforall.data import load_dataset

    data = load_dataset(spec, val_size=5000)
    for split, part in (("train", data.train), ("val", data.test)):
        n = images if split == "train" else min(len(part), max(10, images // 50))
        for i in range(n):
            folder = root / split / f"c{int(part.labels[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(part.images[i, 0].numpy()).save(folder / f"{i:06d}.png")
    return f"imagefolder:{root}"


def main() -> int:
    from onceforall.data.imagefolder import default_workers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="imagefolder:PATH or shards:PATH (default: write a tree)")
    ap.add_argument("--images", type=int, default=5000, help="training JPEGs of the written tree")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=default_workers(),
                    help="decoding processes (default: the cores less one, at most 8)")
    ap.add_argument("--memory-data", default="fashion-mnist", help="the in-memory dataset (28 px)")
    ap.add_argument("--small-images", type=int, default=5000,
                    help="also stream this many of the in-memory dataset's images at 28 px (0: skip)")
    ap.add_argument("--out", default=str(ROOT / "docs/results/stream_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # the training process's share; the workers decode
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.data or f"imagefolder:{write_tree(Path(tmp) / 'tree', args.images, args.classes)}"
        streamed = streamed_epoch(spec, args.resolution, args.batch, args.workers)
        small = (streamed_epoch(small_as_files(args.memory_data, Path(tmp) / "small", args.small_images),
                                28, args.batch, args.workers) if args.small_images else None)
    memory = in_memory_epoch(args.memory_data, args.batch)
    result = {"what": "One epoch of training batches, data path only (no model)",
              "streamed": streamed, "in_memory": memory, "small_streamed": small,
              "machine": machine(),
              "command": "bench/stream_speed.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
