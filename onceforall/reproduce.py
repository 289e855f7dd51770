"""Reproduce a model card with onnxruntime and the dataset's IDX files only.

Deliberately independent of the rest of the library (no torch, no supernet; only ort_timing, which
needs numpy, onnxruntime and onnx alone): it reads the card, the ONNX file and the raw test images,
and measures accuracy and latency the way the card says, with the host probe timed in the same
rounds. A card records the probe's time when it was measured; when this host runs the probe slower
than that, a latency over the budget says as much about the host as about the model, and the
verdict says so (``host_slowdown``, ``latency_verdict``).

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

from .ort_timing import EXPECT_TOLERANCE, HOST_PROBE_SHAPE, WINDOW_S, host_probe, ort_session, time_many


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
    # the smallest of several interleaved medians over a window, the host probe in the same rounds,
    # and past the window, while the probe runs slower than it did for the card, more rounds (which
    # decides how long, never the value).
    lat = card["latency"]
    protocol = {**_card_protocol(lat), **({"repeats": repeats} if repeats else {})}
    batch = {"input": x[:lat["batch_size"]]}
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
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args(argv)
    print(json.dumps(reproduce(args.card, args.data), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
