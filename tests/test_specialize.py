"""Latency tables, accuracy data, search per target, ONNX export and card reproduction."""

import dataclasses
import gzip
import json
import struct
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onceforall.supernet import checkpoint as ckpt
from onceforall.specialization.accuracy_data import (
    SubnetEvaluator, collect_accuracy, read_rows, stratified_configs)
from onceforall.data import load_dataset
from onceforall.errors import UserError
from onceforall.specialization.export import export_subnet, resize_matrix
from onceforall.specialization.latency import (
    LatencyTable, Profiler, build_latency_table, onnx_bytes, validate_latency_table)
from onceforall.specialization.predictor import fit_predictor
from onceforall.reproduce import reproduce
from onceforall.supernet.space import SubnetConfig, UnitSpec, get_space
from onceforall.specialization.specialize import pareto_plot, search_target, uniform_configs
from onceforall.supernet.supernet import OFASupernet
from onceforall.specialization.targets import parse_targets

SMALL = dataclasses.replace(
    get_space("fashion-mnist"), name="small", stem_width=8, first_block_width=8,
    units=(UnitSpec(16, 2, "relu", False), UnitSpec(24, 2, "hswish", True)),
    kernels=(3, 5), expands=(3, 6), resolutions=(16, 20), final_expand_width=64, feature_width=64)
FAST = Profiler("onnxruntime", threads=1, batch_size=1, warmup=2, repeats=5, blocks=1, warmup_s=0.0,
                window_s=0.0)


def _target(kind, budget, name="t"):
    return parse_targets({"targets": [{"name": name, "runtime": "onnxruntime", "threads": 1,
                                       "batch_size": 1,
                                       "constraint": {"kind": kind, "budget": budget}}]})[0]


@pytest.fixture(scope="module")
def table():
    return build_latency_table(SMALL, FAST, copies=2)


def test_latency_table_covers_every_slot_and_roundtrips(table, tmp_path):
    assert table.block_ms.shape == (SMALL.num_slots, 2, 2, 2) and (table.block_ms >= 0).all()
    assert (table.fixed_ms > 0).all() and table.block_ms.sum() > 0
    cfgs = SMALL.sample_many(np.random.default_rng(0), 20)
    pred = table.predict(cfgs)
    assert pred.shape == (20,) and (pred > 0).all()
    # The sum is the fixed part plus the active slots' entries (skipped blocks cost nothing).
    cfg = SMALL.uniform_config(2, 5, 6, 20)
    slots = [u * 4 + i for u in range(2) for i in range(2)]
    expected = table.fixed_ms[1] + sum(table.block_ms[s, 1, 1, 1] for s in slots)
    assert table.summed([cfg])[0] == pytest.approx(expected)
    # ... times the calibration factor, the median of measured/summed over 20 whole subnets.
    assert table.calibration_n == 20 and 0.2 < table.scale < 5
    assert table.predict([cfg])[0] == pytest.approx(table.scale * expected)
    # the host probe was timed along (onnxruntime), the reference later measurements check against
    assert table.probe_ms is not None and table.probe_ms > 0
    loaded = LatencyTable.load(table.save(tmp_path / "lut.json"), SMALL)
    assert loaded.probe_ms == table.probe_ms
    assert np.allclose(loaded.predict(cfgs), pred) and loaded.scale == table.scale
    with pytest.raises(UserError) as info:
        LatencyTable.load(tmp_path / "lut.json", get_space("fashion-mnist"))
    assert info.value.field == "space"


def test_latency_validation_reports_mape_and_tau(table):
    report = validate_latency_table(table, FAST, n=6, seed=1)
    assert report["n"] == 6 and np.isfinite(report["mape_pct"]) and len(report["measured_ms"]) == 6


def test_stratified_sample_is_balanced_and_seeded():
    cfgs = stratified_configs(SMALL, 30, seed=3, sampler="balanced")
    assert cfgs == stratified_configs(SMALL, 30, seed=3, sampler="balanced")
    assert sorted(c.r for c in cfgs).count(16) == 15
    assert sum(c.d[0] == 2 for c in cfgs) == 10


