"""The pipeline's stages as plain functions: what the CLI, the KFP components and the benchmarks call.

Each stage takes URIs, folders and plain values, writes its outputs into the folder it is given and
returns a record ``{"stage", "target", "run_id", "wall_s", "energy": {...}, "metrics": {...}}``: its
energy is metered (energy.py) and its figures pushed to a Pushgateway when one is set (metrics.py).
Every output folder also carries ``stages.json``, the ledger of the stages that produced it (its
inputs' ledgers plus its own record), so the report at the end of a run sees every stage although it
only receives the exported models.

Stages never import kfp; ``components/`` wraps each one in a ``@dsl.component``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .data import Dataset, load_dataset, subsample
from .errors import UserError
from .training.launch import Launch
from .training.schedule import Schedule, get_schedule
from .supernet.space import SearchSpace, SubnetConfig, get_space
from .specialization.targets import Target

log = logging.getLogger(__name__)

LEDGER = "stages.json"
SHRINK_PHASES = ("kernel", "depth-1", "depth-2", "width-1", "width-2")
REPORT_JSON, REPORT_MD = "report.json", "report.md"


# -- inputs ------------------------------------------------------------------------------------

def data_cache_dir() -> Path:
    return Path(os.environ.get("OFA_CACHE", Path.home() / ".cache" / "onceforall")) / "data"


def open_data(uri: str, *, val_size: int = 5000, seed: int = 0, image_size: int | None = None) -> Dataset:
    """``fashion-mnist``, ``synthetic[:N]``, a folder, or an ``s3://`` prefix (downloaded once)."""
    from .infra import store

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
    rows = getattr(data, "head", ())
    if rows and max(rows) >= space.num_classes:
        raise UserError(f"dataset names classifier row {max(rows)}, space {space.name!r} has "
                        f"{space.num_classes} classes", source=data.source, field="classes",
                        fix="list at most num_classes classes in classes.txt")
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
    if len(ds.train) < sch.batch_size:  # what every training stage would fail on, said before any runs
        raise UserError(f"{len(ds.train)} training images (after the {len(ds.val)} held out for "
                        f"validation) are fewer than one batch of {sch.batch_size} (schedule {sch.name!r})",
                        source=data, field="data", fix="use more images, or a schedule with a smaller batch")
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


#: The environment variable that carries the run's id into every stage. On a cluster the pipeline
#: sets it from the pod's ``pipeline/runid`` label (a field-path variable: the value never enters a
#: task's parameters, so it never enters a cache key); ``ofa run`` sets it for its local runs.
RUN_ID_ENV = "OFA_RUN_ID"


@dataclass(frozen=True)
class RunContext:
    """What every stage of a run shares: its id (metric labels), carbon intensity, Pushgateway."""

    run_id: str = ""
    carbon: str | None = None  # g CO2e/kWh or an ISO 3166 alpha-3 country[:region]; see energy.py
    pushgateway: str | None = None  # HOST:PORT; default: $OFA_PUSHGATEWAY; "" and unset: no push

    @classmethod
    def from_env(cls, carbon: str | None = None, pushgateway: str | None = None) -> "RunContext":
        """The context of a stage running as a pipeline task: the run id from ``$OFA_RUN_ID``."""
        return cls(os.environ.get(RUN_ID_ENV, ""), carbon, pushgateway)


@contextlib.contextmanager
def _stage(name: str, out_dir: str | Path, run: RunContext, *, target: str | None = None,
           inputs: Iterable[str | Path] = ()) -> Iterator[dict[str, Any]]:
    """Meter the body's energy; then write the ledger and push the figures. The body fills
    ``record["metrics"]``."""
    from .infra.energy import Meter, combine
    from .infra.metrics import push_stage

    record: dict[str, Any] = {"stage": name, "target": target, "run_id": run.run_id, "metrics": {}}
    t0 = time.monotonic()
    with Meter(run.carbon) as meter:
        yield record
    record["wall_s"] = round(time.monotonic() - t0, 3)
    ranks = record.pop("rank_energy", None)  # a multi-node stage's: its TrainJob's ranks metered themselves
    record["energy"] = combine(meter.reading, ranks) if ranks else meter.reading.to_dict()
    push_error = push_stage(record, run.run_id, run.pushgateway)
    if push_error:
        record["push_error"] = push_error
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ledger = _merge(*(read_ledger(p) for p in inputs), [record])
    (out / LEDGER).write_text(json.dumps(ledger, indent=1))


def _target(target: dict[str, Any] | Target) -> Target:
    return target if isinstance(target, Target) else Target.from_dict(target, where="target")


# -- training ----------------------------------------------------------------------------------

def _accuracy_metrics(val_accuracy: dict[str, float]) -> dict[str, float]:
    return {f"val_acc_{k.replace('-', '_')}": round(float(v), 3) for k, v in val_accuracy.items()}


def checkpoint_uri_for(output_uri: str) -> str | None:
    """Where a training component keeps its durable checkpoints: ``<its output artifact's URI>.checkpoints``.

    KFP's driver fixes a task's output URIs once, before the pod starts (kubeflow/pipelines,
    backend/src/v2/driver: ``provisionOutputs(pipelineRoot, taskName, outputs, uuid.NewString(), ..)``
    in driver.go at 2.4.1 and 2.5.0, container.go at 2.17.0), and passes them in the pod spec patch
    as ``--executor_input``. argocompiler/container.go puts the task's retryStrategy on the executor
    template, which takes that patch as an input: a retried pod of the task gets the same URIs; a
    new run, or the same task in another run, gets new ones. (That retryStrategy sets no Argo
    retryPolicy, so Argo's default, OnFailure, applies (argo-workflows docs/retries.md): a pod that
    failed, an OOM kill or a node's graceful shutdown, is retried; a deleted pod (a drain's, a lost
    node's) is an Error and is not.) ``minio://`` (KFP's default pipeline root)
    is S3 at the same bucket and key; a local path (kfp.local) is a folder. Other schemes (``gs://``)
    are not spoken by onceforall.infra.store: None, and the phase keeps its checkpoints in its pod only.
    """
    from .infra import store

    if output_uri.startswith("minio://"):
        output_uri = "s3://" + output_uri[len("minio://"):]
    if "://" in output_uri and not store.is_s3(output_uri):
        log.warning("no durable checkpoints: %s is not s3://, minio:// or a local path", output_uri)
        return None
    return output_uri.rstrip("/") + ".checkpoints"


