"""Benchmark: what in the first shrinking phase (elastic kernel) costs the max subnet its accuracy.

The `standard` teacher reaches 92.35% test accuracy at 28 px; one epoch of the kernel phase takes
the max subnet to 91.20, and the later phases never win that back (final max 91.74). This runs the
kernel phase from the same teacher checkpoint with one thing changed at a time, and measures the
test accuracy of the max, min and three middle subnets after it (BN recalibrated):

- as scheduled: lr 0.03, one random subnet per step, 20/24/28 px;
- 28 px only: does opening the smaller resolutions cost the max?
- lr 0.01: does the learning-rate restart (the teacher's cosine ended at 0)?
- sandwich: the max (at 28 px) and min (at 20 px) subnet every step, besides a random one;
- sandwich, lr 0.01.

Resumable: each variant is a checkpoint folder under --work; a rerun only evaluates what is done.

    python bench/kernel_phase.py [--teacher bench/_work/standard/ps/teacher]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from progressive_shrinking import machine, test_accuracy, weights_sha256  # noqa: E402  (bench/)

from onceforall.data import calibration_images, load_dataset  # noqa: E402
from onceforall.training.schedule import get_schedule  # noqa: E402
from onceforall.supernet.space import get_space  # noqa: E402
from onceforall.training.train import run_phase  # noqa: E402

PHASE = "kernel"
VARIANTS = {  # name: changes to the schedule's kernel phase
    "as scheduled": {},
    "28 px only": {"n_resolutions": 1},
    "lr 0.01": {"lr": 0.01},
    "sandwich": {"subnets_per_step": 3, "sandwich": True},
    "sandwich, lr 0.01": {"subnets_per_step": 3, "sandwich": True, "lr": 0.01},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=str(ROOT / "bench/_work/standard/ps/teacher"))
    ap.add_argument("--work", default=str(ROOT / "bench/_work/kernel-phase"))
    ap.add_argument("--out", default=str(ROOT / "docs/results/kernel_phase.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    space, schedule = get_space("fashion-mnist"), get_schedule("standard")
    data = load_dataset("fashion-mnist", seed=args.seed)
    calib = calibration_images(data, schedule.bn_calib_images, args.seed)
    teacher = Path(args.teacher)
    phase = schedule.phase(PHASE)
    out = Path(args.out)
    res = {"command": "python bench/kernel_phase.py", "machine": machine(), "seed": args.seed,
           "teacher": str(teacher.relative_to(ROOT) if teacher.is_relative_to(ROOT) else teacher),
           "teacher_sha256": weights_sha256(teacher),
           "teacher_test_accuracy": test_accuracy(teacher, space, data, calib),
           "phase": dataclasses.asdict(phase), "variants": []}
    for name, change in VARIANTS.items():
        variant = dataclasses.replace(phase, **change)
        sched = dataclasses.replace(schedule, phases=tuple(variant if p.name == PHASE else p
                                                           for p in schedule.phases))
        folder = Path(args.work) / name.replace(" ", "-").replace(",", "")
        result = run_phase(space, sched, PHASE, data, folder, init=teacher, teacher=teacher,
                           seed=args.seed)
        t = time.monotonic()
        acc = test_accuracy(folder, space, data, calib)
        res["variants"].append({"name": name, "change": change, "wall_s": result.wall_s,
                                "test_accuracy": acc, "eval_s": round(time.monotonic() - t, 1)})
        out.write_text(json.dumps(res, indent=1))
        print(f"[bench] {name}: {result.wall_s:.0f}s test acc {acc}", flush=True)
    from render import render  # bench/render.py

    render()
    return 0


if __name__ == "__main__":
    sys.exit(main())
