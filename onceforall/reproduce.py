"""Reproduce a model card with onnxruntime and the dataset's IDX files only.

Deliberately independent of the rest of the library (no torch, no supernet; only ort_timing, which
needs numpy and onnxruntime alone): it reads the card, the ONNX file and the raw test images, and
measures accuracy and latency the way the card says.

    python -m onceforall.reproduce models/edge-cpu-1t/model_card.json --data /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import struct
import sys
from pathlib import Path

import numpy as np

from .ort_timing import WINDOW_S, ort_session, time_many


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


def reproduce(card_path: str | Path, data_dir: str | Path, *, repeats: int | None = None) -> dict:
    """Accuracy on the test set and latency, as the card says to measure them; ``repeats``
    overrides the calls per round of the card's timing protocol (tests keep it short)."""
    card_path = Path(card_path)
    card = json.loads(card_path.read_text())
    model = card_path.parent / card["onnx"]["file"]
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    data_dir = Path(data_dir)
    images = _idx(_find(data_dir, "t10k-images-idx3-ubyte"))
    labels = _idx(_find(data_dir, "t10k-labels-idx1-ubyte")).astype(np.int64)
    x = images.astype(np.float32)[:, None] / 255.0  # (N, 1, H, W): what card["input"] specifies

    sess = ort_session(model, card["latency"]["threads"])
    correct = 0
    for s in range(0, len(x), 500):
        correct += int((sess.run(None, {"input": x[s:s + 500]})[0].argmax(1) == labels[s:s + 500]).sum())
    acc = 100.0 * correct / len(x)

    # The card's own timing protocol (time_many's settings, see latency.card_profiler): warm-up,
    # the smallest of several interleaved medians over a window, and past it, on a host with slow
    # stretches, more rounds while over the card's value (which decides how long, never the value).
    lat = card["latency"]
    protocol = {**_card_protocol(lat), **({"repeats": repeats} if repeats else {})}
    batch = {"input": x[:lat["batch_size"]]}
    latency = float(time_many([lambda: sess.run(None, batch)], expect_ms=[lat["measured_ms"]],
                              **protocol)[0])
    budget = card["target"]["constraint"]
    out = {"target": card["target"]["name"], "sha256_ok": sha == card["onnx"]["sha256"],
           "test_acc": round(acc, 3), "card_test_acc": card["accuracy"]["test_top1_pct_onnxruntime"],
           "acc_diff": round(abs(acc - card["accuracy"]["test_top1_pct_onnxruntime"]), 3),
           "latency_ms": round(latency, 5), "card_latency_ms": card["latency"]["measured_ms"],
           "protocol": protocol}
    if budget["kind"] == "latency_ms":
        out["within_budget"] = latency <= budget["budget"]
    elif budget["kind"] == "macs":
        out["within_budget"] = card["macs"] <= budget["budget"]
    else:
        out["within_budget"] = card["params"] <= budget["budget"]
    return out


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
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args(argv)
    print(json.dumps(reproduce(args.card, args.data), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