def test_graded_sample_reaches_the_corners_and_mixed_interleaves():
    space = get_space("fashion-mnist")

    def share_e6(c):  # of the active blocks
        active = [c.e[u * space.max_depth + i] for u, d in enumerate(c.d) for i in range(d)]
        return sum(e == 6 for e in active) / len(active)

    balanced = stratified_configs(space, 200, seed=0, sampler="balanced")
    graded = stratified_configs(space, 200, seed=0, sampler="graded")
    assert graded == stratified_configs(space, 200, seed=0, sampler="graded")
    assert max(map(share_e6, balanced)) < 0.9 and sum(share_e6(c) >= 0.9 for c in graded) >= 10
    assert sum(c.d == (4,) * 4 for c in graded) >= 15 and sum(c.d == (2,) * 4 for c in graded) >= 15
    mixed = stratified_configs(space, 9, seed=0)
    assert mixed[0::2] == stratified_configs(space, 5, seed=0, sampler="balanced")
    assert mixed[1::2] == stratified_configs(space, 4, seed=0, sampler="graded")
    with pytest.raises(UserError, match="sampler"):
        stratified_configs(space, 4, seed=0, sampler="sobol")


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    """A Fashion-MNIST-shaped IDX folder of learnable toy images (reproduce() reads IDX)."""
    folder = tmp_path_factory.mktemp("idx")
    data = load_dataset("synthetic:400", val_size=80)

    def write(name, arr):
        header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        (folder / f"{name}.gz").write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))

    train_x = torch.cat([data.train.images, data.val.images])[:, 0].numpy()
    write("train-images-idx3-ubyte", train_x)
    write("train-labels-idx1-ubyte", torch.cat([data.train.labels, data.val.labels]).numpy())
    write("t10k-images-idx3-ubyte", data.test.images[:, 0].numpy())
    write("t10k-labels-idx1-ubyte", data.test.labels.numpy())
    return folder


@pytest.fixture(scope="module")
def supernet_dir(tmp_path_factory):
    torch.manual_seed(0)
    net = OFASupernet(SMALL)
    folder = tmp_path_factory.mktemp("supernet")
    ckpt.save_checkpoint(folder, net.state_dict(), {"phase": "width-2", "space": SMALL.to_dict()})
    return folder


def test_collect_accuracy_in_chunks_and_resume(supernet_dir, idx_dir, tmp_path):
    data = load_dataset(str(idx_dir), val_size=60)
    net = OFASupernet(SMALL)
    ckpt.load_weights(net, ckpt.load_checkpoint(supernet_dir))
    out = tmp_path / "acc.jsonl"
    collect_accuracy(net, data, out, 6, chunk=0, num_chunks=2)
    assert len(read_rows(out)) == 3
    collect_accuracy(net, data, out, 6, chunk=0, num_chunks=2)  # nothing left to do
    collect_accuracy(net, data, out, 6, chunk=1, num_chunks=2)
    rows = read_rows(out)
    assert len(rows) == 6 and all(0 <= r["val_acc"] <= 100 and r["macs"] > 0 and r["views"] == 2
                                  for r in rows)
    # the label averages both views; the plain view alone is kept beside it
    ev = SubnetEvaluator(net, data, split="val", mirror=True)
    cfg = SubnetConfig.from_dict(rows[0]["config"], SMALL)
    right = ev.correct(cfg)
    assert rows[0]["val_acc"] == pytest.approx(100 * right.double().mean().item(), abs=1e-3)
    assert rows[0]["val_acc_plain"] == pytest.approx(100 * right[0].double().mean().item(), abs=1e-3)
    # one file holds one kind of label
    with pytest.raises(UserError, match="mirror"):
        collect_accuracy(net, data, out, 8, mirror=False)


def test_collect_accuracy_on_several_devices_resumes_and_equals_one(supernet_dir, tmp_path):
    """Two measuring processes (one per GPU on a cluster; ``cpu,cpu`` here), the first cut short
    after one row: merged, the same rows in the same order as one process writes."""
    import functools

    from onceforall.specialization.accuracy_data import collect_accuracy_on
    from onceforall.training.dist import eval_devices
    from onceforall.stages import _predictor_inputs

    opener = functools.partial(_predictor_inputs, str(supernet_dir), "synthetic:400", 0, 40)
    one = read_rows(collect_accuracy_on(eval_devices("cpu"), opener, tmp_path / "one.jsonl", 6))
    out = tmp_path / "two.jsonl"
    (tmp_path / "two.part0.jsonl").write_text(json.dumps(one[0]) + "\n")  # chunk 0's first row
    seen = []
    collect_accuracy_on(eval_devices("cpu,cpu"), opener, out, 6,
                        progress=lambda i, total, s: seen.append(total))
    two = read_rows(out)
    assert not list(tmp_path.glob("two.part*"))
    drop = lambda rows: [{k: v for k, v in r.items() if k != "eval_s"} for r in rows]  # noqa: E731
    assert drop(two) == drop(one)
    assert set(seen) <= {5}  # the resumed row is not measured again
    with pytest.raises(UserError, match="device"):
        eval_devices("cuda:7")


