"""Does the host probe see what slows a model? Card-statistic windows of a model and the probe.

For a 1-thread batch-1 and a 2-thread batch-16 subnet of the fashion-mnist space (onnxruntime), one
process times the model and the host probe (onceforall/specialization/ort_timing.py, host_probe)
together, window after window: each window is what a model card measures (time_many: the smallest of at
least 8
interleaved medians of 25 calls, spanning 2 s). Over --seconds of windows it reports how much the
model's window varies, how much the probe's does, how closely they move together, and how much
of the model's spread is left in the windows where the probe ran within 10% of its best window
(what the card's check against its reference keeps).

    python bench/host_probe.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from progressive_shrinking import machine  # noqa: E402

from onceforall.specialization.latency import onnx_bytes  # noqa: E402
from onceforall.specialization.ort_timing import (EXPECT_TOLERANCE, HOST_PROBE_SHAPE, host_probe, ort_session,  # noqa: E402
                                                  time_many)
from onceforall.supernet.space import get_space  # noqa: E402
from onceforall.supernet.supernet import OFASupernet  # noqa: E402

SETTINGS = (("1 thread, batch 1", 1, 1, (2, 7, 6)), ("2 threads, batch 16", 2, 16, (3, 5, 4)))


def windows(threads: int, batch: int, dek: tuple[int, int, int], seconds: float) -> np.ndarray:
    """(n, 2): each window's model and probe ms, the card's statistic."""
    space = get_space("fashion-mnist")
    torch.manual_seed(0)
    net = OFASupernet(space).eval()
    cfg = space.uniform_config(*dek, max(space.resolutions))
    shape = (batch, space.in_channels, cfg.r, cfg.r)
    model = ort_session(onnx_bytes(net.get_active_subnet(cfg).eval(), torch.zeros(shape)), threads)
    probe = ort_session(host_probe(), threads)
    rng = np.random.default_rng(0)
    x = {"input": rng.standard_normal(shape, dtype=np.float32)}
    p = {"input": rng.standard_normal(HOST_PROBE_SHAPE, dtype=np.float32)}
    fns = [lambda: model.run(None, x), lambda: probe.run(None, p)]
    time_many(fns, warmup=20, repeats=25, rounds=1, window_s=0.0)  # warm-up, as a card's
    rows = [time_many(fns, warmup=0, warmup_s=0.0, repeats=25, rounds=8, window_s=2.0)
            for _ in range(max(int(seconds / 2), 3))]
    return np.array(rows)


def summary(rows: np.ndarray) -> dict:
    model, probe = rows[:, 0], rows[:, 1]
    kept = probe <= probe.min() * (1 + EXPECT_TOLERANCE)

    def spread(a: np.ndarray) -> float:
        return round(float(100 * (a.max() / a.min() - 1)), 1)

    return {"windows": len(rows),
            "model_ms_range": [round(float(model.min()), 4), round(float(model.max()), 4)],
            "model_spread_pct": spread(model), "probe_spread_pct": spread(probe),
            "model_cv_pct": round(float(100 * model.std() / model.mean()), 1),
            "probe_cv_pct": round(float(100 * probe.std() / probe.mean()), 1),
            "correlation": round(float(np.corrcoef(model, probe)[0, 1]), 3),
            "windows_probe_within_tolerance": int(kept.sum()),
            "model_spread_in_those_pct": spread(model[kept])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="per setting")
    ap.add_argument("--out", default=str(ROOT / "docs/results/host_probe.json"))
    args = ap.parse_args()
    res = {"machine": machine(), "command": f"python bench/host_probe.py --seconds {args.seconds:g}",
           "tolerance_pct": 100 * EXPECT_TOLERANCE, "settings": {}}
    for name, threads, batch, dek in SETTINGS:
        rows = windows(threads, batch, dek, args.seconds)
        res["settings"][name] = {"subnet": "uniform d{} k{} e{}".format(*dek), **summary(rows),
                                 "model_ms": rows[:, 0].round(4).tolist(),
                                 "probe_ms": rows[:, 1].round(4).tolist()}
        print(f"[host-probe] {name}: {json.dumps(summary(rows))}", flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    from render import render  # bench/render.py

    render()
    return 0


if __name__ == "__main__":
    sys.exit(main())
