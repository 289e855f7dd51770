"""bench/claim.py's cost model at the standard scale, from the committed measurements it reads."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import claim  # noqa: E402


def _doc(sha: str) -> dict:
    runs = {"scratch": {"0": {"energy_j": 10000.0, "train_wall_s": 600.0, "test_acc": 92.0}},
            "nas": {"0": {"energy_j": 15000.0, "train_wall_s": 900.0, "test_acc": 92.1}}}
    return {"settings": {"trained_on": {"supernet_sha256": sha}},
            "targets": {"edge-cpu-1t": {"runs": runs}, "phone-macs": {"runs": runs}}}


PS = {"supernet_sha256": "ab" * 32,  # the shape bench/progressive_shrinking.py writes
      "phases": [{"name": n, "wall_s": 100.0, "energy": {"total_j": 2000.0}} for n in "abcdef"]}
SPEC = {"accuracy_data": {"eval_s_per_subnet": 1.9}}


def test_standard_cost_model_has_both_baselines_with_the_nas_paying_its_latency_table():
    quick = claim.quick_figures()
    m = claim.standard_model(_doc(PS["supernet_sha256"]), quick, 475.0, PS, SPEC)
    assert set(m["break_even_n"]) == {"scratch", "nas"}
    assert [r["n"] for r in m["rows"]] == [1, 2, 4, 10, 40, 100]
    # a latency target's NAS needs its table too: the quick run's profile stage, averaged in
    profile = quick["profile"]["edge-cpu-1t"].j
    assert m["baselines"]["nas"]["j"] == pytest.approx(15000.0 + profile / 2, abs=0.01)
    # the predictor's 1200 measurements of 1.9 s at the training's mean power (20 W): an estimate
    assert m["shared"]["j"] == pytest.approx(12000.0 + 1200 * 1.9 * 20.0, abs=0.01)
    assert any("estimate" in a for a in m["assumptions"])
    marginal = quick["marginal"].j
    assert m["break_even_n"]["scratch"] == pytest.approx(m["shared"]["j"] / (10000.0 - marginal), abs=0.01)


def test_standard_cost_is_pending_on_another_supernet_or_an_unmetered_phase():
    m = claim.standard_model(_doc("0" * 64), claim.quick_figures(), 475.0, PS, SPEC)
    assert "rows" not in m and "another supernet" in m["pending"]
    unmetered = PS | {"phases": [{"wall_s": 1.0, "energy": None}, *PS["phases"]]}
    m = claim.standard_model(_doc(PS["supernet_sha256"]), claim.quick_figures(), 475.0, unmetered, SPEC)
    assert "rows" not in m and "not metered" in m["pending"]
    assert m["measured"]["scratch_per_target_j"] == 10000.0


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_images():
    import numpy as np

    ofa = np.array([True] * 10 + [False] * 2 + [True] * 50 + [False] * 8)
    other = np.array([False] * 10 + [True] * 2 + [True] * 50 + [False] * 8)
    # 10 images only OFA gets right, 2 only the other: p = 2 * P(X <= 2), X ~ B(12, 1/2) = 158/4096
    assert claim.mcnemar(ofa, other) == {"ofa_only": 10, "other_only": 2, "p": round(158 / 4096, 4)}
    assert claim.mcnemar(ofa, ofa)["p"] == 1.0


def test_paper_table1_transcription_is_consistent():
    """Every row's N = 40 totals follow from its own search and training costs, and its CO2e and
    dollars from one fixed rate per GPU-hour, as the paper derives them: a mistyped figure fails."""
    doc = json_load(ROOT / "docs" / "results" / "paper_table1.json")
    rates = []
    for row in doc["rows"]:
        total = row["total_n40"]
        costs = (row["search_gpu_hours"], row["training_gpu_hours"])
        hours = sum(c["fixed"] + c["per_n"] * 40 for c in costs if c is not None)
        assert hours == pytest.approx(total["gpu_hours"], rel=0.05), row["method"]  # printed to 2-3 digits
        if "note" not in row:  # a figure the paper prints off its own rate says so
            rates.append((total["co2e_lbs"] / total["gpu_hours"], total["aws_usd"] / total["gpu_hours"]))
    assert len(rates) == len(doc["rows"]) - 1
    lbs, usd = sorted(r[0] for r in rates), sorted(r[1] for r in rates)
    assert 0.27 < lbs[0] and lbs[-1] < 0.29 and 3.0 < usd[0] and usd[-1] < 3.1
    ofa = next(r for r in doc["rows"] if r["method"] == "OFA w/ PS")["total_n40"]["co2e_lbs"]
    mnas = next(r for r in doc["rows"] if r["method"] == "MnasNet")["total_n40"]["co2e_lbs"]
    assert round(mnas / ofa, -2) == 1300  # the news story's 1/1,300


def json_load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_tiny_claim_runs_the_whole_path_and_leaves_docs_alone(tmp_path):
    """bench/claim.py --tiny: a supernet, the four kinds of training and the NAS per target, the
    cost of N against both baselines, its section and plot, in the work folder only (~15 s)."""
    import os
    import subprocess

    committed = (ROOT / "docs" / "results" / "claim.json").read_bytes()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(ROOT / "bench" / "claim.py"), "--tiny", "--work", str(tmp_path)],
                   check=True, env=env, capture_output=True, timeout=300)
    doc = json_load(tmp_path / "claim.json")
    assert set(doc["settings"]["finetune"]) == {"finetune_14", "finetune_42"}
    for t in doc["targets"].values():
        assert {"finetune_14", "finetune_42", "scratch", "scratch_kd", "nas"} <= set(t["runs"])
        # the OFA subnet as the export computes it, paired image by image with each scratch seed
        assert abs(t["ofa_recomputed_test_acc"] - t["ofa_test_acc"]) < 1e-6
        m = t["mcnemar"]["scratch"]["0"]
        assert 0 < m["p"] <= 1 and m["ofa_only"] + m["other_only"] <= 80
        nas = t["runs"]["nas"]["0"]["nas"]
        assert nas["search_j"] > 0 and nas["final_j"] > 0 and nas["candidates"] == 3
        assert nas["proxy_val_acc"][nas["picked"]] == max(nas["proxy_val_acc"])
    tiny = doc["cost_model"]["tiny"]
    assert set(tiny["break_even_n"]) == {"scratch", "nas"} and tiny["rows"][-1]["n"] == 100
    assert tiny["baselines"]["nas"]["j"] > tiny["baselines"]["scratch"]["j"]  # proxies + the same training
    # the shared training, again in this run: deterministic on the CPU, so the same weights
    assert doc["shared"]["reproduces_supernet"] and doc["shared"]["wall_s"] > 0
    a = doc["acceptance"]
    assert a["shared_over_scratch_wall"]["ratio"] == pytest.approx(
        doc["shared"]["wall_s"] / a["largest_pick"]["scratch_wall_s"], abs=0.01)
    assert set(a["per_target_within_se"]) == set(doc["targets"])
    assert (tmp_path / "claim_cost_tiny.png").stat().st_size > 0
    assert "per-target NAS" in (tmp_path / "claim.md").read_text()
    assert (ROOT / "docs" / "results" / "claim.json").read_bytes() == committed


def test_why_is_made_from_the_measurements_it_explains():
    schedule = {"name": "standard", "teacher": {"epochs": 10},
                "phases": [{"epochs": e} for e in (1, 1, 2, 1, 2.5)]}
    ps = {"supernet_sha256": "ab" * 32,
          "phases": [{"test_accuracy": {"max": 92.35}}, {"test_accuracy": {"max": 91.9}}]}
    doc = {"settings": {"trained_on": {"supernet_sha256": "ab" * 32}}, "targets": {
        "a": {"ofa_test_acc": 91.0, "scratch_test_acc": 92.0, "finetune_14_test_acc": 91.25,
              "finetune_42_test_acc": 91.5},
        "b": {"ofa_test_acc": 91.0, "scratch_test_acc": 91.5, "finetune_14_test_acc": 91.4}}}
    recipe = {"longer": {"gain": 0.31, "of": "combined", "seeds": [0, 1]}}
    text = claim.why(doc, schedule, ps, recipe)
    assert "10 teacher epochs, then 7.5 epochs of shrinking over 5 phase(s)" in text
    assert "max subnet reaches 91.90% on test, its teacher 92.35%" in text
    assert "14% of the scratch epochs closes 25% to 80% of the gap" in text
    assert "42% of the scratch epochs closes 50% to 50%" in text
    assert "twice the shrinking epochs gave +0.31 points" in text
    # a progressive_shrinking.json of another supernet says nothing of this one
    assert "max subnet" not in claim.why(doc, schedule, {**ps, "supernet_sha256": "cd" * 32}, {})


def test_tiny_claim_runs_end_to_end(tmp_path):
    """The harness on synthetic data (~15 s): every kind of training, the acceptance, the cost model
    and the rendered section; its numbers mean nothing, and docs/results is not touched."""
    docs = ROOT / "docs" / "results" / "claim.json"
    before = docs.stat().st_mtime
    assert claim.main(["--tiny", "--work", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "claim.json").read_text())
    assert set(doc["targets"]) == {"tiny-macs", "tiny-params"}
    for t in doc["targets"].values():
        assert {"scratch", "scratch_kd", "nas", *claim.FINETUNES} <= set(t["runs"])
    assert doc["why"].startswith("The `tiny` supernet is trained for")
    assert "shared_over_scratch_wall" in doc["acceptance"] and "tiny" in doc["cost_model"]
    assert (tmp_path / "claim.md").read_text().startswith("## ")
    assert docs.stat().st_mtime == before


def _fake_supernet(folder: Path, sha: str) -> Path:
    from onceforall.supernet.checkpoint import FORMAT

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "checkpoint.json").write_text(json.dumps(
        {"format": FORMAT, "space": {}, "phase": "width-2", "files": {"weights.safetensors": sha}}))
    return folder


def test_the_subnets_measured_are_a_snapshot_of_one_supernet_that_outlives_the_work_folder(tmp_path):
    """The claim runs in pieces across sessions, and a fresh checkout has no bench/_work: the cards and
    the latency tables the searches used are kept in a (committed) snapshot that names its supernet,
    read from there once taken, and refused for another supernet."""
    targets, snapshot = tmp_path / "specialize" / "targets", tmp_path / "snapshot"
    for name, kind in (("phone", "macs"), ("edge", "latency_ms")):
        (targets / name / "model").mkdir(parents=True)
        card = {"subnet": {"r": 28}, "target": {"name": name, "constraint": {"kind": kind}}}
        (targets / name / "model" / "model_card.json").write_text(json.dumps(card))
    (targets / "edge" / "latency.json").write_text('{"block_ms": [1.5]}')
    supernet = _fake_supernet(tmp_path / "supernet", "ab" * 32)
    (targets.parent / "supernet_sha256").write_text("cd" * 32)  # searched on another supernet
    with pytest.raises(SystemExit, match="make bench-specialize"):
        claim.searched(targets, snapshot, supernet)
    (targets.parent / "supernet_sha256").write_text("ab" * 32)
    cards, tables = claim.searched(targets, snapshot, supernet)
    assert set(cards) == {"phone", "edge"} and set(tables) == {"edge"}
    assert tables["edge"].is_relative_to(snapshot)
    assert json.loads(tables["edge"].read_text()) == {"block_ms": [1.5]}
    shutil.rmtree(targets)  # a fresh checkout: only the snapshot is left
    assert claim.searched(targets, snapshot, supernet) == (cards, tables)
    with pytest.raises(SystemExit, match="another supernet"):
        claim.searched(targets, snapshot, _fake_supernet(tmp_path / "other", "cd" * 32))
    with pytest.raises(SystemExit, match="make bench-specialize"):
        claim.searched(targets, tmp_path / "empty", supernet)


def test_the_claim_measures_the_committed_supernet_and_teacher_where_no_training_is_here(tmp_path,
                                                                                       monkeypatch):
    trained = tmp_path / "standard"
    (trained / "ps" / "width-2").mkdir(parents=True)
    assert claim.standard_supernet(trained) == (trained / "ps" / "width-2", trained / "ps" / "teacher")
    committed = tmp_path / "committed"
    monkeypatch.setattr(claim, "SUPERNET_FIXTURE", committed)
    with pytest.raises(SystemExit, match="make bench-ps"):
        claim.standard_supernet(tmp_path / "fresh")
    _fake_supernet(committed / "teacher", "ab" * 32)
    assert claim.standard_supernet(tmp_path / "fresh") == (committed, committed / "teacher")