def test_evaluator_scores_each_image_and_its_mirror(supernet_dir, idx_dir):
    data = load_dataset(str(idx_dir), val_size=60)
    net = OFASupernet(SMALL)
    ckpt.load_weights(net, ckpt.load_checkpoint(supernet_dir))
    cfg = SMALL.sample_many(np.random.default_rng(0), 1)[0]
    plain = SubnetEvaluator(net, data, split="val", calib_images=40)
    both = SubnetEvaluator(net, data, split="val", calib_images=40, mirror=True)
    right, views = plain.correct(cfg), both.correct(cfg)
    assert right.shape == (1, 60) and views.shape == (2, 60) and views.dtype == torch.bool
    assert torch.equal(views[0], right[0])
    assert plain(cfg) == pytest.approx(100.0 * right.double().mean().item())
    assert both(cfg) == pytest.approx(100.0 * views.double().mean().item())
    # the mirror view is the same images flipped: the same subnet answers differently on some
    flipped = dataclasses.replace(data, val=dataclasses.replace(
        data.val, images=data.val.images.flip(-1)))
    assert torch.equal(SubnetEvaluator(net, flipped, split="val", calib_images=40).correct(cfg)[0],
                       views[1])
    assert not torch.equal(views[0], views[1])


def test_resize_matrix_is_torchs_antialiased_resize():
    x = torch.rand(2, 1, 28, 28)
    a = resize_matrix(28, 20)
    ref = F.interpolate(x, size=(20, 20), mode="bilinear", antialias=True, align_corners=False)
    assert (a @ x @ a.T - ref).abs().max() < 1e-5


