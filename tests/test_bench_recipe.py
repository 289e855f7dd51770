"""bench/recipe.py, the recipe ablation: its variants, its final recipe, and --tiny end to end."""

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import recipe as bench  # noqa: E402  (bench/recipe.py)

from onceforall.errors import UserError  # noqa: E402
from onceforall.training.schedule import Schedule, get_schedule  # noqa: E402


@pytest.mark.parametrize("variant", bench.VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("base", ["ablation", "tiny"])
def test_every_variant_is_one_valid_change_of_the_base(variant, base):
    # the ablation's base: the `standard` it started from, which its ledger keeps
    schedule = bench._base(bench.LEDGER) if base == "ablation" else bench.tiny_setup()[1]
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


def test_the_winners_combined_are_trained_and_chosen_only_if_they_beat_the_best_single_change(tmp_path):
    space, base, data = bench.tiny_setup()
    ctx = bench.context(space, base, data, tmp_path, tiny=True)
    b = bench.Bench(tmp_path / "recipe.json", {"base": base.to_dict()})
    by_name = {v.name: v for v in bench.VARIANTS}
    winners = [(0.2, by_name["weight EMA"]), (0.1, by_name["momentum carried"])]
    b.r["plans"] = {v.name: bench.equalize(space, base, v.change(base), data, 1)[1] for _, v in winners}
    name, schedule = bench.choose(b, base, winners, ctx)
    final = b.r["final"]
    assert final["combined"]["changes"] == ["weight EMA", "momentum carried"]
    assert set(final["val_scores"]) == {"base", "weight EMA", "combined"}
    assert {(x["name"], x["seed"]) for x in b.r["runs"]} == {
        (n, s) for n in final["val_scores"] for s in (0, 1)}
    assert final["val_scores"][name] == max(final["val_scores"].values())
    assert final["changes"] == {"base": [], "weight EMA": ["weight EMA"],
                                "combined": ["weight EMA", "momentum carried"]}[name]
    combined = next(x for x in b.r["runs"] if x["name"] == "combined")
    assert combined["planned_wall_ratio"] and combined["epochs"] == final["combined"]["plan"]["epochs"]


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
    assert {(v.name, 0) for v in bench.VARIANTS} | {("base", 0), ("base", 1)} <= names
    two = {v.name for v in bench.VARIANTS if v.two_seeds}
    assert two == {"one stage"}
    for name, g in r["gains"].items():  # a second seed wherever the first was within 0.3 points
        first = next(x for x in r["runs"] if x["name"] == name and x["seed"] == 0)["val_score"]
        base = next(x for x in r["runs"] if x["name"] == "base" and x["seed"] == 0)["val_score"]
        assert (g["seeds"] == [0, 1]) == (abs(first - base) < bench.CLOSE or name in two)
    assert all(len(x["supernet_sha256"]) == 64 and x["code_commit"] for x in r["runs"])
    # the chosen recipe: the best on validation, both seeds, among the base, the best single change
    # and every winner combined (when two or more won)
    final, winners = r["final"], sorted((g["gain"], n) for n, g in r["gains"].items() if g["gain"] > 0)
    expected = {"base"} | {n for _, n in winners[-1:]} | ({"combined"} if len(winners) > 1 else set())
    assert set(final["val_scores"]) == expected and {(n, s) for n in expected for s in (0, 1)} <= names
    assert final["val_scores"][final["recipe"]] == max(final["val_scores"].values())
    assert set(final["test_accuracy"]) == {"max", "mid", "shallow-wide", "deep-narrow", "min"}
    assert set(final["test_accuracy_by_seed"]) == {"0", "1"}
    # twice the chosen recipe's shrinking, as evidence
    longer = r["longer"]
    assert longer["of"] == final["recipe"] and (longer["recipe"], 0) in names
    by = {x["name"]: x for x in r["runs"] if x["seed"] == 0}
    assert by[longer["recipe"]]["epochs"] == pytest.approx(
        [e * bench.LONGER for e in (by[final["recipe"]].get("epochs") or
                                    [p["epochs"] for p in r["base"]["phases"]])], abs=1e-3)
    assert r["tiny"] and r["machine"]["cores"]
    # the test set is read for the final recipe alone
    assert not any("test" in key for x in r["runs"] for key in x)
    assert (bench.DOCS_RESULTS.stat().st_mtime if bench.DOCS_RESULTS.exists() else None) == docs_before
    from render import recipe as section  # bench/render.py: docs/benchmarks.md's table

    lines = section(r)

    def table(header: str) -> list[str]:  # a markdown table's rows, below its header and rule
        start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 2
        end = next((i for i in range(start, len(lines)) if not lines[i].startswith("| ")), len(lines))
        return lines[start:end]

    assert len(table("| recipe")) == 1 + len(bench.VARIANTS)
    assert len(table("| candidate")) == len(final["val_scores"]) and ", read once" in lines[-1]
    assert any(line.startswith("Evidence, not a choice") for line in section(r))

    # resumable: a rerun trains and probes nothing again
    t = time.monotonic()
    assert bench.main(["--tiny", "--work", str(tmp_path)]) == 0
    assert time.monotonic() - t < 15
    assert json.loads((tmp_path / "recipe.json").read_text())["runs"] == r["runs"]


def test_a_supernet_whose_checkpoint_is_gone_is_trained_again_from_its_seed_and_plan(tmp_path):
    """The ledger outlives the checkpoints (a fresh checkout keeps no ignored folder): the test read
    trains the chosen recipe's supernet again and records whether the weights came out the same."""
    space, base, data = bench.tiny_setup()
    ctx = bench.context(space, base, data, tmp_path / "work", tiny=True)
    b = bench.Bench(tmp_path / "recipe.json", {"base": base.to_dict()})
    row = bench.measure(b, "base", base, {}, ctx, 0)
    assert bench.supernet(b, "base", base, ctx, 0) == Path(row["folder"]) and "retrained" not in row
    shutil.rmtree(tmp_path / "work")
    folder = bench.supernet(b, "base", base, ctx, 0)
    again = json.loads((tmp_path / "recipe.json").read_text())["runs"][0]["retrained"]
    assert folder == Path(again["folder"]) and folder.is_dir()
    assert again["same_weights"] and again["same_val_score"]  # deterministic per seed (and CPU)
    assert again["cpu"] == row["cpu"] and "(" in row["cpu"]  # each run names its host's CPU
    assert bench.supernet(b, "base", base, ctx, 0) == folder  # once is enough


def test_a_transcribed_plan_without_epochs_says_how_to_probe_it_again(tmp_path):
    space, base, data = bench.tiny_setup()
    ctx = bench.context(space, base, data, tmp_path, tiny=True)
    b = bench.Bench(tmp_path / "recipe.json", {"base": base.to_dict()})
    assert bench._planned(base, {"epochs": None}, "tiny") is None
    with pytest.raises(UserError, match="delete its entry under 'plans'") as err:
        bench.measure(b, "kernel fixed", None, {}, ctx, 0)
    assert err.value.field == "plans" and b.r["runs"] == []


def test_the_ledger_is_tracked_and_tiny_runs_never_write_it():
    ignored = subprocess.run(["git", "check-ignore", "-q", str(bench.LEDGER)], cwd=ROOT).returncode
    assert ignored == 1  # git's "not ignored": the ablation's results survive a fresh checkout
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--work", "/tmp/unused", "--out", str(bench.LEDGER)])


def test_a_ledger_of_another_base_recipe_is_refused_not_overwritten(tmp_path):
    base = get_schedule("standard")
    ledger = tmp_path / "recipe.json"
    ledger.write_text(json.dumps({"base": base.to_dict(), "runs": [{"name": "base", "seed": 0}]}))
    other = dataclasses.replace(base, batch_size=64)
    with pytest.raises(UserError, match="another base recipe") as err:
        bench.Bench(ledger, {"base": other.to_dict()})
    assert err.value.field == "base" and "move the ledger aside" in err.value.line()
    assert json.loads(ledger.read_text())["runs"] == [{"name": "base", "seed": 0}]
    assert bench.Bench(ledger, {"base": base.to_dict()}).run("base", 0) == {"name": "base", "seed": 0}


def test_an_ablation_resumes_on_the_base_its_ledger_started_from(tmp_path):
    """`standard` becomes the recipe the ablation chose while the ablation still has runs to do."""
    ledger = tmp_path / "recipe.json"
    assert bench._base(ledger) == get_schedule("standard")  # a new ablation: today's standard
    old = dataclasses.replace(get_schedule("standard"), batch_size=64)
    ledger.write_text(json.dumps({"base": old.to_dict(), "runs": [{"name": "base", "seed": 0}]}))
    assert bench._base(ledger) == old


def test_the_standard_preset_is_the_recipe_the_ablation_chose_with_its_evidence_runs_budget():
    """Issue #21: `standard` becomes the recipe that won on validation (the results once the ablation
    is complete, its ledger until then), with the shrinking epochs of the ablation's evidence run
    (twice the chosen recipe's: +0.98 on validation, under the issue's 4x cap)."""
    results = bench.DOCS_RESULTS if bench.DOCS_RESULTS.exists() else bench.LEDGER
    r = json.loads(results.read_text())
    chosen = Schedule.from_dict(r["final"]["schedule"])
    epochs = next(x["epochs"] for x in r["runs"] if x["name"] == r["longer"]["recipe"])
    assert epochs == [2 * p.epochs for p in chosen.phases]
    standard = get_schedule("standard")
    budgeted = bench._with_epochs(chosen, epochs, chosen.name)
    assert dataclasses.replace(budgeted, notes=standard.notes) == standard


def test_the_2x_run_shares_the_teacher_only_where_the_teachers_cosine_ends_with_it():
    restarts = bench._base(bench.LEDGER)
    cosine = restarts.continuous_lr()

    def twice(s):
        return dataclasses.replace(s, phases=tuple(dataclasses.replace(p, epochs=2 * p.epochs)
                                                   for p in s.phases))

    assert bench._teacher_key(twice(restarts), 0) == bench._teacher_key(restarts, 0)
    assert bench._teacher_key(twice(cosine), 0) != bench._teacher_key(cosine, 0)
    assert bench._teacher_key(cosine, 0) != bench._teacher_key(cosine, 1)


def test_the_2x_run_is_compared_with_the_chosen_recipe_as_this_code_trains_it(tmp_path):
    """A chosen run trained again for the test read (its checkpoint was gone) is today's measurement
    of it: the 2x run, trained by the same code, is compared with that, not with an older score."""
    base = get_schedule("standard")
    b = bench.Bench(tmp_path / "recipe.json", {"base": base.to_dict()})
    twice = f"base, shrinking x{bench.LONGER:g}"
    b.r["runs"] = [{"name": "base", "seed": 0, "val_score": 90.0},
                   {"name": "base", "seed": 1, "val_score": 90.2, "retrained": {"val_score": 90.4}},
                   {"name": twice, "seed": 0, "val_score": 90.1},
                   {"name": twice, "seed": 1, "val_score": 90.7}]
    bench.longer(b, "base", base, ctx={})  # both seeds measured: nothing is trained
    assert b.r["longer"]["seeds"] == [0, 1] and b.r["longer"]["of_val_scores"] == {"0": 90.0, "1": 90.4}
    assert b.r["longer"]["gain"] == pytest.approx(0.2)
