"""The pipeline's stages as plain functions: what the CLI, the KFP components and the benchmarks call.

Each stage takes URIs, folders and plain values, writes its outputs into the folder it is given and
returns a record ``{"stage", "target", "wall_s", "metrics": {...}}``. Every output folder also carries
``stages.json``, the ledger of the stages that produced it (its inputs' ledgers plus its own record),
so the report at the end of a run sees every stage although it only receives the exported models.

Stages never import kfp; ``components/`` wraps each one in a ``@dsl.component``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from .data import Dataset, load_dataset, subsample
from .errors import UserError
from .schedule import Schedule, get_schedule
from .space import SearchSpace, SubnetConfig, get_space
from .targets import Target

LEDGER = "stages.json"
SHRINK_PHASES = ("kernel", "depth-1", "depth-2", "width-1", "width-2")
REPORT_JSON, REPORT_MD = "report.json", "report.md"


# -- inputs ------------------------------------------------------------------------------------

def data_cache_dir() -> Path:
    return Path(os.environ.get("OFA_CACHE", Path.home() / ".cache" / "onceforall")) / "data"


def open_data(uri: str, *, val_size: int = 5000, seed: int = 0, image_size: int | None = None) -> Dataset:
    """``fashion-mnist``, ``synthetic[:N]``, a folder, or an ``s3://`` prefix (downloaded once)."""
    from . import store

    if store.is_s3(uri):
        bucket, key = store.split_s3(uri)
        local = store.download(uri, data_cache_dir() / bucket / key.strip("/"))
        data = load_dataset(str(local), val_size=val_size, seed=seed, image_size=image_size)
        return dataclasses.replace(data, source=uri)  # the card names where the data lives
    return load_dataset(uri, val_size=val_size, seed=seed, image_size=image_size)


def check_data(space: SearchSpace, data: Dataset) -> None:
    """The dataset must fit the space: channels and number of classes."""
    if data.channels != space.in_channels:
        raise UserError(f"dataset has {data.channels} channel(s), space {space.name!r} expects "
                        f"{space.in_channels}", field="data",
                        fix="use a space whose in_channels matches the data")
    if int(data.train.labels.max()) >= space.num_classes:
        raise UserError(f"dataset has {int(data.train.labels.max()) + 1} classes, space "
                        f"{space.name!r} has {space.num_classes}", field="data",
                        fix="use a space whose num_classes matches the data")


def setup(space: str, schedule: str, data: str, *, seed: int = 0,
          val_size: int = 5000) -> tuple[SearchSpace, Schedule, Dataset]:
    """Resolve the three run inputs, failing early with one clear error each."""
    sp = get_space(space)
    sch = get_schedule(schedule)
    ds = open_data(data, val_size=val_size, seed=seed, image_size=max(sp.resolutions))
    check_data(sp, ds)
    return sp, sch, ds


# -- ledger ------------------------------------------------------------------------------------

def read_ledger(folder: str | Path) -> list[dict[str, Any]]:
    path = Path(folder) / LEDGER
    return json.loads(path.read_text()) if path.is_file() else []