def test_search_then_export_then_reproduce(supernet_dir, idx_dir, tmp_path):
    rng = np.random.default_rng(0)
    cfgs = SMALL.sample_many(rng, 200)
    acc = np.array([80 + sum(c.e) / 10 + c.r / 10 + rng.normal(0, 0.05) for c in cfgs])
    predictor, _ = fit_predictor(SMALL, cfgs, acc, seed=0, epochs=30)
    predictor.save(tmp_path / "predictor")
    target = _target("macs", 600_000, "tiny-macs")
    from onceforall.specialization.search import EvolutionConfig

    result = search_target(SMALL, target, tmp_path / "predictor.safetensors", tmp_path / "s",
                           config=EvolutionConfig(population=20, generations=10))
    doc = json.loads((tmp_path / "s" / "search.json").read_text())
    assert doc["best_metric"] <= 600_000 and doc["target"]["name"] == "tiny-macs"
    pareto_plot(doc, tmp_path / "p.png", tmp_path / "p.html", points=[(5e5, 81.0, "uniform")])
    assert (tmp_path / "p.png").stat().st_size > 1000 and "<table" in (tmp_path / "p.html").read_text()
    assert len(uniform_configs(SMALL)) == 3 * 2 * 2 * 2

    data = load_dataset(str(idx_dir), val_size=60)
    # The pick: the best validation accuracy among the search's best-scoring Pareto points.
    from onceforall.specialization.export import load_supernet
    from onceforall.specialization.specialize import select_on_validation

    net = load_supernet(supernet_dir)
    picked, sel = select_on_validation(net, data, doc, k=4)
    rows = sel["shortlist"]
    assert 1 <= len(rows) <= 4 and all(r["macs"] <= 600_000 for r in rows)
    assert rows[sel["picked"]]["val_acc"] == max(r["val_acc"] for r in rows)
    assert picked.to_dict() == rows[sel["picked"]]["config"]
    assert [r["predicted_acc"] for r in rows] == sorted((r["predicted_acc"] for r in rows), reverse=True)
    assert select_on_validation(net, data, doc, k=1)[0] == result.best
    # a point the search measured over budget (latency targets) is never picked
    top = max(range(len(doc["shortlist"])), key=lambda i: doc["shortlist"][i]["score"])
    doc["shortlist"][top]["measured_ms"] = 2.0 * 600_000
    _, sel = select_on_validation(net, data, doc, k=4)
    assert doc["shortlist"][top]["config"] not in [r["config"] for r in sel["shortlist"]]
    assert "measured within the budget" in sel["rule"]
    card = export_subnet(supernet_dir, result.best, data, target, tmp_path / "m",
                         predicted_accuracy=result.best_score, calib_images=100)
    assert card["onnx"]["max_abs_diff_vs_torch"] <= 1e-4
    assert card["onnx"]["max_abs_diff_vs_training_preprocessing"] <= 1e-4
    assert abs(card["accuracy"]["test_top1_pct_onnxruntime"] - card["accuracy"]["test_top1_pct_torch"]) <= 0.1
    assert card["macs"] <= 600_000 and card["subnet"] == result.best.to_dict()
    import onnx

    model = onnx.load(str(tmp_path / "m" / "model.onnx"))
    assert model.opset_import[0].version >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    rep = reproduce(tmp_path / "m" / "model_card.json", idx_dir, repeats=3)
    assert rep["sha256_ok"] and rep["acc_diff"] <= 0.1 and rep["within_budget"]
    # the card records its timing protocol, and reproduce measures with it
    from onceforall.specialization.latency import card_profiler

    protocol = card_profiler(target.runtime, target.threads, target.batch_size).protocol
    assert card["latency"]["protocol"] == protocol and rep["protocol"] == {**protocol, "repeats": 3}
    # the host probe was timed with the card and again with the reproduction, which compares them
    assert card["latency"]["host_probe_ms"] > 0
    # and the CPU allotment (cgroup quota) it was measured under, as this process sees it
    from onceforall.specialization.cpu_allotment import cpu_allotment

    assert card["latency"]["cpu_allotment"] == cpu_allotment()
    assert rep["card_host_probe_ms"] == card["latency"]["host_probe_ms"]
    assert rep["host_slowdown"] == pytest.approx(rep["host_probe_ms"] / rep["card_host_probe_ms"], rel=1e-3)


def test_reproduce_tells_a_slow_host_from_a_model_over_budget():
    from onceforall.reproduce import _verdict

    assert _verdict({"latency_ms": 1.9, "host_slowdown": 1.4}, 2.0, 0.05) == "within budget"
    assert _verdict({"latency_ms": 2.2, "host_slowdown": 1.02}, 2.0, 0.05) == "over the 2 ms budget"
    assert _verdict({"latency_ms": 2.2}, 2.0, 0.05) == "over the 2 ms budget"  # an older card: no probe
    slow = _verdict({"latency_ms": 2.8, "host_slowdown": 1.4}, 2.0, 0.05)
    assert slow.startswith("inconclusive") and "40% slower" in slow and "2 ms" in slow


def test_reproduce_times_an_older_card_the_way_it_was_measured():
    """Cards written before the protocol was recorded name only their windows."""
    from onceforall.reproduce import _card_protocol

    assert _card_protocol({"measured_ms": 1.9, "window_s": 2.0, "max_window_s": 30.0}) == {
        "warmup": 20, "repeats": 25, "rounds": 8, "window_s": 2.0, "max_window_s": 30.0}


def test_time_many_interleaves_rounds_and_keeps_each_fns_best_median():
    from onceforall.specialization.ort_timing import time_many

    order = []
    calls = {"slow": 0}

    def slow_at_first():  # a host that is slow for the first 12 calls
        order.append("a")
        calls["slow"] += 1
        time.sleep(0.004 if calls["slow"] <= 12 else 0.001)

    def steady():
        order.append("b")
        time.sleep(0.002)

    kw = dict(warmup=0, repeats=10, warmup_s=0.0, window_s=0.0, settle=0)
    ms = time_many([slow_at_first, steady], rounds=2, **kw)
    assert order == ["a"] * 10 + ["b"] * 10 + ["a"] * 10 + ["b"] * 10  # round by round
    # round 1 of "a" was slow (4 ms): round 2 counts (the bounds leave room for sleep overshoot
    # on a loaded host: this test or the next failed once in a full local CI run, tighter)
    assert 0.9 <= ms[0] < 3.0 and 1.9 <= ms[1] < 3.5
    calls["slow"] = 0
    assert time_many([slow_at_first], rounds=1, **kw)[0] >= 3.9  # one round cannot tell
    # rounds go on until they span the window: 5 calls of 2 ms a round, 50 ms -> 4 rounds or more
    before = len(order)
    time_many([steady], rounds=1, **{**kw, "repeats": 5, "window_s": 0.05})
    assert len(order) - before >= 20


