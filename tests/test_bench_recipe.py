"""bench/recipe.py, the recipe ablation: its variants, its final recipe, and --tiny end to end."""

import dataclasses
import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import recipe as bench  # noqa: E402  (bench/recipe.py)

from onceforall.training.schedule import get_schedule  # noqa: E402


@pytest.mark.parametrize("variant", bench.VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("base", ["standard", "tiny"])
def test_every_variant_is_one_valid_change_of_the_base(variant, base):
    schedule = get_schedule("standard") if base == "standard" else bench.tiny_setup()[1]
    changed = variant.change(schedule)
    assert changed != schedule and changed.teacher.epochs == schedule.teacher.epochs
    assert changed.batch_size == schedule.batch_size  # the data each step sees stays the same


def test_final_recipe_applies_the_winners_in_order_and_leaves_out_what_does_not_combine():
    base = get_schedule("standard")
    by_name = {v.name: v for v in bench.VARIANTS}
    broken = bench.Variant("floor 200%", "", bench.each_phase(
        lambda p: dataclasses.replace(p, lr_floor=2.0)))
    final, used, left_out = bench.final_recipe(
        base, [(0.5, by_name["one stage"]), (0.4, broken), (0.2, by_name["weight EMA"])])
    assert used == ["one stage", "weight EMA"] and left_out[0].startswith("floor 200%: ")
    assert [p.name for p in final.phases] == ["all"] and final.phases[0].ema_decay > 0


def test_tiny_refuses_to_write_the_benchmarks_results(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--work", str(tmp_path), "--out", str(bench.DOCS_RESULTS)])
    with pytest.raises(SystemExit):
        bench.main(["--tiny"])  # a scratch folder must be named


@pytest.mark.slow  # about 90 s on 2 cores
def test_tiny_ablation_runs_end_to_end_and_resumes(tmp_path):
    docs_before = bench.DOCS_RESULTS.stat().st_mtime if bench.DOCS_RESULTS.exists() else None
    assert bench.main(["--tiny", "--work", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "recipe.json").read_text())
    assert set(r["gains"]) == {v.name for v in bench.VARIANTS}
    names = {(x["name"], x["seed"]) for x in r["runs"]}
    assert {(v.name, 0) for v in bench.VARIANTS} | {("base", 0), ("final", 0)} <= names
    two = {v.name for v in bench.VARIANTS if v.two_seeds}
    assert two == {"one stage"}
    for name, g in r["gains"].items():  # a second seed wherever the first was within 0.3 points
        first = next(x for x in r["runs"] if x["name"] == name and x["seed"] == 0)["val_score"]
        base = next(x for x in r["runs"] if x["name"] == "base" and x["seed"] == 0)["val_score"]
        assert (g["seeds"] == [0, 1]) == (abs(first - base) < bench.CLOSE or name in two)
    assert all(len(x["supernet_sha256"]) == 64 and x["code_commit"] for x in r["runs"])
    assert set(r["final"]["test_accuracy"]) == {"max", "mid", "shallow-wide", "deep-narrow", "min"}
    assert r["tiny"] and r["machine"]["cores"]
    # the test set is read for the final recipe alone
    assert not any("test" in key for x in r["runs"] for key in x)
    assert (bench.DOCS_RESULTS.stat().st_mtime if bench.DOCS_RESULTS.exists() else None) == docs_before
    from render import recipe as section  # bench/render.py: docs/benchmarks.md's table

    table = [line for line in section(r) if line.startswith("| ") and not line.startswith("| recipe")]
    assert len(table) == 1 + len(bench.VARIANTS) and "Test accuracy (%), read once" in section(r)[-1]

    # resumable: a rerun trains and probes nothing again
    t = time.monotonic()
    assert bench.main(["--tiny", "--work", str(tmp_path)]) == 0
    assert time.monotonic() - t < 15
    assert json.loads((tmp_path / "recipe.json").read_text())["runs"] == r["runs"]
