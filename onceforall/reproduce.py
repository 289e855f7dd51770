"""Reproduce a model card with onnxruntime and the dataset's own files only.

Deliberately independent of the rest of the library (no torch, no supernet; only ort_timing, which
needs numpy, onnxruntime and onnx alone; Pillow for image folders): it reads the card, the ONNX
file and the raw test images, and measures accuracy and latency the way the card says, with the
host probe timed in the same rounds. The test images are the dataset's IDX files (data held in
memory: Fashion-MNIST and the like) or, for a card made from an ImageNet-layout folder of JPEGs
(``imagefolder:``), the images under its ``val/<class>/`` (or ``test/``), preprocessed as the
card's ``input.preprocessing`` says (Pillow, one batch at a time) and labelled by their folder's
place in the card's classes.

A card records the probe's time when it was measured; when this host runs the probe slower
than that, a latency over the budget says as much about the host as about the model, and the
verdict says so (``host_slowdown``, ``latency_verdict``).

    python -m onceforall.reproduce models/edge-cpu-1t/model_card.json --data /usr/share/datasets/fashion-mnist
    python -m onceforall.reproduce models/phone/model_card.json --data /data/imagenet  # train/, val/
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from .specialization.ort_timing import (
    EXPECT_TOLERANCE, HOST_PROBE_SHAPE, WINDOW_S, host_probe, ort_session, time_many)


def _idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for p in (folder / stem, folder / f"{stem}.gz"):
        if p.exists():
            return p
    raise FileNotFoundError(f"{folder}: no {stem}[.gz]")


IDX_DEFAULT = "/usr/share/datasets/fashion-mnist"
IMAGEFOLDER = "imagefolder:"
SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")  # imagefolder.SUFFIXES
BATCH = 100


def _idx_batches(data_dir: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    images = _idx(_find(data_dir, "t10k-images-idx3-ubyte"))
    labels = _idx(_find(data_dir, "t10k-labels-idx1-ubyte")).astype(np.int64)
    for s in range(0, len(images), 500):  # (N, 1, H, W) in [0, 1]: what card["input"] specifies
        yield images[s:s + 500].astype(np.float32)[:, None] / 255.0, labels[s:s + 500]


def _folder_test_files(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(file, label) of the folder's test split in the order the card's data read them: ``val/``
    (else ``test/``), files sorted by path; the label is the class's place in the card's outputs."""
    split = root / "val" if (root / "val").is_dir() else root / "test"
    if not split.is_dir():
        raise FileNotFoundError(f"{root}: no val/ or test/ folder of <class>/ images")
    index = {c: i for i, c in enumerate(classes)}
    files = sorted((p.relative_to(root).as_posix(), p) for p in split.glob("*/*")
                   if p.is_file() and p.suffix.lower() in SUFFIXES)
    strangers = sorted({rel.split("/")[1] for rel, _ in files} - set(index))
    if strangers:
        raise ValueError(f"{split}: class folders {strangers[:3]} are not among the card's output classes")
    return [(p, index[rel.split("/")[1]]) for rel, p in files]


def _preprocess(path: Path, shorter: int, crop: int) -> np.ndarray:
    """The card's preprocessing: the shorter side to ``shorter`` (bilinear, Pillow), the centre
    ``crop`` x ``crop``, as (3, crop, crop) float32 in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        img = im.convert("RGB")
    w, h = img.size
    size = (shorter, int(shorter * h / w)) if w <= h else (int(shorter * w / h), shorter)
    img = img.resize(size, Image.BILINEAR)
    w, h = img.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    pixels = np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.float32)
    return pixels.transpose(2, 0, 1) / 255.0


def _folder_batches(card: dict, root: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    prep = card["input"]["preprocessing"]
    files = _folder_test_files(root, card["output"]["classes"])
    for s in range(0, len(files), BATCH):
        chunk = files[s:s + BATCH]
        x = [_preprocess(p, prep["resize_shorter_side_to"], prep["center_crop"]) for p, _ in chunk]
        yield np.stack(x), np.array([label for _, label in chunk], dtype=np.int64)


def card_test_batches(card: dict, data_dir: str | Path | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The card's test images as its model takes them, with their labels, in batches. ``data_dir``:
    the IDX files' folder, or the image folder (default: the card's own, where it is local)."""
    source = card["dataset"].get("source") or ""
    if not source.startswith(IMAGEFOLDER):
        return _idx_batches(Path(data_dir or IDX_DEFAULT))
    if data_dir is None:
        data_dir = source[len(IMAGEFOLDER):]
        if "://" in data_dir:
            raise FileNotFoundError(f"the card's data is {source}: copy it here (its val/ at least) "
                                    "and pass the folder as --data")
    return _folder_batches(card, Path(data_dir))