def test_time_many_waits_out_a_slow_stretch_when_it_knows_what_to_expect():
    """A host slow for 0.4 s, longer than the window: without an expectation the measurement is
    all slow stretch; with one, rounds go on (bounded by max_window_s) until the fast state."""
    from onceforall.specialization.ort_timing import time_many

    t0 = time.perf_counter()

    def host():  # 4 ms a call for the first 0.4 s, then 1 ms
        time.sleep(0.004 if time.perf_counter() - t0 < 0.4 else 0.001)

    kw = dict(warmup=0, repeats=5, rounds=1, warmup_s=0.0, window_s=0.05, settle=0)
    assert time_many([host], **kw)[0] >= 3.9
    t0 = time.perf_counter()
    assert time_many([host], expect_ms=[1.0], max_window_s=2.0, **kw)[0] < 3.0  # not the 4 ms
    # never longer than max_window_s, and the expectation is not what is reported
    start = time.perf_counter()
    assert time_many([lambda: time.sleep(0.002)], expect_ms=[0.5], max_window_s=0.3, **kw)[0] >= 1.9
    assert time.perf_counter() - start < 1.2


def test_onnx_timing_needs_no_torch_and_ranks_models():
    """reproduce shares the card's statistic (ort_timing) and still runs where torch is absent."""
    import subprocess
    import sys

    from onceforall.specialization.ort_timing import time_onnx

    probe = ("import sys, onceforall.specialization.ort_timing, onceforall.reproduce; "
             "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    shape = (4, 8, 32, 32)
    small, big = torch.nn.Conv2d(8, 8, 1), torch.nn.Sequential(*[torch.nn.Conv2d(8, 8, 3, padding=1)] * 6)
    ms = time_onnx([onnx_bytes(m, torch.zeros(shape)) for m in (small, big)], [shape] * 2, threads=1,
                   warmup=2, repeats=5, rounds=2, warmup_s=0.0, window_s=0.0)
    assert ms.shape == (2,) and 0 < ms[0] < ms[1]  # six 3x3 convolutions cost more than one 1x1


def test_card_latency_is_timed_in_a_fresh_process():
    from onceforall.specialization.latency import card_profiler
    from onceforall.specialization.ort_timing import time_onnx_isolated

    shape = (4, 8, 32, 32)
    small, big = torch.nn.Conv2d(8, 8, 1), torch.nn.Sequential(*[torch.nn.Conv2d(8, 8, 3, padding=1)] * 6)
    ms = time_onnx_isolated([onnx_bytes(m, torch.zeros(shape)) for m in (small, big)], [shape] * 2,
                            threads=1, warmup=2, repeats=5, rounds=2, warmup_s=0.0, window_s=0.0)
    assert ms.shape == (2,) and 0 < ms[0] < ms[1]
    # with the host probe: its time comes last, and it is the same workload in the child process
    probed = time_onnx_isolated([onnx_bytes(small, torch.zeros(shape))], [shape], threads=1, probe=True,
                                warmup=2, repeats=5, rounds=2, warmup_s=0.0, window_s=0.0)
    assert probed.shape == (2,) and probed[1] > 0
    with pytest.raises(RuntimeError, match="onnxruntime timing process failed"):
        time_onnx_isolated([b"not an onnx model"], [(1, 8, 4, 4)], threads=1, warmup=1, repeats=1,
                           rounds=1, warmup_s=0.0, window_s=0.0)
    assert card_profiler("onnxruntime", 2, 16).isolate
    assert "fresh process" in card_profiler("onnxruntime", 1, 1).statistic


def test_latency_search_measures_its_pick_and_searches_again_when_over(table, tmp_path):
    """A table that predicts a quarter of the true latency: the first pick (the largest subnets look
    affordable) measures over budget, so the
    search runs again under a budget scaled by how far the table was off, and says so."""
    import dataclasses as dc

    rng = np.random.default_rng(1)
    cfgs = SMALL.sample_many(rng, 100)
    acc = np.array([80 + sum(c.e) / 10 + c.r / 10 + rng.normal(0, 0.05) for c in cfgs])
    predictor, _ = fit_predictor(SMALL, cfgs, acc, seed=0, epochs=20)
    predictor.save(tmp_path / "predictor")
    optimistic = dc.replace(table, block_ms=table.block_ms / 4, fixed_ms=table.fixed_ms / 4)
    optimistic.save(tmp_path / "lat.json")
    sizes = [table.predict_one(c) for c in (SMALL.min_config(), SMALL.max_config())]
    # between the smallest and largest subnet, nearer the smallest: the table is measured in a few
    # quick rounds, and at the midpoint the first pick (the max subnet) once measured under it
    budget = round(float(sizes[0] + 0.3 * (sizes[1] - sizes[0])), 4)
    from onceforall.specialization.search import EvolutionConfig

    target = parse_targets({"targets": [{"name": "t", "runtime": "onnxruntime", "constraint": {
        "kind": "latency_ms", "budget": budget / 0.9, "headroom_pct": 10}}]})[0]  # plans for `budget`
    search_target(SMALL, target, tmp_path / "predictor.safetensors",
                  tmp_path / "s", latency_path=tmp_path / "lat.json", verify_rounds=3,
                  config=EvolutionConfig(population=20, generations=10))
    v = json.loads((tmp_path / "s" / "search.json").read_text())["verification"]
    first = v["rounds"][0]
    assert first["search_budget_ms"] == pytest.approx(budget)  # the budget less its headroom
    assert first["measured_ms"] > budget and first["predicted_ms"] <= budget  # the table misled it
    assert 2 <= len(v["rounds"]) <= 3
    assert v["rounds"][1]["search_budget_ms"] < first["search_budget_ms"]
    assert v["verified"] == (v["rounds"][-1]["measured_ms"] <= budget)
    # every measurement timed the host probe, checked against the table's
    assert v["host_probe_reference_ms"] == optimistic.probe_ms
    assert all(r["host_probe_ms"] > 0 for r in v["rounds"]) and len(v["shortlist_host_probe_ms"]) == 1
    # the last round's best-scoring points are measured for the pick on validation
    pareto = json.loads((tmp_path / "s" / "search.json").read_text())["pareto"]
    measured = [p for p in pareto if "measured_ms" in p]
    assert len(measured) == min(8, len(pareto)) and all(p["measured_ms"] > 0 for p in measured)
    assert min(p["score"] for p in measured) >= max(
        [p["score"] for p in pareto if "measured_ms" not in p], default=-1.0)

    search_target(SMALL, _target("latency_ms", budget), tmp_path / "predictor.safetensors",
                  tmp_path / "s0", latency_path=tmp_path / "lat.json", verify_rounds=0,
                  config=EvolutionConfig(population=20, generations=10))
    assert "verification" not in json.loads((tmp_path / "s0" / "search.json").read_text())


def test_budget_of_max_resolves_against_the_targets_table(table, tmp_path):
    """A budget as a fraction of the max subnet's latency: in ms on this table, in search.json
    too; a fraction no subnet fits names the smallest that does."""
    from onceforall.specialization.search import EvolutionConfig
    from onceforall.specialization.specialize import resolve_budget

    def target(of_max, headroom=10):
        return parse_targets({"targets": [{"name": "t", "runtime": "onnxruntime", "constraint": {
            "kind": "latency_ms", "budget_of_max": of_max, "headroom_pct": headroom}}]})[0]

    max_ms, min_ms = (table.predict_one(c) for c in (SMALL.max_config(), SMALL.min_config()))
    resolved = resolve_budget(SMALL, target(0.6), table)
    assert resolved.constraint.budget == pytest.approx(0.6 * max_ms, rel=1e-5)
    assert resolved.constraint.search_budget == pytest.approx(0.54 * max_ms, rel=1e-5)
    assert resolve_budget(SMALL, _target("macs", 1e6), None) == _target("macs", 1e6)  # nothing to do
    with pytest.raises(UserError, match="no latency table"):
        resolve_budget(SMALL, target(0.6), None)
    low = min_ms / max_ms / 0.9  # the min subnet's share, less the headroom
    with pytest.raises(UserError) as info:
        resolve_budget(SMALL, target(low * 0.9), table)
    assert info.value.field == "constraint.budget_of_max" and "below the min subnet" in str(info.value)
    smallest = float(info.value.fix.split()[-1])
    assert low <= smallest <= low + 0.001
    assert resolve_budget(SMALL, target(smallest), table).constraint.search_budget >= min_ms

    rng = np.random.default_rng(0)
    cfgs = SMALL.sample_many(rng, 60)
    predictor, _ = fit_predictor(SMALL, cfgs, np.array([80 + sum(c.e) / 10 for c in cfgs]), seed=0,
                                 epochs=5)
    predictor.save(tmp_path / "predictor")
    table.save(tmp_path / "lat.json")
    search_target(SMALL, target(0.6), tmp_path / "predictor.safetensors", tmp_path / "s",
                  latency_path=tmp_path / "lat.json", verify_rounds=0,
                  config=EvolutionConfig(population=20, generations=5))
    doc = json.loads((tmp_path / "s" / "search.json").read_text())
    assert doc["target"]["constraint"] == resolved.constraint.to_dict()
    assert doc["budget"] == pytest.approx(resolved.constraint.search_budget)
    assert doc["best_metric"] <= doc["budget"]


def test_search_refined_on_validation_learns_what_the_predictors_data_missed(tmp_path):
    """The predictor's rows rate the smallest resolution 2 points higher than the subnets measure
    there. Validation feedback moves the search away from it; without it, it stays there."""
    from onceforall.specialization.search import EvolutionConfig
    from onceforall.specialization.specialize import Refinement

    rng = np.random.default_rng(0)
    rows = SMALL.sample_many(rng, 200)
    believed = lambda c: 80 + sum(c.e) / 10 + c.r / 10  # noqa: E731
    true = lambda c: believed(c) - 2 * (c.r == min(SMALL.resolutions))  # noqa: E731
    predictor, _ = fit_predictor(SMALL, rows, [believed(c) for c in rows], seed=0, epochs=60)
    predictor.save(tmp_path / "predictor")
    calls = []
    refine = Refinement(lambda c: calls.append(c) or true(c), rows, [believed(c) for c in rows],
                        rounds=3, per_round=4)
    target, settings = _target("macs", 600_000), EvolutionConfig(population=30, generations=20)
    blind = search_target(SMALL, target, tmp_path / "predictor.safetensors", tmp_path / "a",
                          config=settings)
    refined = search_target(SMALL, target, tmp_path / "predictor.safetensors", tmp_path / "b",
                            config=settings, refine=refine)
    assert true(refined.best) > true(blind.best) + 0.5
    doc = json.loads((tmp_path / "b" / "search.json").read_text())
    assert len(doc["refinement"]["rounds"]) == 3 and len(calls) <= 12
    assert all(m["val_acc"] == round(true(SubnetConfig.from_dict(m["config"], SMALL)), 3)
               for r in doc["refinement"]["rounds"] for m in r["measured"])
    # what it measured keeps its val_acc, on the last front (where a measured subnet is on it) and
    # on the shortlist, for the pick on validation not to measure again
    val_acc = {json.dumps(m["config"], sort_keys=True): m["val_acc"]
               for r in doc["refinement"]["rounds"] for m in r["measured"]}
    for p in doc["pareto"] + doc["shortlist"]:
        assert p.get("val_acc") == val_acc.get(json.dumps(p["config"], sort_keys=True))
    fed = [p for p in doc["shortlist"] if p["from"] == "validation feedback"]
    assert fed and all(p["metric"] <= 600_000 for p in fed)
    # and the best subnet it measured is on the shortlist the export picks from, on or off the front
    best = max((m for r in doc["refinement"]["rounds"] for m in r["measured"]), key=lambda m: m["val_acc"])
    assert best["config"] in [p["config"] for p in doc["shortlist"]]
    assert all(p["metric"] <= 600_000 for p in doc["shortlist"])
