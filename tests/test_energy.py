"""Energy per stage: the meter, the carbon intensity, and the figures in a real Prometheus."""

import socket
import time

import pytest
from prometheus_client import generate_latest

from onceforall import stages
from onceforall.infra.energy import KWH_J, Carbon, Meter, Reading, combine
from onceforall.errors import UserError
from onceforall.infra.metrics import build_registry, push_stage

TARGET = {"name": "mcu-params", "runtime": "onnxruntime",
          "constraint": {"kind": "params", "budget": 7.0e5}}


def test_carbon_intensity_spec():
    assert Carbon.parse("350") == Carbon("fixed", g_per_kwh=350.0)
    assert Carbon.parse("deu") == Carbon("country", country="DEU")
    assert Carbon.parse("USA:California") == Carbon("country", country="USA", region="california")
    for spec in ("350", "DEU", "USA:california"):
        assert Carbon.parse(Carbon.parse(spec).spec) == Carbon.parse(spec)
    for bad in ("germany", "-5", "99999", "12ab"):
        with pytest.raises(UserError, match="carbon"):
            Carbon.parse(bad)


def test_meter_reads_energy_and_says_how():
    with Meter("300") as m:
        sum(i * i for i in range(3_000_000))
    r = m.reading
    assert r.cpu_j > 0 and r.ram_j > 0 and r.total_j == pytest.approx(r.cpu_j + r.gpu_j + r.ram_j)
    assert r.emissions_g == pytest.approx(r.total_j / KWH_J * 300.0)
    assert r.methods["cpu"] in ("rapl", "model") and r.methods["gpu"] in ("nvml", "none")
    assert r.methods["ram"] == "model" and r.carbon == {"source": "fixed", "g_per_kwh": 300.0}
    with Meter("DEU") as m:
        sum(range(1_000_000))
    assert m.reading.carbon["source"] == "country" and 100 < m.reading.g_per_kwh < 1000


def test_a_stage_on_many_nodes_adds_its_ranks_energy_to_its_own():
    own = Reading(5.0, 0.0, 1.0, 6.0, 0.0008, 100.0, 480.0, {"cpu": "model", "gpu": "none", "ram": "model"})
    rank = {"cpu_j": 40.0, "gpu_j": 300.0, "ram_j": 4.0, "total_j": 344.0, "emissions_g": 0.0,
            "duration_s": 90.0, "g_per_kwh": 475.0, "methods": {"cpu": "rapl", "gpu": "nvml", "ram": "model"}}
    e = combine(own, [rank, {**rank, "rank": 1}])
    assert (e["cpu_j"], e["gpu_j"], e["ram_j"], e["total_j"]) == (85.0, 600.0, 9.0, 694.0)
    assert e["emissions_g"] == pytest.approx(694.0 / KWH_J * 480.0, abs=1e-4)  # the launcher's intensity
    assert e["duration_s"] == 100.0  # the stage's
    assert e["methods"] == {"cpu": "model+rapl", "gpu": "nvml", "ram": "model"}
    assert e["parts"] == {"launcher_j": 6.0, "ranks": 2, "ranks_j": 688.0}


def _record(**extra):
    return {"stage": "export", "target": "t", "wall_s": 2.5,
            "metrics": {"test_acc": 90.5, "latency_ms": 1.5, "macs": 4e6, "params": 6e5,
                        "val_acc_max": 91.0},
            "energy": {"cpu_j": 10.0, "gpu_j": 0.0, "ram_j": 5.0, "total_j": 15.0, "emissions_g": 0.002,
                       "g_per_kwh": 475.0, "duration_s": 2.5,
                       "methods": {"cpu": "model", "gpu": "none", "ram": "model"},
                       "carbon": {"source": "fixed", "g_per_kwh": 475.0}}, **extra}


def test_registry_names_units_and_method_labels():
    text = generate_latest(build_registry(_record())).decode()
    assert 'ofa_stage_energy_joules{component="cpu",method="model"} 10.0' in text
    assert 'ofa_stage_energy_joules{component="gpu",method="none"} 0.0' in text
    assert 'ofa_stage_energy_joules{component="total",method="model"} 15.0' in text
    assert 'ofa_stage_emissions_grams{intensity_source="fixed"} 0.002' in text
    assert "ofa_model_latency_seconds 0.0015" in text and "ofa_model_test_accuracy_percent 90.5" in text
    assert 'ofa_subnet_val_accuracy_percent{subnet="max"} 91.0' in text
    assert "ofa_stage_duration_seconds 2.5" in text


