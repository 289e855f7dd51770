"""Benchmark: how far the noise in measured accuracies caps the predictor's Kendall tau.

A subnet's validation accuracy is a mean over 5,000 images, so it carries sampling noise, and a
predictor is judged against those noisy numbers. This measures, on the predictor's own held-out
subnets (bench/specialize.py's split), each image's correctness, and bootstraps the images: the tau
that even a perfect predictor would reach against 5,000-image labels, and how much averaging in the
mirror image of every validation image (a symmetry of the data: training flips too) lowers the noise.

    python bench/predictor_noise.py    # after bench/specialize.py; ~5 min on 2 cores
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from progressive_shrinking import weights_sha256  # noqa: E402

from onceforall.specialization.accuracy_data import SubnetEvaluator, load_accuracy_rows  # noqa: E402
from onceforall.data import load_dataset  # noqa: E402
from onceforall.specialization.export import load_supernet  # noqa: E402
from onceforall.specialization.predictor import AccuracyPredictor, split_indices  # noqa: E402

WORK = ROOT / "bench/_work/specialize"
OUT = ROOT / "docs/results/predictor_noise.json"


def main() -> int:
    spec = json.loads((ROOT / "docs/results/specialize.json").read_text())
    supernet = spec["supernet"]
    if weights_sha256(supernet) != spec["supernet_sha256"]:
        raise SystemExit(f"{supernet} is not the supernet docs/results/specialize.json measured")
    net = load_supernet(supernet)
    space = net.space
    # the order bench/specialize.py loads them in (balanced sets, then the graded one), so that
    # fit_predictor's held-out indices point at the same subnets
    rows = sorted(WORK.glob("accuracy*.jsonl"), key=lambda p: ("graded" in p.name, p.name))
    cfgs, y = load_accuracy_rows(rows, space)
    _, test = split_indices(len(y), 0.1, 5, np.random.default_rng(0))  # fit_predictor's, seed 0
    pred = AccuracyPredictor.load(WORK / "predictor.safetensors", space).predict([cfgs[i] for i in test])
    ev = SubnetEvaluator(net, load_dataset("fashion-mnist", seed=0), split="val", seed=0, mirror=True)
    t0 = time.monotonic()
    views = torch.stack([ev.correct(cfgs[i]) for i in test]).double().numpy()  # (subnets, 2, images)
    plain, mirror = views[:, 0], views[:, 1]
    acc, acc2 = 100 * plain.mean(1), 100 * (plain + mirror).mean(1) / 2
    if not np.allclose(acc2, y[test], atol=0.05):
        raise SystemExit("re-measured accuracies differ from the accuracy data: not the same run")
    rng = np.random.default_rng(0)
    ceiling, ceiling2 = [], []
    for _ in range(300):  # bootstrap the validation images
        idx = rng.integers(0, plain.shape[1], plain.shape[1])
        ceiling.append(kendalltau(acc, 100 * plain[:, idx].mean(1)).statistic)
        ceiling2.append(kendalltau(acc2, 100 * (plain[:, idx] + mirror[:, idx]).mean(1) / 2).statistic)
    out = {"command": "python bench/predictor_noise.py", "supernet_sha256": spec["supernet_sha256"],
           "n_subnets": len(test), "val_images": plain.shape[1], "wall_s": round(time.monotonic() - t0, 1),
           "accuracy_sd_pts": round(float(acc.std()), 3),
           "ceiling_tau": round(float(np.mean(ceiling)), 4),
           "ceiling_tau_with_mirror": round(float(np.mean(ceiling2)), 4),
           "labels": "mirror-averaged labels",
           "predictor_tau_vs_plain": round(float(kendalltau(pred, acc).statistic), 4),
           "predictor_tau_vs_mirror_averaged": round(float(kendalltau(pred, acc2).statistic), 4)}
    OUT.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    from render import render  # bench/render.py

    render()
    return 0


if __name__ == "__main__":
    sys.exit(main())