def reproduce(card_path: str | Path, data_dir: str | Path | None = None, *,
              repeats: int | None = None) -> dict:
    """Accuracy on the test set and latency, as the card says to measure them; ``repeats``
    overrides the calls per round of the card's timing protocol (tests keep it short).
    ``data_dir``: see card_test_batches."""
    card_path = Path(card_path)
    card = json.loads(card_path.read_text())
    model = card_path.parent / card["onnx"]["file"]
    sha = hashlib.sha256(model.read_bytes()).hexdigest()

    sess = ort_session(model, card["latency"]["threads"])
    correct = total = 0
    first = None
    for x, y in card_test_batches(card, data_dir):
        first = x if first is None else first
        correct += int((sess.run(None, {"input": x})[0].argmax(1) == y).sum())
        total += len(y)
    acc = 100.0 * correct / max(total, 1)

    # The card's own timing protocol (time_many's settings, see latency.card_profiler): warm-up,
    # the smallest of several interleaved medians over a window, the host probe in the same rounds,
    # and past the window, while the probe runs slower than it did for the card, more rounds (which
    # decides how long, never the value).
    lat = card["latency"]
    protocol = {**_card_protocol(lat), **({"repeats": repeats} if repeats else {})}
    # the first test images, repeated where a batch holds more (the values do not change the time)
    batch = {"input": np.resize(first, (lat["batch_size"], *first.shape[1:]))}
    fns = [lambda: sess.run(None, batch)]
    card_probe = lat.get("host_probe_ms")
    if card_probe is not None:
        probe = ort_session(host_probe(), lat["threads"])
        probe_feed = {"input": np.random.default_rng(0).standard_normal(HOST_PROBE_SHAPE, dtype=np.float32)}
        fns.append(lambda: probe.run(None, probe_feed))
    ms = time_many(fns, expect_ms=[None, card_probe] if card_probe is not None else None, **protocol)
    latency = float(ms[0])
    budget = card["target"]["constraint"]
    out = {"target": card["target"]["name"], "sha256_ok": sha == card["onnx"]["sha256"],
           "test_images": total, "card_test_images": card["dataset"]["images"],
           "test_acc": round(acc, 3), "card_test_acc": card["accuracy"]["test_top1_pct_onnxruntime"],
           "acc_diff": round(abs(acc - card["accuracy"]["test_top1_pct_onnxruntime"]), 3),
           "latency_ms": round(latency, 5), "card_latency_ms": card["latency"]["measured_ms"],
           "protocol": protocol}
    if card_probe is not None:
        out["host_probe_ms"] = round(float(ms[1]), 5)
        out["card_host_probe_ms"] = card_probe
        out["host_slowdown"] = round(float(ms[1]) / card_probe, 4)
    if budget["kind"] == "latency_ms":
        out["within_budget"] = latency <= budget["budget"]
        out["latency_verdict"] = _verdict(out, budget["budget"], protocol.get("tolerance", EXPECT_TOLERANCE))
    elif budget["kind"] == "macs":
        out["within_budget"] = card["macs"] <= budget["budget"]
    else:
        out["within_budget"] = card["params"] <= budget["budget"]
    return out


def _verdict(out: dict, budget: float, tolerance: float) -> str:
    """Within budget; over it; or over it on a host measurably slower than the card's."""
    if out["latency_ms"] <= budget:
        return "within budget"
    slowdown = out.get("host_slowdown")
    if slowdown is not None and slowdown > 1 + tolerance:
        return (f"inconclusive: over the {budget:g} ms budget, but this host ran the probe "
                f"{100 * (slowdown - 1):.0f}% slower than when the card was measured (scaled by that, "
                f"{out['latency_ms'] / slowdown:.4g} ms); measure again when it is idle")
    return f"over the {budget:g} ms budget"


def _card_protocol(lat: dict) -> dict:
    """The card's timing protocol; cards written before it was recorded name only their windows,
    and were measured with 20 warm-up calls and 8 rounds of 25."""
    if "protocol" in lat:
        return dict(lat["protocol"])
    return {"warmup": 20, "repeats": 25, "rounds": 8, "window_s": lat.get("window_s", WINDOW_S),
            "max_window_s": lat.get("max_window_s", 0.0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("card")
    ap.add_argument("--data", default=None,
                    help=f"the IDX files' folder (default {IDX_DEFAULT}), or the ImageNet-layout folder "
                         "of a card made from imagefolder: data (default: the card's, when local)")
    args = ap.parse_args(argv)
    print(json.dumps(reproduce(args.card, args.data), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
