"""Golden numbers: a tiny seeded run whose losses and accuracies are committed.

A change that alters training numerics (sampling, augmentation, LR schedule, distillation, BN) shows
here. Regenerate deliberately with `python tests/test_golden.py` and say why in the commit.
"""

import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden" / "smoke_synthetic.json"


def run(tmp: Path) -> dict:
    from onceforall.data import load_dataset
    from onceforall.training.schedule import smoke
    from onceforall.supernet.space import get_space
    from onceforall.training.train import train_supernet

    import dataclasses

    from onceforall.supernet.space import UnitSpec

    # A small space and enough steps to learn: a run stuck at chance would hide most regressions.
    space = dataclasses.replace(
        get_space("fashion-mnist"), name="golden", stem_width=8, first_block_width=8,
        units=(UnitSpec(16, 2, "relu", False), UnitSpec(24, 2, "hswish", True)),
        resolutions=(16, 20), final_expand_width=64, feature_width=64)
    data = load_dataset("synthetic:600", val_size=120)
    s = smoke()
    schedule = dataclasses.replace(s, batch_size=32, train_images=480,
                                   teacher=dataclasses.replace(s.teacher, epochs=4, lr=0.2),
                                   phases=(dataclasses.replace(s.phases[0], lr=0.05),))
    train_supernet(space, schedule, data, tmp, progress=False)
    out = {}
    for phase in ("teacher", "kernel"):
        rec = json.loads((tmp / phase / "log.jsonl").read_text().splitlines()[-1])
        out[phase] = {"train_loss": rec["train_loss"], "val_accuracy": rec["val_accuracy"]}
    return out


def test_smoke_run_matches_golden_numbers(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    got = run(tmp_path)
    # The kernel phase's subnets (one short epoch, 120 validation images) sit near chance, where float
    # rounding flips images: the same code on an AVX2 host (the golden numbers come from the faster
    # VM of earlier runs) gave min 20.8 / mid 43.3 for 25.8 / 41.7, with the losses within 1.2e-3
    # and the teacher's numbers equal. So the losses are held tight, and the kernel phase's
    # accuracies to 9 images. They hold at 2 threads (OMP_NUM_THREADS=2, as `make test` runs): at
    # 1 thread the kernel phase's loss comes out 3.244 against 3.266 (seen at a8584ba and after).
    accuracy_tolerance = {"teacher": 1.0, "kernel": 7.5}
    for phase, values in golden.items():
        assert got[phase]["train_loss"] == pytest.approx(values["train_loss"], rel=2e-3), phase
        for name, acc in values["val_accuracy"].items():
            assert got[phase]["val_accuracy"][name] == pytest.approx(
                acc, abs=accuracy_tolerance[phase]), (phase, name)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        GOLDEN.write_text(json.dumps(run(Path(d)), indent=1) + "\n")
    print(GOLDEN.read_text())
    sys.exit(0)