def train_teacher(out_dir: str | Path, *, data: str = "fashion-mnist", space: str = "fashion-mnist",
                  schedule: str = "quick", seed: int = 0, device: str = "auto", progress: bool = True,
                  run: RunContext = RunContext(), checkpoint_uri: str | None = None,
                  launch: Launch = Launch()) -> dict[str, Any]:
    """Stage train-teacher: the full network, trained alone. ``checkpoint_uri``: durable storage for
    its mid-phase checkpoints, and where a restarted stage resumes from (train.run_phase).
    ``launch``: how many processes and nodes it trains on (launch.py; default one process)."""
    return _train("teacher", out_dir, None, None, data, space, schedule, seed, device, progress, run,
                  checkpoint_uri, launch)


def shrink(phase: str, out_dir: str | Path, *, init_dir: str | Path, teacher_dir: str | Path,
           data: str = "fashion-mnist", space: str = "fashion-mnist", schedule: str = "quick",
           seed: int = 0, device: str = "auto", progress: bool = True,
           run: RunContext = RunContext(), checkpoint_uri: str | None = None,
           launch: Launch = Launch()) -> dict[str, Any]:
    """Stage shrink: one progressive-shrinking phase, from the previous phase's supernet
    (``checkpoint_uri`` and ``launch`` as in train_teacher)."""
    if phase not in SHRINK_PHASES:
        raise UserError(f"unknown shrinking phase {phase!r}", field="phase",
                        fix=f"use one of {list(SHRINK_PHASES)}")
    return _train(phase, out_dir, init_dir, teacher_dir, data, space, schedule, seed, device, progress,
                  run, checkpoint_uri, launch)


def _train(phase: str, out_dir, init_dir, teacher_dir, data: str, space: str, schedule: str,
           seed: int, device: str, progress: bool, run: RunContext,
           checkpoint_uri: str | None, launch: Launch) -> dict[str, Any]:
    from .training import launch as launcher

    name = "train-teacher" if phase == "teacher" else f"shrink-{phase}"
    with _stage(name, out_dir, run, inputs=[init_dir] if init_dir else []) as record:
        kd = get_schedule(schedule).phase(phase).kd_ratio > 0
        spec = launcher.phase_spec(phase, out_dir, init=init_dir, teacher=teacher_dir if kd else None,
                                   data=data, space=space, schedule=schedule, seed=seed, device=device,
                                   progress=progress, checkpoint_uri=checkpoint_uri)
        result = _launched(spec, launch, record)
        record["metrics"] = {"epochs": result["epochs"], "steps": result["steps"],
                             "train_wall_s": result["wall_s"], "images_per_s": result["images_per_s"],
                             **_accuracy_metrics(result["val_accuracy"])}
        if launch.world > 1:
            record["metrics"]["ranks"] = launch.world
    return record


def _launched(spec: dict[str, Any], launch: Launch, record: dict[str, Any]) -> dict[str, Any]:
    """Run a training spec on ``launch``'s processes; a TrainJob's ranks' energy readings go to the
    stage's record (``_stage`` adds them to its own meter's)."""
    from .training import launch as launcher

    result = launcher.run(spec, launch)
    if result.get("rank_energy"):
        record["rank_energy"] = result["rank_energy"]
    return result


def scratch_config(space: SearchSpace) -> SubnetConfig:
    """The architecture the from-scratch baseline trains: the space's middle subnet."""
    from .training.train import reference_configs

    return reference_configs(space)["mid"]


def train_scratch(out_dir: str | Path, *, data: str = "fashion-mnist", space: str = "fashion-mnist",
                  schedule: str = "quick", seed: int = 0, device: str = "auto", progress: bool = True,
                  run: RunContext = RunContext(), checkpoint_uri: str | None = None,
                  launch: Launch = Launch()) -> dict[str, Any]:
    """Stage train-scratch: one architecture (the middle subnet) trained alone, from scratch, on the
    teacher's recipe, and metered like every stage: what one more target costs without OFA.
    ``checkpoint_uri`` and ``launch`` as in train_teacher."""
    from .training import launch as launcher

    with _stage("train-scratch", out_dir, run) as record:
        spec = launcher.scratch_spec(out_dir, data=data, space=space, schedule=schedule, seed=seed,
                                     device=device, progress=progress, checkpoint_uri=checkpoint_uri)
        result = _launched(spec, launch, record)
        record["metrics"] = {"epochs": result["epochs"], "train_wall_s": result["train_wall_s"],
                             "images_per_s": result["images_per_s"], "val_acc_scratch": result["val_acc"]}
        record["config"] = result["config"]
    return record


# -- a supernet from elsewhere (specialize-only runs) -------------------------------------------

