"""The per-target NAS baseline (onceforall/specialization/nas_baseline.py) on a tiny space and synthetic
data."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from onceforall.infra.cost import Cost, break_even, cost_model
from onceforall.data import load_dataset
from onceforall.supernet.efficiency import CostTable, subnet_macs, subnet_params
from onceforall.errors import UserError
from onceforall.specialization.latency import LatencyTable
from onceforall.specialization.nas_baseline import NAS_RESULT, NASSettings, run_nas, sample_candidates
from onceforall.training.schedule import get_schedule
from onceforall.supernet.space import UnitSpec, get_space
from onceforall.specialization.targets import Target

SPACE = dataclasses.replace(
    get_space("fashion-mnist"), name="tiny", stem_width=8, first_block_width=8,
    units=(UnitSpec(16, 2, "relu", False), UnitSpec(24, 2, "hswish", True)),
    resolutions=(16, 20, 24), final_expand_width=64, feature_width=64)


def _target(kind: str, **constraint) -> Target:
    return Target.from_dict({"name": "t-" + kind.replace("_", "-"), "runtime": "onnxruntime",
                             "threads": 1, "batch_size": 1, "constraint": {"kind": kind, **constraint}})


def _between(values: np.ndarray, share: float) -> float:
    return float(values.min() + share * (values.max() - values.min()))


def _macs_target(share: float = 0.5) -> Target:
    costs = CostTable.build(SPACE)
    macs = costs.macs([SPACE.min_config(), SPACE.max_config()])
    return _target("macs", budget=_between(macs, share))


def _table() -> LatencyTable:
    """A latency table whose block cost grows with kernel and expand (a test input, not a
    measurement): enough to check the budget goes through the table as the search's does."""
    s = SPACE
    block = np.array([[[[0.01 * k * e for e in s.expands] for k in s.kernels] for _ in s.resolutions]
                      for _ in range(s.num_slots)])
    fixed = np.array([0.05 * r for r in s.resolutions])
    return LatencyTable(s, "onnxruntime", 1, 1, 0.0, fixed, block)


SETTINGS = NASSettings(candidates=4, proxy_epochs=1, proxy_train_images=32, band=0.6, pool=400)


@pytest.mark.parametrize("kind", ["macs", "params", "latency_ms"])
def test_every_candidate_fits_the_budget_and_is_distinct(kind):
    if kind == "latency_ms":
        target, table = _target(kind, budget_of_max=0.6, headroom_pct=5), _table()
    else:
        lo_hi = np.array([f(SPACE, c) for c in (SPACE.min_config(), SPACE.max_config())
                          for f in [subnet_macs if kind == "macs" else subnet_params]])
        target, table = _target(kind, budget=_between(lo_hi, 0.5)), None
    resolved, cands = sample_candidates(SPACE, target, table, SETTINGS, seed=3)
    budget = resolved.constraint.search_budget
    assert len(cands) == SETTINGS.candidates
    assert len({json.dumps(c.to_dict(), sort_keys=True) for c, _ in cands}) == len(cands)
    for cfg, metric in cands:  # the recorded metric is the config's own, within the budget
        own = {"macs": lambda: subnet_macs(SPACE, cfg), "params": lambda: subnet_params(SPACE, cfg),
               "latency_ms": lambda: table.predict_one(cfg)}[kind]()
        assert metric == pytest.approx(own) and metric <= budget
        assert metric >= SETTINGS.band * budget  # drawn from the top of the budget
    if kind == "latency_ms":  # budget_of_max resolved on the table, less the headroom
        max_ms = table.predict_one(SPACE.max_config())
        assert budget == pytest.approx(0.6 * max_ms * 0.95, rel=1e-4)
    again = sample_candidates(SPACE, target, table, SETTINGS, seed=3)[1]
    assert [c.to_dict() for c, _ in again] == [c.to_dict() for c, _ in cands]
    other = sample_candidates(SPACE, target, table, SETTINGS, seed=4)[1]
    assert [c.to_dict() for c, _ in other] != [c.to_dict() for c, _ in cands]


def test_a_budget_nothing_fits_is_a_clear_error():
    with pytest.raises(UserError, match="fits the macs budget"):
        sample_candidates(SPACE, _target("macs", budget=1.0), None, SETTINGS, seed=0)
    with pytest.raises(UserError, match="band"):
        NASSettings(band=1.5)


def test_proxy_share_is_what_the_proxies_cost():
    standard = get_schedule("standard")  # 10 epochs on all 55,000 images
    assert NASSettings().proxy_share(standard, 55000) == pytest.approx(10 * 25000 / (10 * 55000))


def test_run_nas_picks_the_best_proxy_and_meters_it(tmp_path):
    data = load_dataset("synthetic:400", val_size=100)
    schedule = dataclasses.replace(get_schedule("smoke"), batch_size=32, train_images=64, val_images=None,
                                   bn_calib_images=64, bn_calib_batch=64)
    target = _macs_target(0.6)
    doc = run_nas(SPACE, schedule, target, data, tmp_path / "a", settings=SETTINGS, seed=1,
                  device="cpu", progress=False)
    vals = [c["val_acc"] for c in doc["candidates"]]
    assert len(vals) == SETTINGS.candidates and doc["picked"] == vals.index(max(vals))
    assert doc["final"]["config"] == doc["candidates"][doc["picked"]]["config"]
    assert doc["final"]["metric"] <= target.constraint.search_budget
    assert doc["final"]["epochs"] == schedule.teacher.epochs and doc["final"]["test_acc"] is not None
    proxy = json.loads((tmp_path / "a" / "proxy-0" / "result.json").read_text())
    assert proxy["test_acc"] is None and proxy["epochs"] == SETTINGS.proxy_epochs
    e = doc["energy"]
    assert e["search"]["total_j"] > 0 and e["final"]["total_j"] > 0
    assert e["total"]["total_j"] == pytest.approx(e["search"]["total_j"] + e["final"]["total_j"], abs=1e-3)
    # the same seed again: the same candidates, proxies and pick
    again = run_nas(SPACE, schedule, target, data, tmp_path / "b", settings=SETTINGS, seed=1,
                    device="cpu", progress=False)
    assert [c["val_acc"] for c in again["candidates"]] == vals and again["picked"] == doc["picked"]
    # a finished run is read back, not trained again
    (tmp_path / "a" / NAS_RESULT).write_text(json.dumps(doc | {"marker": 1}))
    assert run_nas(SPACE, schedule, target, data, tmp_path / "a", settings=SETTINGS, seed=1)["marker"] == 1


def test_cost_model_and_break_even():
    assert break_even(1000.0, 50.0, 300.0) == pytest.approx(4.0)
    assert break_even(1000.0, 300.0, 300.0) is None  # one more OFA target costs as much: never
    m = cost_model(Cost(1000.0, 100.0), Cost(50.0, 5.0), {"scratch": Cost(300.0, 30.0),
                                                          "nas": Cost(600.0, 60.0)}, 475.0, ns=(1, 10))
    assert m["break_even_n"] == {"scratch": 4.0, "nas": pytest.approx(1000 / 550, abs=0.01)}
    r10 = m["rows"][1]
    assert r10["ofa_j"] == 1500.0 and r10["scratch_j"] == 3000.0 and r10["nas_j"] == 6000.0
    assert r10["ofa_wall_s"] == 150.0 and r10["nas_wh"] == pytest.approx(6000 / 3600, 1e-3)
    assert r10["scratch_g"] == pytest.approx(3000 / 3.6e6 * 475, 1e-3)