def _merge(*ledgers: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Union of ledgers; the same (stage, target) recorded twice is kept once."""
    seen, out = set(), []
    for ledger in ledgers:
        for rec in ledger:
            key = (rec["stage"], rec.get("target"))
            if key not in seen:
                seen.add(key)
                out.append(rec)
    return out


def _finish(out_dir: Path, stage: str, t0: float, metrics: dict[str, Any], *,
            target: str | None = None, inputs: Iterable[str | Path] = ()) -> dict[str, Any]:
    record = {"stage": stage, "target": target, "wall_s": round(time.monotonic() - t0, 3),
              "metrics": metrics}
    ledger = _merge(*(read_ledger(p) for p in inputs), [record])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LEDGER).write_text(json.dumps(ledger, indent=1))
    return record


def _target(target: dict[str, Any] | Target) -> Target:
    return target if isinstance(target, Target) else Target.from_dict(target, where="target")


# -- training ----------------------------------------------------------------------------------

def _accuracy_metrics(val_accuracy: dict[str, float]) -> dict[str, float]:
    return {f"val_acc_{k.replace('-', '_')}": round(float(v), 3) for k, v in val_accuracy.items()}


def train_teacher(out_dir: str | Path, *, data: str = "fashion-mnist", space: str = "fashion-mnist",
                  schedule: str = "quick", seed: int = 0, device: str = "auto",
                  progress: bool = True) -> dict[str, Any]:
    """Stage train-teacher: the full network, trained alone."""
    return _train("teacher", out_dir, None, None, data, space, schedule, seed, device, progress)


def shrink(phase: str, out_dir: str | Path, *, init_dir: str | Path, teacher_dir: str | Path,
           data: str = "fashion-mnist", space: str = "fashion-mnist", schedule: str = "quick",
           seed: int = 0, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Stage shrink: one progressive-shrinking phase, from the previous phase's supernet."""
    if phase not in SHRINK_PHASES:
        raise UserError(f"unknown shrinking phase {phase!r}", field="phase",
                        fix=f"use one of {list(SHRINK_PHASES)}")
    return _train(phase, out_dir, init_dir, teacher_dir, data, space, schedule, seed, device, progress)


def _train(phase: str, out_dir, init_dir, teacher_dir, data: str, space: str, schedule: str,
           seed: int, device: str, progress: bool) -> dict[str, Any]:
    from .train import run_phase

    t0 = time.monotonic()
    sp, sch, ds = setup(space, schedule, data, seed=seed)
    kd = sch.phase(phase).kd_ratio > 0
    result = run_phase(sp, sch, phase, ds, out_dir, init=init_dir,
                       teacher=teacher_dir if kd else None, seed=seed, device=device,
                       progress=progress)
    metrics = {"epochs": result.epochs, "steps": result.steps, "train_wall_s": result.wall_s,
               "images_per_s": result.images_per_s, **_accuracy_metrics(result.val_accuracy)}
    return _finish(Path(out_dir), phase if phase == "teacher" else f"shrink-{phase}", t0, metrics,
                   inputs=[init_dir] if init_dir else [])


# -- the accuracy predictor --------------------------------------------------------------------

def fit_accuracy_predictor(supernet_dir: str | Path, out_dir: str | Path, *,
                           data: str = "fashion-mnist", schedule: str = "quick", n: int = 0,
                           seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Stage fit-accuracy-predictor: measure ``n`` stratified subnets (0: the schedule's number)
    on the validation split, then fit and judge the MLP. Resumes the measurements if cut short."""
    from .accuracy_data import collect_accuracy, load_accuracy_rows
    from .export import load_supernet
    from .predictor import fit_predictor
    from .progress import Progress

    t0 = time.monotonic()
    out_dir = Path(out_dir)
    sch = get_schedule(schedule)
    n = n or sch.predictor_subnets
    net = load_supernet(supernet_dir)
    ds = open_data(data, seed=seed, image_size=max(net.space.resolutions))
    check_data(net.space, ds)
    ds = subsample(ds, None, sch.predictor_val_images)
    bar = Progress("fit-accuracy-predictor", n, enabled=progress)
    rows = collect_accuracy(net, ds, out_dir / "accuracy.jsonl", n, seed=seed,
                            progress=lambda i, total, s: bar.update(n - total + i, **{"s/subnet": s}))
    bar.close()
    measure_s = time.monotonic() - t0
    cfgs, accs = load_accuracy_rows([rows], net.space)
    predictor, fit = fit_predictor(net.space, cfgs, accs, seed=seed)
    predictor.save(out_dir / "predictor")
    metrics = {"subnets": len(cfgs), "val_images": len(ds.val), "measure_s": round(measure_s, 2),
               "val_acc_lowest": float(accs.min()), "val_acc_highest": float(accs.max()),
               **{k: fit[k] for k in ("kendall_tau", "spearman_rho", "rmse_pts", "mae_pts")
                  if fit.get(k) is not None}}
    return _finish(out_dir, "fit-accuracy-predictor", t0, metrics, inputs=[supernet_dir])


def predictor_path(folder: str | Path) -> Path:
    return Path(folder) / "predictor"


# -- per target ------------------------------------------------------------------------------

LATENCY_TABLE = "latency.json"


def profile(target: dict[str, Any] | Target, out_dir: str | Path, *, space: str = "fashion-mnist",
            validate: int = 0, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Stage profile-target: the latency table, measured here (the pod runs on the target's nodes).

    Targets constrained by MACs or params need no table; the stage records that and returns."""
    from .progress import Progress
    from .specialize import profile_target

    t0 = time.monotonic()
    tgt = _target(target)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tgt.constraint.kind != "latency_ms":
        return _finish(out_dir, "profile-target", t0, {"latency_table": 0}, target=tgt.name)
    bar = Progress(f"profile-target {tgt.name}", 1, enabled=progress)

    def tick(i: int, total: int) -> None:
        bar.total = total
        bar.update(i)

    summary = profile_target(get_space(space), tgt, out_dir / LATENCY_TABLE, validate=validate,
                             seed=seed, progress=tick)
    bar.close()
    metrics = {"latency_table": 1, "build_s": summary["build_s"], "overhead_ms": summary["overhead_ms"]}
    for key in ("mape_pct", "kendall_tau"):
        if key in summary.get("validation", {}):
            metrics[f"latency_{key}"] = summary["validation"][key]
    return _finish(out_dir, "profile-target", t0, metrics, target=tgt.name)


def search(target: dict[str, Any] | Target, predictor_dir: str | Path, profile_dir: str | Path,
           out_dir: str | Path, *, space: str = "fashion-mnist", seed: int = 0) -> dict[str, Any]:
    """Stage search: evolution under the target's budget; ``search.json`` and the Pareto plot."""
    from .specialize import SEARCH_RESULT, pareto_plot, search_target

    t0 = time.monotonic()
    tgt = _target(target)
    out_dir = Path(out_dir)
    table = Path(profile_dir) / LATENCY_TABLE
    result = search_target(get_space(space), tgt, predictor_path(predictor_dir), out_dir,
                           latency_path=table if table.is_file() else None, seed=seed)
    doc = json.loads((out_dir / SEARCH_RESULT).read_text())
    pareto_plot(doc, out_dir / "pareto.png", out_dir / "pareto.html")
    metrics = {"search_s": doc["search_s"], "predicted_acc": round(float(result.best_score), 3),
               f"predicted_{result.metric_name}": float(result.best_metric),
               "pareto_points": len(doc["pareto"])}
    return _finish(out_dir, "search", t0, metrics, target=tgt.name, inputs=[predictor_dir, profile_dir])


def export(target: dict[str, Any] | Target, supernet_dir: str | Path, search_dir: str | Path,
           out_dir: str | Path, *, data: str = "fashion-mnist", seed: int = 0) -> dict[str, Any]:
    """Stage export: ONNX + model card of the searched subnet, verified against torch."""
    from .export import export_subnet, load_supernet
    from .specialize import SEARCH_RESULT

    t0 = time.monotonic()
    tgt = _target(target)
    out_dir = Path(out_dir)
    doc = json.loads((Path(search_dir) / SEARCH_RESULT).read_text())
    space = load_supernet(supernet_dir).space
    cfg = SubnetConfig.from_dict(doc["best"], space, str(Path(search_dir) / SEARCH_RESULT))
    ds = open_data(data, seed=seed, image_size=max(space.resolutions))
    check_data(space, ds)
    card = export_subnet(supernet_dir, cfg, ds, tgt, out_dir, predicted_accuracy=doc.get("best_score"),
                         predicted_latency_ms=doc.get("predicted_latency_ms"), seed=seed,
                         extra={"pareto": {"png": "pareto.png", "html": "pareto.html"}})
    for name in ("pareto.png", "pareto.html"):
        src = Path(search_dir) / name
        if src.is_file():
            (out_dir / name).write_bytes(src.read_bytes())
    metrics = {"test_acc": card["accuracy"]["test_top1_pct_onnxruntime"],
               "latency_ms": card["latency"]["measured_ms"], "macs": card["macs"],
               "params": card["params"], "within_budget": int(_within_budget(card, tgt))}
    return _finish(out_dir, "export", t0, metrics, target=tgt.name, inputs=[search_dir])


def _within_budget(card: dict[str, Any], target: Target) -> bool:
    kind, budget = target.constraint.kind, target.constraint.budget
    value = {"latency_ms": card["latency"]["measured_ms"], "macs": card["macs"],
             "params": card["params"]}[kind]
    return value <= budget


# -- the report ------------------------------------------------------------------------------

def report(export_dirs: list[str | Path], out_dir: str | Path, *, publish_uri: str = "",
           run_id: str = "") -> dict[str, Any]:
    """Stage report: every target's card and every stage's record in one JSON and one Markdown page.

    With ``publish_uri`` it publishes ``models/<target>/`` for every target (each model's card last),
    then the report (``report.json`` last). Publishing happens here, once every target has succeeded,
    so a run that fails anywhere publishes nothing and what an earlier run published stays intact."""
    from . import store
    from .export import CARD

    t0 = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cards = [json.loads((Path(d) / CARD).read_text()) for d in export_dirs]
    ledger = _merge(*(read_ledger(d) for d in export_dirs))
    shared = [r for r in ledger if r.get("target") is None]
    per_target = [r for r in ledger if r.get("target") is not None]
    doc = {
        "format": "onceforall-report/1",
        "run_id": run_id,
        "targets": {c["target"]["name"]: _card_summary(c) for c in cards},
        "stages": ledger,
        "wall_s": {"shared": round(sum(r["wall_s"] for r in shared), 2),
                   "per_target": {name: round(sum(r["wall_s"] for r in per_target
                                                  if r["target"] == name), 2)
                                  for name in sorted({r["target"] for r in per_target})}},
    }
    record = {"stage": "report", "target": None, "wall_s": round(time.monotonic() - t0, 3),
              "metrics": {"targets": len(cards)}}
    doc["stages"] = ledger + [record]
    (out_dir / REPORT_JSON).write_text(json.dumps(doc, indent=1))
    (out_dir / REPORT_MD).write_text(report_markdown(doc))
    if publish_uri:
        for card, folder in zip(cards, export_dirs):
            store.publish_dir(folder, store.join(publish_uri, "models", card["target"]["name"]), last=CARD)
        store.publish_dir(out_dir, publish_uri, last=REPORT_JSON)
        record["published"] = publish_uri
    return record


def _card_summary(card: dict[str, Any]) -> dict[str, Any]:
    t = card["target"]
    return {"constraint": t["constraint"]["kind"], "budget": t["constraint"]["budget"],
            "runtime": t["runtime"], "threads": t["threads"], "batch_size": t["batch_size"],
            "subnet": card["subnet"], "test_acc": card["accuracy"]["test_top1_pct_onnxruntime"],
            "predicted_acc": card["accuracy"]["predicted_val_top1_pct"],
            "latency_ms": card["latency"]["measured_ms"],
            "predicted_latency_ms": card["latency"]["predicted_ms"],
            "macs": card["macs"], "params": card["params"], "onnx_sha256": card["onnx"]["sha256"],
            "model": f"models/{t['name']}/model.onnx"}


def report_markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Once-for-All run {doc['run_id']}".rstrip(), "",
             "## Models", "",
             "| target | constraint | budget | test acc (%) | predicted acc (%) | latency (ms) | "
             "predicted (ms) | MACs | params | model |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, t in doc["targets"].items():
        pred_lat = "-" if t["predicted_latency_ms"] is None else f"{t['predicted_latency_ms']:.3f}"
        pred_acc = "-" if t["predicted_acc"] is None else f"{t['predicted_acc']:.2f}"
        lines.append(f"| {name} | {t['constraint']} | {t['budget']:g} | {t['test_acc']:.2f} | {pred_acc} | "
                     f"{t['latency_ms']:.3f} | {pred_lat} | {t['macs'] / 1e6:.2f}M | "
                     f"{t['params'] / 1e6:.3f}M | `{t['model']}` |")
    lines += ["", "## Stages", "", "| stage | target | wall (s) | figures |", "|---|---|---:|---|"]
    for r in doc["stages"]:
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in r["metrics"].items())
        lines.append(f"| {r['stage']} | {r.get('target') or '(shared)'} | {r['wall_s']:.1f} | {figures} |")
    w = doc["wall_s"]
    lines += ["", f"Shared stages: {w['shared']:.0f} s. Per target: "
              + ", ".join(f"{k} {v:.0f} s" for k, v in w["per_target"].items()) + "."]
    return "\n".join(lines) + "\n"


def log_metrics(record: dict[str, Any], metrics: Any) -> None:
    """Copy a stage record's numbers into a KFP Metrics artifact (anything with ``log_metric``)."""
    metrics.log_metric("wall_s", float(record["wall_s"]))
    for key, value in record["metrics"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, float(value))