def supernet_space(uri: str) -> SearchSpace:
    """The search space of the checkpoint folder at ``uri`` (a folder or s3://), from its sidecar
    alone: what a specialize-only run checks its inputs against before anything starts."""
    from .infra import store
    from .supernet.checkpoint import FORMAT, SIDECAR

    where = store.join(uri, SIDECAR)
    if not store.exists(where):
        raise UserError("no checkpoint here (checkpoint.json is missing)", source=uri, field="supernet",
                        fix="give the folder that `ofa import-official` or a training phase wrote")
    try:
        meta = json.loads(store.read_text(where))
    except json.JSONDecodeError as exc:
        raise UserError(f"not valid JSON ({exc})", source=where, field="supernet",
                        fix="copy the checkpoint folder again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "space" not in meta:
        raise UserError("not a checkpoint of this project", source=where, field="format",
                        fix=f"convert it first (ofa import-official) into {FORMAT}")
    return SearchSpace.from_dict(meta["space"], where)


def open_supernet(uri: str, out_dir: str | Path, *, run: RunContext = RunContext()) -> dict[str, Any]:
    """Stage open-supernet: copy the checkpoint folder at ``uri`` (local or s3://; the files its
    sidecar names) into ``out_dir`` and load it, which checks every file's sha256. The record's
    ``space`` is the checkpoint's search space (what the stages after it specialize over).

    The supernet's own history (its training stages, if any) stays out of this run's ledger: this
    run did not pay for it, and the report says so."""
    from .infra import store
    from .supernet.checkpoint import SIDECAR, load_checkpoint

    space = supernet_space(uri)
    out_dir = Path(out_dir)
    with _stage("open-supernet", out_dir, run) as record:
        import shutil

        meta = json.loads(store.read_text(store.join(uri, SIDECAR)))
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (*meta.get("files", {}), SIDECAR):
            if store.is_s3(uri):
                store.download(store.join(uri, name), out_dir)
            elif Path(uri).resolve() != out_dir.resolve():
                shutil.copyfile(store.download(store.join(uri, name), out_dir), out_dir / name)
        ckpt = load_checkpoint(out_dir, space=space)
        record["source"] = {"uri": uri, "sha256": meta["files"], "phase": meta.get("phase"),
                            **({"imported_from": meta["imported_from"]} if "imported_from" in meta else {})}
        record["metrics"] = {"tensors": len(ckpt.weights),
                             "parameters": int(sum(t.numel() for t in ckpt.weights.values()))}
        record["space"] = space.to_dict()
    return record


# -- the accuracy predictor --------------------------------------------------------------------

def fit_accuracy_predictor(supernet_dir: str | Path, out_dir: str | Path, *,
                           data: str = "fashion-mnist", schedule: str = "quick", n: int = 0,
                           seed: int = 0, device: str = "auto", progress: bool = True,
                           run: RunContext = RunContext()) -> dict[str, Any]:
    """Stage fit-accuracy-predictor: measure ``n`` stratified subnets (0: the schedule's number)
    on the validation split, then fit and judge the MLP. Resumes the measurements if cut short.

    ``device`` (dist.eval_devices): by default every GPU the pod has, one process each (a share of
    the subnets apiece), else the CPU."""
    from .specialization.accuracy_data import collect_accuracy_on, load_accuracy_rows
    from .training.dist import eval_devices
    from .specialization.predictor import fit_predictor
    from .progress import Progress

    out_dir = Path(out_dir)
    with _stage("fit-accuracy-predictor", out_dir, run, inputs=[supernet_dir]) as record:
        t0 = time.monotonic()
        sch = get_schedule(schedule)
        n = n or sch.predictor_subnets
        devices = eval_devices(device)
        open_inputs = functools.partial(_predictor_inputs, supernet_dir, data, seed, sch.predictor_val_images)
        net, ds = open_inputs()
        bar = Progress("fit-accuracy-predictor", n, enabled=progress)
        rows = collect_accuracy_on(
            devices, open_inputs, out_dir / ACCURACY_ROWS, n, opened=(net, ds), seed=seed,
            progress=lambda i, total, s: bar.update(n - total + i, **{"s/subnet": s}))
        bar.close()
        measure_s = time.monotonic() - t0
        cfgs, accs = load_accuracy_rows([rows], net.space)
        predictor, fit = fit_predictor(net.space, cfgs, accs, seed=seed)
        predictor.save(predictor_path(out_dir))
        record["metrics"] = {
            "subnets": len(cfgs), "val_images": len(ds.val), "measure_s": round(measure_s, 2),
            "devices": len(devices),
            "val_acc_lowest": float(accs.min()), "val_acc_highest": float(accs.max()),
            **{name: fit[k] for name, k in (("kendall_tau", "kendall_tau"),
                                            ("spearman_rho", "spearman_rho"),
                                            ("rmse_pts", "rmse"), ("mae_pts", "mae"))
               if fit.get(k) is not None}}
        record["devices"] = devices
    return record


def _predictor_inputs(supernet_dir: str | Path, data: str, seed: int, val_images: int | None):
    """The supernet and the validation images its subnets are measured on (every process that
    measures opens its own)."""
    from .specialization.export import load_supernet

    net = load_supernet(supernet_dir)
    ds = open_data(data, seed=seed, image_size=max(net.space.resolutions))
    check_data(net.space, ds)
    return net, subsample(ds, None, val_images)


ACCURACY_ROWS = "accuracy.jsonl"  # beside the predictor: the measured subnets it was fit on


def predictor_path(folder: str | Path) -> Path:
    return Path(folder) / "predictor"


# -- per target ------------------------------------------------------------------------------

LATENCY_TABLE = "latency.json"


def profile(target: dict[str, Any] | Target, out_dir: str | Path, *, space: str = "fashion-mnist",
            schedule: str = "quick", validate: int = 0, seed: int = 0, progress: bool = True,
            run: RunContext = RunContext()) -> dict[str, Any]:
    """Stage profile-target: the latency table, measured here (the pod runs on the target's nodes)
    as thoroughly as the ``schedule`` says (latency_copies, latency_rounds, latency_window_s).

    Targets constrained by MACs or params need no table; the stage records that and returns."""
    from .progress import Progress
    from .specialization.specialize import profile_target

    tgt = _target(target)
    out_dir = Path(out_dir)
    with _stage("profile-target", out_dir, run, target=tgt.name) as record:
        out_dir.mkdir(parents=True, exist_ok=True)
        record["metrics"] = {"latency_table": 0}
        if tgt.constraint.kind == "latency_ms":
            bar = Progress(f"profile-target {tgt.name}", 1, enabled=progress)

            def tick(i: int, total: int) -> None:
                bar.total = total
                bar.update(i)

            sch = get_schedule(schedule)
            summary = profile_target(get_space(space), tgt, out_dir / LATENCY_TABLE, validate=validate,
                                     seed=seed, copies=sch.latency_copies, rounds=sch.latency_rounds,
                                     window_s=sch.latency_window_s, progress=tick)
            bar.close()
            record["metrics"] = {"latency_table": 1, "build_s": summary["build_s"],
                                 "overhead_ms": summary["overhead_ms"]}
            for key in ("mape_pct", "kendall_tau"):
                if key in summary.get("validation", {}):
                    record["metrics"][f"latency_{key}"] = summary["validation"][key]
    return record


def search(target: dict[str, Any] | Target, predictor_dir: str | Path, profile_dir: str | Path,
           out_dir: str | Path, *, space: str = "fashion-mnist", seed: int = 0,
           supernet_dir: str | Path | None = None, data: str = "fashion-mnist", schedule: str = "quick",
           refine_rounds: int | None = None, device: str = "auto",
           run: RunContext = RunContext()) -> dict[str, Any]:
    """Stage search: evolution under the target's budget; ``search.json`` and the Pareto plot.

    With ``supernet_dir``, the search takes validation feedback (specialize.Refinement):
    ``refine_rounds`` times (None: ``schedule``'s) it measures its best points on the validation
    images the predictor's rows were measured on (``schedule``'s), on ``device`` (train.pick_device),
    and fits the predictor again on them and those rows (``accuracy.jsonl`` beside it)."""
    from .specialization.specialize import SEARCH_RESULT, pareto_plot, search_target

    tgt = _target(target)
    out_dir = Path(out_dir)
    with _stage("search", out_dir, run, target=tgt.name, inputs=[predictor_dir, profile_dir]) as record:
        table = Path(profile_dir) / LATENCY_TABLE
        sch = get_schedule(schedule)
        rounds = sch.refine_rounds if refine_rounds is None else refine_rounds
        refine = (validation_refinement(supernet_dir, Path(predictor_dir) / ACCURACY_ROWS, data, seed,
                                        rounds, sch.predictor_val_images, device=device)
                  if supernet_dir is not None and rounds > 0 else None)
        result = search_target(get_space(space), tgt, predictor_path(predictor_dir), out_dir,
                               latency_path=table if table.is_file() else None, seed=seed,
                               refine=refine)
        doc = json.loads((out_dir / SEARCH_RESULT).read_text())
        pareto_plot(doc, out_dir / "pareto.png", out_dir / "pareto.html")
        record["metrics"] = {"search_s": doc["search_s"], "predicted_acc": round(float(result.best_score), 3),
                             f"predicted_{result.metric_name}": float(result.best_metric),
                             "pareto_points": len(doc["pareto"])}
        if "refinement" in doc:
            record["metrics"]["refine_best_val_acc"] = doc["refinement"]["rounds"][-1]["best_val_acc"]
            record["metrics"]["refine_s"] = doc["refinement"]["wall_s"]
        if "verification" in doc:
            v = doc["verification"]
            record["metrics"].update({"measured_latency_ms": v["measured_latency_ms"],
                                      "search_rounds": len(v["rounds"]), "verified": v["verified"]})
            if not v["verified"]:
                log.warning("%s: the searched subnet measures %.4g ms, over the %.4g ms planned for (the "
                            "budget less its headroom), after %d searches; its latency table is too "
                            "optimistic for this hardware, or the host was slower than when it was "
                            "measured (host_probe_ms against host_probe_reference_ms in search.json)",
                            tgt.name, v["measured_latency_ms"], v["budget_less_headroom_ms"],
                            len(v["rounds"]))
    return record


def validation_refinement(supernet_dir: str | Path, rows: Path, data: str, seed: int, rounds: int,
                          val_images: int | None = None, *, device: str = "auto"):
    """The search's validation feedback: the supernet measured as the predictor's rows were
    (the first ``val_images`` validation images, with their mirror images where the rows have two
    views, BN recalibrated), on ``device``, and the rows to fit again with."""
    from .specialization.accuracy_data import SubnetEvaluator, load_accuracy_rows, read_rows
    from .specialization.export import load_supernet
    from .specialization.specialize import Refinement
    from .training.train import pick_device

    net = load_supernet(supernet_dir).to(pick_device(device))
    ds = open_data(data, seed=seed, image_size=max(net.space.resolutions))
    check_data(net.space, ds)
    ds = subsample(ds, None, val_images)
    cfgs, accs = load_accuracy_rows([rows], net.space)
    mirror = read_rows(rows)[0].get("views", 1) == 2
    evaluate = SubnetEvaluator(net, ds, split="val", seed=seed, mirror=mirror)
    return Refinement(evaluate, cfgs, accs, rounds=rounds)


def export(target: dict[str, Any] | Target, supernet_dir: str | Path, search_dir: str | Path,
           out_dir: str | Path, *, data: str = "fashion-mnist", seed: int = 0, device: str = "auto",
           run: RunContext = RunContext()) -> dict[str, Any]:
    """Stage export: ONNX + model card of the searched subnet, verified against torch.

    The shortlist's validation passes, BN recalibration and torch's test accuracy run on ``device``
    (train.pick_device: a GPU where the pod has one); the ONNX graph, its parity check, its
    onnxruntime accuracy and its latency on the CPU.

    The card's ``energy`` lists the stages that produced this model: the shared ones and this
    target's profile and search (the export's own figure is in the ledger beside it)."""
    from .specialization.export import export_subnet, load_supernet
    from .specialization.specialize import SEARCH_RESULT, select_on_validation
    from .training.train import pick_device

    tgt = _target(target)
    out_dir = Path(out_dir)
    with _stage("export", out_dir, run, target=tgt.name, inputs=[search_dir]) as record:
        doc = json.loads((Path(search_dir) / SEARCH_RESULT).read_text())
        if tgt.constraint.budget is None:  # budget_of_max: in ms as the search resolved it
            tgt = dataclasses.replace(tgt, constraint=Target.from_dict(doc["target"]).constraint)
        net = load_supernet(supernet_dir).to(pick_device(device))
        space = net.space
        # A search.json of another space fails here, naming the file, before any work.
        SubnetConfig.from_dict(doc["best"], space, str(Path(search_dir) / SEARCH_RESULT))
        ds = open_data(data, seed=seed, image_size=max(space.resolutions))
        check_data(space, ds)
        cfg, selection = select_on_validation(net, ds, doc, seed=seed)
        pick = selection["shortlist"][selection["picked"]]
        upstream = read_ledger(search_dir)
        probe_ref = doc.get("verification", {}).get("host_probe_reference_ms")
        card = export_subnet(supernet_dir, cfg, ds, tgt, out_dir, predicted_accuracy=pick["predicted_acc"],
                             predicted_latency_ms=pick.get("latency_ms"), host_probe_reference_ms=probe_ref,
                             seed=seed, net=net, latency_source=doc.get("latency_source"),
                             extra={"pareto": {"png": "pareto.png", "html": "pareto.html"},
                                    "selection": selection, "energy": _energy_of(upstream, tgt.name)})
        for name in ("pareto.png", "pareto.html"):
            src = Path(search_dir) / name
            if src.is_file():
                (out_dir / name).write_bytes(src.read_bytes())
        record["metrics"] = {"test_acc": card["accuracy"]["test_top1_pct_onnxruntime"],
                             "latency_ms": card["latency"]["measured_ms"], "macs": card["macs"],
                             "params": card["params"], "within_budget": int(_within_budget(card, tgt))}
    return record


def _energy_of(ledger: list[dict[str, Any]], target: str) -> dict[str, Any]:
    """Energy and CO2 of the stages behind one model: shared stages and this target's own."""
    rows = [r for r in ledger if r.get("energy") and r.get("target") in (None, target)]
    return {"stages": {f"{r['stage']}{'' if r.get('target') is None else ':' + r['target']}":
                       {"energy_j": r["energy"]["total_j"], "emissions_g": r["energy"]["emissions_g"],
                        "methods": r["energy"]["methods"]} for r in rows},
            "total_j": round(sum(r["energy"]["total_j"] for r in rows), 3),
            "emissions_g": round(sum(r["energy"]["emissions_g"] for r in rows), 4),
            "note": "shared stages serve every target; their full cost is listed, not a share"}


def _within_budget(card: dict[str, Any], target: Target) -> bool:
    kind, budget = target.constraint.kind, target.constraint.budget
    value = {"latency_ms": card["latency"]["measured_ms"], "macs": card["macs"],
             "params": card["params"]}[kind]
    return value <= budget


# -- the report ------------------------------------------------------------------------------

def report(export_dirs: list[str | Path], out_dir: str | Path, *, scratch_dir: str | Path | None = None,
           publish_uri: str = "", run: RunContext = RunContext()) -> dict[str, Any]:
    """Stage report: every target's card, every stage's record, energy and the savings against
    training each target's model from scratch, in one JSON and one Markdown page.

    With ``publish_uri`` it publishes the run as a release: ``releases/<run>/``, then
    ``current.json`` (compare-and-swap), then ``models/<target>/`` and the report at fixed paths
    (see onceforall.infra.publish). Publishing happens here, once every target has succeeded, so a run
    that fails anywhere publishes nothing and what an earlier run published stays intact."""
    from .specialization.export import CARD
    from .infra.publish import publish_run, release_name

    out_dir = Path(out_dir)
    cards = [json.loads((Path(d) / CARD).read_text()) for d in export_dirs]
    inputs = [*export_dirs, *([scratch_dir] if scratch_dir else [])]
    with _stage("report", out_dir, run, inputs=inputs) as record:
        out_dir.mkdir(parents=True, exist_ok=True)
        ledger = _merge(*(read_ledger(d) for d in inputs))
        doc = {"format": "onceforall-report/1", "run_id": run.run_id,
               "targets": {c["target"]["name"]: _card_summary(c) for c in cards},
               "stages": ledger, "energy": energy_summary(ledger)}
        (out_dir / REPORT_JSON).write_text(json.dumps(doc, indent=1))
        (out_dir / REPORT_MD).write_text(report_markdown(doc))
        record["metrics"] = {"targets": len(cards)}
        if publish_uri:
            models = {card["target"]["name"]: folder for card, folder in zip(cards, export_dirs)}
            record["published"] = {"uri": publish_uri, **publish_run(
                publish_uri, release_name(run.run_id), models, out_dir)}
    return record


# -- per-target results without a fan-in --------------------------------------------------------
# KFP backends before 2.14 cannot pass a ParallelFor's outputs to a later task (dsl.Collected of
# artifacts), so each target's branch stages its model under the run's own folder of the pipeline
# root and the report reads them from there by target name (pipelines/ofa_pipeline.py).

STAGED_MODELS = "ofa-staged-models"


def run_root(artifact_uri: str, run_id: str) -> str:
    """The run's own folder of the pipeline root, from an output artifact URI of this run's task.

    The KFP backend (2.5 to 2.17: ``metadata.GenerateOutputURI`` under the run's root
    ``<pipeline root>/<pipeline name>/<run id>``) and ``ofa run`` (its pipeline root per run is
    ``<root>/<run id>``) both put the run id in the path as a folder of its own."""
    from .errors import UserError

    uri = str(artifact_uri).rstrip("/")
    marker = f"/{run_id}/"
    if not run_id or marker not in uri:
        raise UserError(f"the run id {run_id!r} is not a folder of the output URI {uri}",
                        field=RUN_ID_ENV,
                        fix="run the stage as a pipeline task, whose pod sets OFA_RUN_ID from its "
                            "pipeline/runid label, or through `ofa run`")
    return uri[:uri.index(marker) + len(marker) - 1]


def stage_model(target_name: str, model_dir: str | Path, root: str) -> str:
    """Copy one target's exported model folder (card last) to ``<root>/ofa-staged-models/<name>``."""
    from .infra import store
    from .specialization.export import CARD

    dest = store.join(root, STAGED_MODELS, target_name)
    store.publish_dir(model_dir, dest, last=CARD)
    return dest


def report_staged(target_names: list[str], root: str, out_dir: str | Path, *,
                  scratch_dir: str | Path | None = None, publish_uri: str = "",
                  run: RunContext = RunContext()) -> dict[str, Any]:
    """:func:`report` over the models the targets' branches staged under ``root``."""
    import tempfile

    from .infra import store
    from .errors import UserError
    from .specialization.export import CARD

    with tempfile.TemporaryDirectory(prefix="ofa-staged-") as tmp:
        dirs = []
        for name in target_names:
            staged = store.join(root, STAGED_MODELS, name)
            if not store.exists(store.join(staged, CARD)):
                raise UserError(f"no staged model for target {name!r} at {staged}", field="targets",
                                fix="every target's branch (profile, search, export, stage-model) must "
                                    "have succeeded in this run; see its task's log")
            dirs.append(store.download(staged, Path(tmp) / name))
        return report(dirs, out_dir, scratch_dir=scratch_dir, publish_uri=publish_uri, run=run)


SHARED_STAGES = ("open-supernet", "train-teacher", *(f"shrink-{p}" for p in SHRINK_PHASES),
                 "fit-accuracy-predictor")
TRAINING_STAGES = ("train-teacher", *(f"shrink-{p}" for p in SHRINK_PHASES))
PER_TARGET_STAGES = ("profile-target", "search", "export")


def energy_summary(ledger: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's cost: per stage, shared vs per target, and against training each target from scratch.

    OFA with N targets costs ``shared + sum(per-target)``; training each from scratch costs
    ``N x scratch`` (the measured train-scratch stage). Assumptions are written into the result."""
    metered = [r for r in ledger if r.get("energy")]
    by = {(r["stage"], r.get("target")): r["energy"] for r in metered}
    shared_j = sum(e["total_j"] for (s, t), e in by.items() if s in SHARED_STAGES)
    shared_g = sum(e["emissions_g"] for (s, t), e in by.items() if s in SHARED_STAGES)
    targets = sorted({t for (s, t) in by if t is not None})
    per_target = {t: {"energy_j": round(sum(e["total_j"] for (s, tt), e in by.items() if tt == t), 3),
                      "emissions_g": round(sum(e["emissions_g"] for (s, tt), e in by.items() if tt == t), 4)}
                  for t in targets}
    marginal_j = sum(v["energy_j"] for v in per_target.values()) / max(len(targets), 1)
    methods = sorted({m for e in by.values() for m in e["methods"].values() if m != "none"})
    out: dict[str, Any] = {
        "stages": [{"stage": r["stage"], "target": r.get("target"), "wall_s": r["wall_s"],
                    **{k: r["energy"][k] for k in ("cpu_j", "gpu_j", "ram_j", "total_j", "emissions_g")},
                    "methods": r["energy"]["methods"]} for r in metered],
        "total_j": round(sum(e["total_j"] for e in by.values()), 3),
        "emissions_g": round(sum(e["emissions_g"] for e in by.values()), 4),
        "shared_j": round(shared_j, 3), "shared_emissions_g": round(shared_g, 4),
        "per_target": per_target, "marginal_j_per_target": round(marginal_j, 3),
        "methods": methods,
        "estimate": any(m == "model" for m in methods),
    }
    opened = next((r for r in metered if r["stage"] == "open-supernet"), None)
    if not any(s in TRAINING_STAGES for s, _ in by):
        out["training"] = {
            "in_run": False,
            **({"supernet": opened["source"]["uri"]} if opened and "source" in opened else {}),
            "note": "no supernet was trained in this run: the energy of training it "
                    "is not counted here, and there is no from-scratch baseline to compare with"}
    scratch = by.get(("train-scratch", None))
    out["standard"] = standard_claim()
    if scratch:
        n = len(targets)
        ofa_j = shared_j + sum(v["energy_j"] for v in per_target.values())
        scratch_j = scratch["total_j"]
        out["savings"] = {
            "targets": n, "ofa_j": round(ofa_j, 3), "scratch_per_target_j": round(scratch_j, 3),
            "scratch_j": round(n * scratch_j, 3),
            "ratio": round(n * scratch_j / ofa_j, 4) if ofa_j else None,
            "break_even_targets": (round(shared_j / (scratch_j - marginal_j), 2)
                                   if scratch_j > marginal_j else None),
            "assumptions": [
                "from scratch = one model per target, each costing what the measured train-scratch "
                "stage cost: the space's middle subnet trained alone on the teacher's recipe (same "
                "data, epochs, batch size, learning rate), at its own resolution, without distillation",
                "the from-scratch side gets its architectures for free (no search, no latency table) "
                "and its export is not counted; the OFA side counts every stage of this run",
                "ratio = N x scratch / (shared + sum of per-target stages) with N = the targets of "
                "this run; break-even N = shared / (scratch - marginal per target)",
                "energy figures with method 'model' are CodeCarbon estimates, not measurements",
            ],
            "measures": _scale_of(ledger)}
        out["implied"] = _implied(ledger, shared_j, marginal_j, scratch)
    return out


def _scale_of(ledger: list[dict[str, Any]]) -> str:
    """What this run's comparison measures, in words, from its own stages' records."""
    epochs = {r["stage"]: r.get("metrics", {}).get("epochs") for r in ledger}
    shrink = [epochs.get(f"shrink-{p}") for p in SHRINK_PHASES if f"shrink-{p}" in epochs]
    return (f"this run's scale (teacher {epochs.get('train-teacher', '?')} epochs, {len(shrink)} shrinking "
            f"phases of {'/'.join(str(e) for e in shrink)} epochs) against one fixed architecture (the "
            f"space's middle subnet) trained alone for {epochs.get('train-scratch', '?')} epochs on the "
            "same recipe, with no search")


def _implied(ledger: list[dict[str, Any]], shared_j: float, marginal_j: float,
             scratch: dict[str, Any]) -> dict[str, Any]:
    """This run's measured figures carried to N = 1..100 targets, against training alone (measured:
    the train-scratch stage) and against a per-target NAS (estimated, no NAS ran here: one training
    alone plus proxies costing the share of it that onceforall/specialization/nas_baseline.py's defaults cost
    under the `standard` recipe)."""
    from .infra.cost import NS, Cost, cost_model
    from .specialization.nas_baseline import NASSettings

    recs = {(r["stage"], r.get("target")): r for r in ledger if r.get("energy")}
    wall = lambda pred: sum(r["wall_s"] for k, r in recs.items() if pred(*k))  # noqa: E731
    targets = {t for (_, t) in recs if t is not None}
    nas = NASSettings()
    share = nas.proxy_share(get_schedule("standard"), 55000)  # Fashion-MNIST less 5,000 for validation
    alone = Cost(scratch["total_j"], recs[("train-scratch", None)]["wall_s"])
    model = cost_model(Cost(shared_j, wall(lambda s, t: s in SHARED_STAGES)),
                       Cost(marginal_j, wall(lambda s, t: t is not None) / max(len(targets), 1)),
                       {"scratch": alone, "nas": Cost(alone.j * (1 + share), alone.wall_s * (1 + share))},
                       float(scratch.get("g_per_kwh") or 475.0), NS)
    return model | {"nas_estimate": {
        "proxy_share": round(share, 4), "settings": dataclasses.asdict(nas),
        "how": "estimated, not run: one training alone x (1 + the share of it that the K proxies of "
               "onceforall/specialization/nas_baseline.py's defaults cost under the standard recipe); the "
               "latency tables a NAS needs for latency targets are not counted"}}


def standard_claim(doc: dict[str, Any] | None = None) -> dict[str, Any]:
    """The committed standard-scale result (``doc``; default onceforall/resources/standard_claim.json,
    written by bench/claim.py) with its provenance, or why it is pending."""
    from importlib import resources

    if doc is None:
        try:
            raw = resources.files("onceforall").joinpath("resources/standard_claim.json").read_text()
        except (FileNotFoundError, OSError):
            return {"pending": "no committed standard-scale result in this installation"}
        doc = json.loads(raw)
    cost = doc.get("cost", {})
    out = {k: doc.get(k) for k in ("source", "command", "date", "supernet_sha256")}
    if "rows" not in cost:
        return out | {"pending": cost.get("pending", "not measured"), "measured": cost.get("measured", {})}
    return out | {"break_even_n": cost["break_even_n"], "g_per_kwh": cost["g_per_kwh"],
                  "shared_j": cost["shared"]["j"], "per_target_marginal_j": cost["per_target_marginal"]["j"],
                  "per_target_j": {k: v["j"] for k, v in cost["baselines"].items()}}


def _card_summary(card: dict[str, Any]) -> dict[str, Any]:
    t, c = card["target"], card["target"]["constraint"]
    return {"constraint": c["kind"], "budget": c["budget"],
            **({"budget_of_max": c["budget_of_max"]} if "budget_of_max" in c else {}),
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
        budget = (f"{t['budget']:.4g} ({t['budget_of_max']:g} of max)" if t.get("budget_of_max")
                  else f"{t['budget']:g}")
        lines.append(f"| {name} | {t['constraint']} | {budget} | {t['test_acc']:.2f} | {pred_acc} | "
                     f"{t['latency_ms']:.3f} | {pred_lat} | {t['macs'] / 1e6:.2f}M | "
                     f"{t['params'] / 1e6:.3f}M | `{t['model']}` |")
    e = doc["energy"]
    lines += ["", "## Energy and CO2 per stage", "",
              "| stage | target | wall (s) | CPU (J) | GPU (J) | RAM (J) | total (J) | CO2e (g) | how |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in e["stages"]:
        how = ", ".join(f"{k} {v}" for k, v in r["methods"].items() if v != "none")
        lines.append(f"| {r['stage']} | {r.get('target') or '(shared)'} | {r['wall_s']:.1f} | "
                     f"{r['cpu_j']:.0f} | {r['gpu_j']:.0f} | {r['ram_j']:.0f} | {r['total_j']:.0f} | "
                     f"{r['emissions_g']:.3f} | {how} |")
    lines += ["", f"Run total: {e['total_j']:.0f} J ({e['total_j'] / 3.6e3:.3f} Wh), "
                  f"{e['emissions_g']:.3f} g CO2e. Shared stages: {e['shared_j']:.0f} J; "
                  f"one more target: {e['marginal_j_per_target']:.0f} J on average."]
    if e["estimate"]:
        lines.append("Figures whose method is `model` are CodeCarbon's estimates (no RAPL/NVML counters "
                     "were readable), not measurements.")
    if e.get("training"):
        t = e["training"]
        of = f" of the supernet `{t['supernet']}`" if t.get("supernet") else ""
        lines += ["", "## Training", "", f"Specialize-only run{of}: {t['note']}."]
    s = e.get("savings")
    if s:
        lines += _savings_lines(s, e.get("implied"))
    if e.get("standard"):
        lines += _standard_lines(e["standard"])
    lines += ["", "## Stages", "", "| stage | target | wall (s) | figures |", "|---|---|---:|---|"]
    for r in doc["stages"]:
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in r["metrics"].items())
        lines.append(f"| {r['stage']} | {r.get('target') or '(shared)'} | {r['wall_s']:.1f} | {figures} |")
        if r.get("push_error"):
            lines.append(f"| | | | **metrics not pushed**: {r['push_error']} |")
    return "\n".join(lines) + "\n"


def _savings_lines(s: dict[str, Any], implied: dict[str, Any] | None) -> list[str]:
    be = ("never at this scale (one more OFA target costs at least as much as one training alone "
          "here)" if s["break_even_targets"] is None else f"{s['break_even_targets']:.1f} targets")
    lines = ["", "## Against training each target alone, at this run's scale (measured)", "",
             f"What this measures: {s.get('measures', 'this run against one architecture trained alone')}.",
             "", f"- OFA, {s['targets']} targets: {s['ofa_j']:.0f} J",
             f"- trained alone, {s['targets']} x {s['scratch_per_target_j']:.0f} J = {s['scratch_j']:.0f} J",
             f"- savings ratio (alone / OFA) at this scale: {s['ratio']:.2f}x; break-even: {be}", "",
             "Assumptions:", *(f"- {a}" for a in s["assumptions"])]
    if implied:
        names = {"scratch": "training alone (measured)", "nas": "per-target NAS (estimated)"}
        sides = ["ofa", *(b for b in names if b in implied["baselines"])]
        heads = ["OFA", *(names[b] for b in sides[1:])]
        lines += ["", "## What these figures imply at this run's scale", "",
                  "This run's measured stages carried to N targets (energy in Wh; CO2e at "
                  f"{implied['g_per_kwh']:g} g/kWh). "
                  + " ".join(f"Break-even against {names[b]}: " +
                             ("never" if implied["break_even_n"][b] is None else
                              f"N = {implied['break_even_n'][b]:.1f}") + "." for b in sides[1:]),
                  "", "| N | " + " | ".join(f"{h} (Wh)" for h in heads) + " | "
                  + " | ".join(f"{h} CO2e (g)" for h in heads) + " |",
                  "|---:|" + "---:|" * (2 * len(sides))]
        for row in implied["rows"]:
            lines.append(f"| {row['n']} | " + " | ".join(f"{row[f'{x}_wh']:.3f}" for x in sides) + " | "
                         + " | ".join(f"{row[f'{x}_g']:.3f}" for x in sides) + " |")
        if implied.get("nas_estimate"):
            lines += ["", f"Per-target NAS: {implied['nas_estimate']['how']} (share "
                          f"{implied['nas_estimate']['proxy_share']:.2f})."]
    return lines


def _standard_lines(std: dict[str, Any]) -> list[str]:
    where = (f"`{std.get('source')}`, supernet sha256 `{(std.get('supernet_sha256') or '?')[:12]}`, "
             f"measured by `{std.get('command')}` on {std.get('date') or '?'}")
    lines = ["", "## At the standard scale (committed result, not this run)", ""]
    if "pending" in std:
        return lines + [f"Pending: {std['pending']} ({where})."]
    be = "; ".join(f"against {'training alone' if k == 'scratch' else 'per-target NAS'}: "
                   + ("never" if v is None else f"N = {v:.1f}") for k, v in std["break_even_n"].items())
    return lines + [f"Break-even {be}. Shared training {std['shared_j']:.0f} J, one more OFA target "
                    f"{std['per_target_marginal_j']:.0f} J; per target " +
                    ", ".join(f"{k} {v:.0f} J" for k, v in std["per_target_j"].items()) + f" ({where})."]


def log_metrics(record: dict[str, Any], metrics: Any) -> None:
    """Copy a stage record's numbers into a KFP Metrics artifact (anything with ``log_metric``), and
    write them to the artifact's file as JSON.

    The file is not only a copy: kfp.local's cache (kfp 2.17) takes a cached entry whose local output
    artifact has no file for a miss, and a Metrics artifact lives in the executor's output metadata,
    not in a file. Without one, no stage with metrics was ever reused from the cache."""
    numbers = {"wall_s": float(record["wall_s"])}
    for key, value in record["metrics"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[key] = float(value)
    energy = record.get("energy") or {}
    for key in ("cpu_j", "gpu_j", "ram_j", "total_j", "emissions_g"):
        if key in energy:
            numbers[f"energy_{key}" if key != "emissions_g" else "emissions_g"] = float(energy[key])
    for key, value in numbers.items():
        metrics.log_metric(key, value)
    path = getattr(metrics, "path", None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(numbers, indent=1))
