"""The pipeline layer: components through ``.python_func``, the compiled DAG, and ``ofa run``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kfp import dsl

from onceforall.specialization.export import CARD
from onceforall.errors import UserError
from onceforall.stages import LEDGER, REPORT_JSON, REPORT_MD, RUN_ID_ENV, SHRINK_PHASES, STAGED_MODELS
from onceforall.specialization.targets import EXAMPLE_TARGETS, load_targets
from onceforall_components import build
from onceforall_pipelines.ofa_pipeline import COMPILED, Options, compile_pipeline

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
MACS_TARGET = {"name": "phone-macs", "runtime": "onnxruntime", "threads": 1, "batch_size": 1,
               "constraint": {"kind": "macs", "budget": 4.0e6}}


def artifact(cls, path):
    return cls(name=Path(path).name, uri=str(path), metadata={})


def test_components_chain_through_python_func(tmp_path, monkeypatch):
    """Every component body, called as KFP calls it, on the smoke schedule."""
    c = build()
    monkeypatch.setenv(RUN_ID_ENV, "run-1")  # as the pod's field-path variable sets it
    run = dict(carbon="475", pushgateway="")
    data, common = "synthetic:600", dict(space="fashion-mnist", schedule="smoke", seed=0, **run)
    teacher, m0 = artifact(dsl.Model, tmp_path / "teacher"), artifact(dsl.Metrics, tmp_path / "m0")
    c.train_teacher.python_func(data=data, teacher=teacher, metrics=m0, **common)
    assert m0.metadata["epochs"] == 1 and "val_acc_max" in m0.metadata and m0.metadata["wall_s"] > 0
    assert m0.metadata["energy_total_j"] > 0 and m0.metadata["emissions_g"] > 0
    # its checkpoints also went next to its output artifact (durable: a retried pod resumes there)
    durable = json.loads((tmp_path / "teacher.checkpoints" / "latest.json").read_text())
    assert durable["phase"] == "teacher" and durable["completed"]

    scratch, ms = artifact(dsl.Model, tmp_path / "scratch"), artifact(dsl.Metrics, tmp_path / "ms")
    c.train_scratch.python_func(data=data, model=scratch, metrics=ms, **common)
    assert (tmp_path / "scratch" / "model.safetensors").is_file() and ms.metadata["energy_total_j"] > 0

    kernel, m1 = artifact(dsl.Model, tmp_path / "kernel"), artifact(dsl.Metrics, tmp_path / "m1")
    c.shrink.python_func(phase="kernel", data=data, init=teacher, teacher=teacher, supernet=kernel,
                         metrics=m1, **common)
    ledger = json.loads((tmp_path / "kernel" / LEDGER).read_text())
    assert [r["stage"] for r in ledger] == ["train-teacher", "shrink-kernel"]

    pred, rows, m2 = (artifact(dsl.Model, tmp_path / "pred"), artifact(dsl.Dataset, tmp_path / "rows"),
                      artifact(dsl.Metrics, tmp_path / "m2"))
    c.fit_accuracy_predictor.python_func(data=data, schedule="smoke", seed=0, subnets=0, supernet=kernel,
                                         predictor=pred, accuracy_data=rows, metrics=m2, **run)
    assert len((tmp_path / "rows").read_text().splitlines()) == 24  # the smoke schedule's number
    assert m2.metadata["subnets"] == 24 and -1 <= m2.metadata["kendall_tau"] <= 1
    assert 0 <= m2.metadata["mae_pts"] <= m2.metadata["rmse_pts"]  # named as the gauges are

    lat, m3 = artifact(dsl.Dataset, tmp_path / "lat"), artifact(dsl.Metrics, tmp_path / "m3")
    c.profile_target.python_func(target=MACS_TARGET, space="fashion-mnist", seed=0, latency=lat,
                                 metrics=m3, **run)
    assert m3.metadata["latency_table"] == 0  # a MACs budget needs no measurements

    found, html, m4 = (artifact(dsl.Dataset, tmp_path / "found"), artifact(dsl.HTML, tmp_path / "p.html"),
                       artifact(dsl.Metrics, tmp_path / "m4"))
    c.search.python_func(target=MACS_TARGET, space="fashion-mnist", data=data, schedule="smoke", seed=0,
                         predictor=pred, latency=lat, supernet=kernel, result=found, pareto=html,
                         metrics=m4, **run)
    assert m4.metadata["predicted_macs"] <= 4.0e6 and "<img" in (tmp_path / "p.html").read_text()
    # validation feedback from the supernet: its rounds are in search.json, their best in the metrics
    refined = json.loads((tmp_path / "found" / "search.json").read_text())["refinement"]
    assert len(refined["rounds"]) == 1 and refined["rows"] == 24  # the smoke schedule's numbers
    assert m4.metadata["refine_best_val_acc"] == refined["rounds"][-1]["best_val_acc"]

    model, card, m5 = (artifact(dsl.Model, tmp_path / "model"), artifact(dsl.Markdown, tmp_path / "c.md"),
                       artifact(dsl.Metrics, tmp_path / "m5"))
    c.export.python_func(target=MACS_TARGET, data=data, seed=0, supernet=kernel, search=found, model=model,
                         card=card, metrics=m5, **run)
    assert (tmp_path / "model" / "model.onnx").is_file() and "phone-macs" in (tmp_path / "c.md").read_text()
    assert m5.metadata["within_budget"] == 1 and m5.metadata["macs"] <= 4.0e6
    assert not (tmp_path / "pub").exists()  # nothing is published before the report

    # placement: the loop item's fields, checked, as task outputs for the pods' nodeSelectorJson
    placed = c.placement.python_func(node_selector={"kubernetes.io/arch": "arm64"},
                                     tolerations=[{"key": "edge", "operator": "Exists"}])
    assert placed.node_selector == {"kubernetes.io/arch": "arm64"} and len(placed.tolerations) == 1
    with pytest.raises(UserError, match="placement.tolerations"):
        c.placement.python_func(node_selector={}, tolerations=[{"colour": "red"}])

    # the run's own folder holds the run id as a folder, as the backend's output URIs do
    run_dir = tmp_path / "root" / "onceforall" / "run-1"
    receipt = artifact(dsl.Artifact, run_dir / "stage-model" / "3f2a" / "receipt")
    receipt_path = Path(receipt.uri)
    receipt_path.parent.mkdir(parents=True)
    c.stage_model.python_func(target=MACS_TARGET, model=model, receipt=receipt)
    staged = run_dir / STAGED_MODELS / "phone-macs"
    assert (staged / CARD).is_file() and receipt_path.read_text().strip() == str(staged)

    summary, md, m6 = (artifact(dsl.Dataset, run_dir / "report" / "9c1e" / "summary"),
                       artifact(dsl.Markdown, tmp_path / "r.md"), artifact(dsl.Metrics, tmp_path / "m6"))
    with pytest.raises(UserError, match="no staged model for target 'edge'"):
        c.report.python_func(publish_uri=str(tmp_path / "pub"), targets=[{"name": "edge"}], scratch=scratch,
                             report=md, summary=summary, metrics=m6, **run)
    c.report.python_func(publish_uri=str(tmp_path / "pub"), targets=[{"name": "phone-macs"}],
                         scratch=scratch, report=md, summary=summary, metrics=m6, **run)
    published = tmp_path / "pub" / "models" / "phone-macs"
    assert (published / "model.onnx").read_bytes() == (tmp_path / "model" / "model.onnx").read_bytes()
    assert (published / CARD).is_file()
    current = json.loads((tmp_path / "pub" / "current.json").read_text())  # the run's release, whole
    assert current["release"] == "run-1" and (tmp_path / "pub" / "releases" / "run-1" / REPORT_JSON).is_file()
    doc = json.loads((tmp_path / "pub" / REPORT_JSON).read_text())
    assert doc["run_id"] == "run-1" and set(doc["targets"]) == {"phone-macs"}
    assert [r["stage"] for r in doc["stages"]] == ["train-teacher", "shrink-kernel", "fit-accuracy-predictor",
                                                  "profile-target", "search", "export", "train-scratch"]
    energy = doc["energy"]
    assert energy["per_target"]["phone-macs"]["energy_j"] > 0 and energy["shared_j"] > 0
    assert energy["savings"]["targets"] == 1 and energy["savings"]["scratch_per_target_j"] > 0
    assert set(energy["methods"]) <= {"rapl", "nvml", "model"}
    card_energy = json.loads((published / CARD).read_text())["energy"]
    assert {"train-teacher", "shrink-kernel", "search:phone-macs"} <= set(card_energy["stages"])
    text = (tmp_path / "pub" / REPORT_MD).read_text()
    assert "phone-macs" in text and "Energy and CO2 per stage" in text and "savings ratio" in text


def test_compiled_pipeline_is_committed_and_fresh(tmp_path):
    fresh = compile_pipeline(tmp_path / "p.yaml")
    assert COMPILED.is_file(), "run `ofa compile` and commit pipelines/onceforall.yaml"
    assert fresh.read_text() == COMPILED.read_text(), \
        "pipelines/onceforall.yaml is stale: run `ofa compile` and commit it"


def _spec(path):
    docs = list(yaml.safe_load_all(Path(path).read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def test_dag_shape_and_cluster_settings(tmp_path):
    spec, platform = _spec(compile_pipeline(tmp_path / "gpu.yaml", Options(gpus=1, image="reg/x:1")))
    root = spec["root"]["dag"]["tasks"]
    chain = ["train-teacher", *(f"shrink-{p}" for p in SHRINK_PHASES)]
    names = {t["taskInfo"]["name"] for t in root.values()}
    assert set(chain) | {"fit-accuracy-predictor", "report"} <= names
    for prev, nxt in zip(chain, chain[1:]):  # phases chained
        task = next(t for t in root.values() if t["taskInfo"]["name"] == nxt)
        assert any(prev_key in task.get("dependentTasks", []) for prev_key, t in root.items()
                   if t["taskInfo"]["name"] == prev)
    loop = next(t for t in root.values() if "parameterIterator" in t)
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("targets")
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert {t["taskInfo"]["name"] for t in body.values()} == {"placement", "profile-target", "search",
                                                              "export", "stage-model"}
    report = next(t for t in root.values() if t["taskInfo"]["name"] == "report")
    assert "models" not in report["inputs"].get("artifacts", {})  # no fan-in: backends < 2.14 have none
    assert loop["taskInfo"]["name"] in report["dependentTasks"]
    uncached = {"stage-model", "report"}  # they act on this run's folder
    for task in [*root.values(), *body.values()]:
        if "componentRef" in task and "parameterIterator" not in task:
            assert task["retryPolicy"]["maxRetryCount"] == 2
            cached = task["cachingOptions"].get("enableCache", False)
            assert cached == (task["taskInfo"]["name"] not in uncached)
    executors = spec["deploymentSpec"]["executors"]
    for name, ex in executors.items():
        assert ex["container"]["image"] == "reg/x:1"
        small = name in ("exec-placement", "exec-stage-model")
        assert ex["container"]["resources"]["resourceCpuRequest"] == ("500m" if small else "2")
    for name in ("exec-train-teacher", "exec-fit-accuracy-predictor"):
        assert executors[name]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    for name in ("exec-profile-target", "exec-search", "exec-export"):  # the target's nodes: none
        assert "accelerator" not in executors[name]["container"]["resources"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-profile-target", "exec-search", "exec-export"):  # measure on the target
        res = executors[name]["container"]["resources"]
        assert res["resourceCpuLimit"] == res["resourceCpuRequest"] == "2"  # Guaranteed, whole cores
        for field in (k8s[name]["nodeSelector"]["nodeSelectorJson"],
                      k8s[name]["tolerations"][0]["tolerationJson"]):
            assert field["taskOutputParameter"]["producerTask"] == "placement"
    for name, ex in k8s.items():
        assert ex["fieldPathAsEnv"] == [{"name": RUN_ID_ENV,
                                         "fieldPath": "metadata.labels['pipeline/runid']"}]
        assert not any(e.get("optional") for e in ex["secretAsEnv"])  # dropped by backends < 2.15


def ofa(*args, env=None, timeout=1500):
    return subprocess.run([sys.executable, "-m", "onceforall", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


TRAINING = ("train-teacher", "shrink", "train-scratch", "fit-accuracy-predictor")


def _started(stderr: str) -> list[str]:
    """The tasks a run started (kfp.local logs a cache hit below its log level: a hit never starts)."""
    return [line.split("Executing task '")[1].split("'")[0] for line in stderr.splitlines()
            if "Executing task '" in line]


@pytest.mark.slow
def test_second_run_with_one_more_target_reuses_every_training_stage(tmp_path):
    """Caching across runs (issue #20): the run id reaches the stages from the environment, not as a
    parameter, so a second `ofa run --cache` with one more target trains nothing and runs the new
    target's branch only. Budget targets (no latency table to measure) on synthetic data."""
    def targets(*names):
        path = tmp_path / f"{len(names)}.yaml"
        path.write_text(yaml.safe_dump({"targets": [
            {"name": n, "runtime": "onnxruntime", "threads": 1, "batch_size": 1,
             "constraint": {"kind": "params", "budget": b}} for n, b in names]}))
        return str(path)

    one, two = targets(("small", 700_000)), targets(("small", 700_000), ("large", 1_500_000))
    common = ("--schedule", "smoke", "--data", "synthetic:600", "--out", str(tmp_path / "published"),
              "--pipeline-root", str(tmp_path / "root"), "--cache")
    first = ofa("run", *common, "--targets", one, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert set(TRAINING) <= set(_started(first.stderr))
    second = ofa("run", *common, "--targets", two, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    started = _started(second.stderr)
    assert not [t for t in started if t.startswith(TRAINING)], started
    # the new target's branch, both targets' staging (never cached) and the report
    assert sorted(started) == sorted(["profile-target", "search", "export", "stage-model", "stage-model",
                                      "report"]), started
    doc = json.loads((tmp_path / "published" / REPORT_JSON).read_text())
    assert set(doc["targets"]) == {"small", "large"}
    for name in ("small", "large"):
        assert (tmp_path / "published" / "models" / name / "model.onnx").is_file()


# The runner of the end-to-end run: `make test` uses the subprocess runner; CI (`make test-containers`,
# after `make image`) runs the same test with every stage in the image (tests/test_containers.py
# checks what only that runner does), so the smoke pipeline runs once per CI run.
E2E_RUNNER = os.environ.get("OFA_E2E_RUNNER", "subprocess")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_ofa_run_smoke_end_to_end(tmp_path, prometheus_stack):
    """The README's main command on the smoke schedule, with every stage pushing to a real
    Pushgateway that a real Prometheus scrapes."""
    out, root = tmp_path / "published", tmp_path / "root"
    proc = ofa("run", "--schedule", "smoke", "--out", str(out), "--pipeline-root", str(root),
               "--pushgateway", prometheus_stack.pushgateway, "--runner", E2E_RUNNER, "--cache",
               timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = ("train-teacher", "train-scratch", "fit-accuracy-predictor", "shrink")
    assert all(f"Executing task '{name}'" in proc.stderr for name in shared)
    if E2E_RUNNER == "container":
        from test_containers import check_container_run

        check_container_run(proc, out, root)
    for name in ("edge-cpu-1t", "server-cpu-2t", "phone-macs", "mcu-params"):
        card = json.loads((out / "models" / name / CARD).read_text())
        assert (out / "models" / name / "model.onnx").is_file() and card["target"]["name"] == name
        # the latency targets' budget_of_max, resolved against their own tables, in ms on the card
        assert card["target"]["constraint"]["budget"] > 0
    edge = next(t for t in load_targets(EXAMPLE_TARGETS) if t.name == "edge-cpu-1t").constraint
    card = json.loads((out / "models" / "edge-cpu-1t" / CARD).read_text())["target"]["constraint"]
    assert edge.budget_of_max is not None and card["budget_of_max"] == edge.budget_of_max
    doc = json.loads((out / REPORT_JSON).read_text())
    assert len(doc["targets"]) == 4 and (out / REPORT_MD).is_file()
    # the terminal shows stages and progress, not kfp's executor dumps
    assert "Executing task" in proc.stderr and "train-teacher" in proc.stderr
    assert "executor_input" not in proc.stderr

    # Prometheus has every stage's figures, labelled with the run, the stage and the target
    run = doc["run_id"]
    targets = ["edge-cpu-1t", "server-cpu-2t", "phone-macs", "mcu-params"]
    expected = {(s, "shared") for s in ("train-teacher", *(f"shrink-{p}" for p in SHRINK_PHASES),
                                        "train-scratch", "fit-accuracy-predictor", "report")}
    expected |= {(s, t) for s in ("profile-target", "search", "export") for t in targets}
    energy = prometheus_stack.wait_for(f'ofa_stage_energy_joules{{run_id="{run}",component="total"}}',
                                       n=len(expected))
    assert {(r["metric"]["stage"], r["metric"]["target"]) for r in energy} == expected
    assert all(float(r["value"][1]) > 0 and r["metric"]["method"] in ("rapl", "nvml", "model")
               for r in energy)
    every = len(expected)
    for metric, n in (("ofa_stage_emissions_grams", every), ("ofa_stage_duration_seconds", every),
                      ("ofa_train_images_per_second", 7), ("ofa_search_duration_seconds", 4),
                      ("ofa_model_latency_seconds", 4), ("ofa_model_test_accuracy_percent", 4)):
        assert len(prometheus_stack.query(f'{metric}{{run_id="{run}"}}')) == n, metric
    assert {r["metric"]["subnet"] for r in prometheus_stack.query(
        f'ofa_subnet_val_accuracy_percent{{run_id="{run}",stage="shrink-width-2"}}')} >= {"max", "min"}
    # ... and the report has the same numbers, with the savings against training from scratch
    assert doc["energy"]["savings"]["targets"] == 4 and "savings ratio" in (out / REPORT_MD).read_text()