def test_pushed_figures_reach_prometheus(prometheus_stack):
    assert push_stage(_record(), "run-push", prometheus_stack.pushgateway) is None
    sel = 'run_id="run-push",stage="export",target="t"'
    got = prometheus_stack.wait_for(f'ofa_stage_energy_joules{{{sel},component="total"}}')
    assert got and float(got[0]["value"][1]) == 15.0 and got[0]["metric"]["method"] == "model"
    assert float(prometheus_stack.wait_for(f"ofa_model_latency_seconds{{{sel}}}")[0]["value"][1]) == 0.0015
    # a retried stage replaces its own group instead of adding a second one
    assert push_stage(_record(wall_s=3.5), "run-push", prometheus_stack.pushgateway) is None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = prometheus_stack.query(f"ofa_stage_duration_seconds{{{sel}}}")
        if got and float(got[0]["value"][1]) == 3.5:
            break
        time.sleep(0.5)
    assert len(got) == 1 and float(got[0]["value"][1]) == 3.5


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_pushgateway_down_never_fails_a_stage(tmp_path):
    t0 = time.monotonic()
    error = push_stage(_record(), "run-x", _closed_port(), tries=2, backoff_s=0.1)
    assert error and "pushgateway" in error and time.monotonic() - t0 < 10
    # a whole stage with an unreachable gateway: it finishes, and says so in its record
    run = stages.RunContext("run-x", "475", _closed_port())
    rec = stages.profile(TARGET, tmp_path / "p", run=run)
    assert rec["push_error"] and rec["energy"]["total_j"] > 0
    assert "metrics not pushed" in stages.report_markdown(
        {"run_id": "run-x", "targets": {}, "stages": [rec],
         "energy": stages.energy_summary([rec])})


def test_energy_summary_savings_and_break_even():
    def rec(stage, target, j, epochs=None):
        return {"stage": stage, "target": target, "wall_s": 1.0,
                "metrics": {} if epochs is None else {"epochs": epochs},
                "energy": {"cpu_j": j, "gpu_j": 0.0, "ram_j": 0.0, "total_j": j, "emissions_g": j / 1e4,
                           "g_per_kwh": 400.0, "methods": {"cpu": "model", "gpu": "none", "ram": "model"}}}
    ledger = [rec("train-teacher", None, 600.0, 2), rec("shrink-kernel", None, 400.0, 1),
              rec("train-scratch", None, 300.0, 2),
              *(rec(s, t, 25.0) for t in ("a", "b") for s in ("profile-target", "search")),
              rec("report", None, 1.0)]
    e = stages.energy_summary(ledger)
    assert e["shared_j"] == 1000.0 and e["marginal_j_per_target"] == 50.0
    s = e["savings"]
    assert s["ofa_j"] == 1100.0 and s["scratch_j"] == 600.0 and s["ratio"] == pytest.approx(600 / 1100, 1e-3)
    assert s["break_even_targets"] == pytest.approx(1000 / 250, 1e-3) and e["estimate"]
    # what it measures, in words, from the run's own stages
    assert "teacher 2 epochs, 1 shrinking phases of 1 epochs" in s["measures"]
    assert "trained alone for 2 epochs" in s["measures"]
    # what the figures imply at this scale: N = 1..100 against training alone and an estimated NAS
    im = e["implied"]
    assert [r["n"] for r in im["rows"]] == [1, 2, 4, 10, 40, 100] and im["g_per_kwh"] == 400.0
    assert im["break_even_n"]["scratch"] == pytest.approx(4.0)
    nas = 300.0 * (1 + im["nas_estimate"]["proxy_share"])
    assert im["baselines"]["nas"]["j"] == pytest.approx(nas, abs=0.05)
    assert im["break_even_n"]["nas"] == pytest.approx(1000 / (nas - 50), abs=0.01)
    n10 = im["rows"][3]
    assert n10["ofa_j"] == 1500.0 and n10["scratch_wh"] == pytest.approx(3000 / 3600, 1e-3)
    # and the committed standard-scale result, with where it comes from (or why it is pending)
    std = e["standard"]
    assert std["source"] == "docs/results/claim.json" and len(std["supernet_sha256"]) == 64
    assert ("pending" in std) != ("break_even_n" in std)
    md = stages.report_markdown({"run_id": "r", "targets": {}, "stages": ledger, "energy": e})
    assert "savings ratio (alone / OFA) at this scale: 0.55x" in md
    assert "What these figures imply at this run's scale" in md and "At the standard scale" in md
    assert std["supernet_sha256"][:12] in md


def test_report_quotes_a_measured_standard_result_with_its_provenance():
    from onceforall.infra.cost import Cost, cost_model

    model = cost_model(Cost(9000.0, 900.0), Cost(400.0, 40.0), {"scratch": Cost(3000.0, 300.0),
                                                               "nas": Cost(4500.0, 450.0)}, 475.0)
    std = stages.standard_claim({"source": "docs/results/claim.json", "command": "python bench/claim.py",
                                 "date": "2027-01-01T00:00:00+00:00", "supernet_sha256": "c" * 64,
                                 "cost": model})
    assert std["break_even_n"] == {"scratch": pytest.approx(9000 / 2600, abs=0.01),
                                   "nas": pytest.approx(9000 / 4100, abs=0.01)}
    md = "\n".join(stages._standard_lines(std))
    assert "against training alone: N = 3.5" in md and "against per-target NAS: N = 2.2" in md
    assert "cccccccccccc" in md and "2027-01-01" in md and "Pending" not in md
