"""``ofa``: the command line. User errors print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

from .errors import UserError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", default="fashion-mnist",
                   help="search space preset (fashion-mnist, imagenet-mbv3, ofa-mbv3-w1.0, "
                        "ofa-mbv3-w1.2) or YAML file")
    p.add_argument("--schedule", default="quick", help="smoke, quick, standard or paper")
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist, synthetic[:N], a folder (IDX files or train/ test/), or streamed: "
                        "imagefolder:PATH_OR_S3 (train/<class>/*.JPEG, val/<class>/) or shards:PATH_OR_S3 "
                        "(train/*.tar, val/*.tar in the WebDataset layout), decoded by DataLoader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--val-size", type=int, default=5000, help="images held out of train for validation")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _setup(args: argparse.Namespace):
    from .stages import setup

    space, schedule, data = setup(args.space, args.schedule, args.data, seed=args.seed,
                                  val_size=args.val_size)
    if getattr(args, "no_ps", False):
        schedule = schedule.without_progressive_shrinking()
    return space, schedule, data


def cmd_train(args: argparse.Namespace) -> int:
    from .training.train import train_supernet

    space, schedule, data = _setup(args)
    phases = args.phases.split(",") if args.phases else None
    for name in phases or []:
        schedule.phase(name)
    results = train_supernet(space, schedule, data, args.out, seed=args.seed, device=args.device,
                             progress=not args.quiet, phases=phases)
    print(json.dumps([r.to_dict() for r in results], indent=1))
    return 0


def cmd_phase(args: argparse.Namespace) -> int:
    from .training.train import run_phase

    space, schedule, data = _setup(args)
    if args.checkpoint_every_s is not None:
        if args.checkpoint_every_s < 0:
            raise UserError(f"{args.checkpoint_every_s} is negative", field="--checkpoint-every-s",
                            fix="give seconds >= 0 (0: a checkpoint after every step)")
        schedule = dataclasses.replace(schedule, checkpoint_every_s=args.checkpoint_every_s)
    result = run_phase(space, schedule, args.name, data, args.out, init=args.init,
                       teacher=args.teacher, seed=args.seed, device=args.device,
                       progress=not args.quiet, checkpoint_uri=args.checkpoint_uri)
    print(json.dumps(result.to_dict(), indent=1))
    return 0


def cmd_space(args: argparse.Namespace) -> int:
    from .supernet.space import get_space, space_yaml

    space = get_space(args.space)
    if args.action == "show":
        print(space_yaml(space), end="")
    else:
        print(json.dumps({"space": space.name, "architectures": space.num_architectures()}))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from .supernet.space import get_space

    space = get_space(args.space)
    for cfg in space.sample_many(np.random.default_rng(args.seed), args.n):
        print(cfg.to_json())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .supernet import checkpoint as ckpt
    from .data import calibration_images, is_streamed, load_dataset
    from .supernet.evaluate import evaluate_subnets
    from .specialization.export import load_supernet
    from .supernet.space import SubnetConfig
    from .training.train import reference_configs

    meta = ckpt.read_meta(args.checkpoint)
    net = load_supernet(args.checkpoint)  # with the BN semantics its sidecar records
    space = net.space
    data = load_dataset(args.data, val_size=args.val_size, seed=meta.get("seed", 0))
    if args.config:
        raw = args.config
        source = "--config"
        if Path(raw).is_file():
            source, raw = raw, Path(raw).read_text()
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise UserError(f"not valid JSON ({exc})", source=source,
                            fix='give {"r": .., "d": [..], "k": [..], "e": [..]}') from None
        configs = {"config": SubnetConfig.from_dict(parsed, space, source)}
    else:
        configs = reference_configs(space)
    seed = meta.get("seed", 0)
    calib = None if is_streamed(data) else calibration_images(data, 2000, seed)
    print(json.dumps(evaluate_subnets(net, configs, data, calib, split=args.split, seed=seed), indent=1))
    return 0


def _target(args: argparse.Namespace):
    from .specialization.targets import load_targets

    targets = load_targets(args.targets)
    for t in targets:
        if t.name == args.target:
            return t
    raise UserError(f"no target named {args.target!r}", source=args.targets, field="name",
                    fix=f"use one of {[t.name for t in targets]}")


def _supernet(path: str):
    from .specialization.export import load_supernet

    return load_supernet(path)


def cmd_import_official(args: argparse.Namespace) -> int:
    from .supernet.checkpoint import read_meta
    from .supernet.official import import_official

    folder = import_official(args.source, args.out, bn=args.bn)
    meta = read_meta(folder)
    print(json.dumps({"checkpoint": str(folder), "space": meta["space"]["name"],
                      "source_sha256": meta["source"]["sha256"],
                      "bn_recalibration": meta["bn_recalibration"]}, indent=1))
    return 0


def cmd_accuracy_data(args: argparse.Namespace) -> int:
    from .specialization.accuracy_data import collect_accuracy
    from .data import load_dataset
    from .progress import Progress
    from .training.train import pick_device

    net = _supernet(args.supernet).to(pick_device(args.device))
    data = load_dataset(args.data, val_size=args.val_size, seed=args.seed)
    bar = Progress("accuracy-data", 1)

    def progress(i: int, total: int, seconds: float) -> None:
        bar.total = max(total, 1)
        bar.update(i, **{"s/subnet": seconds})

    collect_accuracy(net, data, args.out, args.n, seed=args.seed, chunk=args.chunk,
                     num_chunks=args.num_chunks, sampler=args.sampler, mirror=args.mirror,
                     progress=progress)
    bar.close()
    return 0


def cmd_fit_predictor(args: argparse.Namespace) -> int:
    from .specialization.accuracy_data import load_accuracy_rows
    from .supernet.checkpoint import load_checkpoint
    from .specialization.predictor import fit_predictor

    space = load_checkpoint(args.supernet).space
    cfgs, accs = load_accuracy_rows(args.rows, space)
    predictor, metrics = fit_predictor(space, cfgs, accs, seed=args.seed)
    predictor.save(args.out)
    print(json.dumps(metrics, indent=1))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .progress import Progress
    from .supernet.space import get_space
    from .specialization.specialize import profile_target

    target = _target(args)
    bar = Progress(f"profile {target.name}", 1)

    def progress(i: int, total: int) -> None:
        bar.total = total
        bar.update(i)

    summary = profile_target(get_space(args.space), target, args.out, validate=args.validate,
                             progress=progress)
    bar.close()
    summary.get("validation", {}).pop("configs", None)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .supernet.space import get_space
    from .specialization.specialize import search_target

    refine = None
    if args.supernet:
        if not args.rows:
            raise UserError("--supernet refines the search with validation feedback and needs the "
                            "predictor's measured subnets", field="--rows",
                            fix="pass --rows with the accuracy data the predictor was fit on")
        from .stages import validation_refinement

        refine = validation_refinement(args.supernet, Path(args.rows), args.data, args.seed,
                                       args.refine_rounds, args.val_images)
    result = search_target(get_space(args.space), _target(args), args.predictor, args.out,
                           latency_path=args.latency, seed=args.seed,
                           verify_rounds=args.verify_rounds, refine=refine)
    print(json.dumps({"best": result.best.to_dict(), "predicted_accuracy": result.best_score,
                      result.metric_name: result.best_metric}, indent=1))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .specialization.export import export_subnet
    from .supernet.space import SubnetConfig

    doc = json.loads(Path(args.search).read_text())
    net_space = _supernet(args.supernet).space
    cfg = SubnetConfig.from_dict(doc["best"], net_space, args.search)
    data = load_dataset(args.data, val_size=args.val_size, seed=args.seed)
    card = export_subnet(args.supernet, cfg, data, _target(args), args.out,
                         predicted_accuracy=doc.get("best_score"),
                         predicted_latency_ms=doc.get("predicted_latency_ms"), seed=args.seed,
                         latency_source=doc.get("latency_source"),
                         host_probe_reference_ms=doc.get("verification", {}).get("host_probe_reference_ms"))
    print(json.dumps({k: card[k] for k in ("accuracy", "latency", "macs", "params")}, indent=1))
    return 0


# -- the pipeline (these commands import kfp; the library never does) -------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from onceforall_pipelines.local import StageFailed, run_local

    try:
        run = run_local(space=args.space, schedule=args.schedule, data=args.data, targets=args.targets,
                        out=args.out, pipeline_root=args.pipeline_root, seed=args.seed,
                        predictor_subnets=args.predictor_subnets, cache=args.cache, carbon=args.carbon,
                        pushgateway=args.pushgateway, runner=args.runner, image=args.image or "",
                        supernet=args.supernet or "")
    except StageFailed as exc:
        print(f"ofa: a stage failed: {exc}", file=sys.stderr)
        return 1
    energy = run.report["energy"]
    print(f"ofa run: finished in {run.wall_s:.0f} s; published to {run.out}; energy "
          f"{energy['total_j'] / 3.6e3:.2f} Wh, {energy['emissions_g']:.2f} g CO2e"
          f"{' (estimated)' if energy['estimate'] else ''}", file=sys.stderr)
    for name, t in run.report["targets"].items():
        print(f"  {name:<16} test acc {t['test_acc']:6.2f}%  latency {t['latency_ms']:8.3f} ms  "
              f"{t['macs'] / 1e6:6.2f}M MACs  {t['params'] / 1e6:6.3f}M params  {t['model']}",
              file=sys.stderr)
    return 0


def _options(args: argparse.Namespace):
    from onceforall_pipelines.ofa_pipeline import Options

    for flag in ("gpus", "target_gpus", "nodes"):
        if getattr(args, flag) < (1 if flag == "nodes" else 0):
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not a count",
                            field=flag, fix=f"pass {'1' if flag == 'nodes' else '0'} or more")
    return Options(image=args.image or "", gpus=args.gpus, target_gpus=args.target_gpus, nodes=args.nodes,
                   s3_secret=args.s3_secret)


def cmd_compile(args: argparse.Namespace) -> int:
    from onceforall_pipelines.ofa_pipeline import compile_pipeline

    out = args.out or f"pipelines/onceforall{'-specialize' if args.specialize else ''}.yaml"
    print(compile_pipeline(out, _options(args), specialize=args.specialize))
    return 0


def _compile_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", help="container image of every stage (default: the project's CPU image)")
    p.add_argument("--gpus", type=int, default=0,
                   help="GPUs per training stage and node, one rank each, and of fit-accuracy-predictor, "
                        "one measuring process each (default 0)")
    p.add_argument("--target-gpus", type=int, default=0,
                   help="GPUs of each target's search and export pods, which run on the target's nodes "
                        "(placement): only for targets whose nodes have them (default 0)")
    p.add_argument("--nodes", type=int, default=1,
                   help="nodes per training stage: > 1 runs it as a Kubeflow Trainer TrainJob (default 1)")
    p.add_argument("--s3-secret", default="ofa-s3-credentials",
                   help="Kubernetes Secret with the S3 credentials ('' for none)")


def _cluster_params(args: argparse.Namespace) -> dict:
    """Pipeline parameters from the flags: only those given, so the pipeline's defaults apply."""
    from .specialization.targets import load_targets, pipeline_items

    params = {k: getattr(args, k) for k in ("data", "space", "schedule", "publish_uri", "seed", "supernet")
              if getattr(args, k) is not None}
    if args.supernet is not None and args.space is not None:
        raise UserError("--space and --supernet: a specialize-only run takes the supernet's space",
                        field="--space", fix="leave out --space")
    if args.targets:
        params["targets"] = pipeline_items(load_targets(args.targets))
    for item in args.param or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--param {item!r} is not NAME=VALUE", field="param",
                            fix="write e.g. --param predictor_subnets=300")
        params[key] = value
    return params


def _package(args: argparse.Namespace) -> str:
    if args.package:
        return args.package
    import tempfile

    from onceforall_pipelines.ofa_pipeline import compile_pipeline

    return str(compile_pipeline(Path(tempfile.mkdtemp(prefix="ofa-")) / "onceforall.yaml",
                                _options(args), specialize=args.supernet is not None))


def _pipeline_name(args: argparse.Namespace) -> str:
    """The uploaded pipeline's name: the specialize-only one is a pipeline of its own, not a version."""
    return args.pipeline_name or ("onceforall-specialize" if args.supernet is not None else "onceforall")


def cmd_submit(args: argparse.Namespace) -> int:
    from onceforall_pipelines.cluster import submit

    result = submit(args.host, _package(args), pipeline_name=_pipeline_name(args),
                    params=_cluster_params(args), experiment=args.experiment, version=args.version,
                    run_name=args.run_name, namespace=args.namespace, token=args.token,
                    wait=args.wait, timeout_s=args.timeout, service_account=args.service_account or None,
                    check_backend=not args.skip_backend_check)
    print(json.dumps(result, indent=1))
    return 0 if result.get("state", "SUCCEEDED") == "SUCCEEDED" or not args.wait else 1


def cmd_schedule(args: argparse.Namespace) -> int:
    from onceforall_pipelines.cluster import schedule

    result = schedule(args.host, _package(args), pipeline_name=_pipeline_name(args), cron=args.cron,
                      params=_cluster_params(args), experiment=args.experiment, job_name=args.job_name,
                      max_concurrency=args.max_concurrency, namespace=args.namespace, token=args.token,
                      version=args.version, service_account=args.service_account or None,
                      check_backend=not args.skip_backend_check)
    print(json.dumps(result, indent=1))
    return 0


def _cluster_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", required=True, help="KFP endpoint, e.g. http://localhost:8080 "
                                                 "(kubectl port-forward svc/ml-pipeline-ui 8080:80)")
    p.add_argument("--package", help="compiled pipeline YAML (default: compile now with the options below)")
    _compile_options(p)
    p.add_argument("--pipeline-name", help="default onceforall, with --supernet onceforall-specialize")
    p.add_argument("--experiment", default="onceforall")
    p.add_argument("--version", help="pipeline version name (default: sha256 prefix + time)")
    p.add_argument("--namespace", help="profile namespace (multi-user Kubeflow)")
    p.add_argument("--token", help="bearer token (default: the token file $KF_PIPELINES_SA_TOKEN_PATH, "
                                   "read again before every request)")
    p.add_argument("--skip-backend-check", action="store_true",
                   help="go on when the KFP backend's version is outside the supported range")
    p.add_argument("--service-account", default="ofa-pipeline-runner",
                   help="ServiceAccount of the run's pods (manifests/base/rbac.yaml; '' for the default)")
    p.add_argument("--data", help="pipeline parameter: fashion-mnist, s3://bucket/prefix or "
                                  "imagefolder:s3://bucket/prefix (streamed ImageNet layout)")
    p.add_argument("--supernet", help="pipeline parameter of the specialize-only pipeline (compiled "
                                      "instead of the training one): s3://... of a checkpoint folder")
    p.add_argument("--space", help="pipeline parameter: search space preset")
    p.add_argument("--schedule", help="pipeline parameter: training schedule")
    p.add_argument("--targets", help="target spec YAML, sent as the targets parameter")
    p.add_argument("--publish-uri", help="pipeline parameter: s3://bucket/prefix for models and report")
    p.add_argument("--seed", type=int)
    p.add_argument("--param", action="append", help="any other pipeline parameter, NAME=VALUE")


def _train_command(sub) -> None:
    p = sub.add_parser("train", help="train the teacher and every progressive-shrinking phase")
    _common(p)
    p.add_argument("--out", required=True, help="output folder; one sub-folder per phase")
    p.add_argument("--phases", help="comma-separated subset of phases to run (default: all)")
    p.add_argument("--no-ps", action="store_true",
                   help="ablation: every dimension elastic from the first shrinking phase")
    p.set_defaults(func=cmd_train)


def _run_command(sub) -> None:
    p = sub.add_parser("run", help="run the whole pipeline here (kfp local runner): train, "
                                   "specialize for every target, publish models and a report")
    p.add_argument("--space", default="fashion-mnist",
                   help="search space preset (fashion-mnist, imagenet-mbv3, ofa-mbv3-w1.0, "
                        "ofa-mbv3-w1.2) or YAML file")
    p.add_argument("--schedule", default="quick", help="smoke, quick, standard or paper")
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist, synthetic[:N], a folder (IDX or train/ test/), s3://bucket/prefix, "
                        "or imagefolder:PATH_OR_S3 (train/<class>/*.JPEG and val/<class>/, streamed; "
                        "specialize-only)")
    p.add_argument("--supernet", help="specialize this supernet instead of training one: a checkpoint "
                                      "folder (ours, e.g. from `ofa import-official`), a folder or "
                                      "s3://...; --space is then the checkpoint's")
    p.add_argument("--targets", help="target spec YAML (default: the four example targets)")
    p.add_argument("--out", default="runs/published",
                   help="where models/<target>/, report.json and report.md go: a folder or s3://...")
    p.add_argument("--pipeline-root", help="where stage artifacts go: a folder (default "
                                           "runs/pipeline-root) or s3://... (uploaded at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--predictor-subnets", type=int, default=0,
                   help="subnets measured for the accuracy predictor (default: the schedule's)")
    p.add_argument("--cache", action="store_true",
                   help="reuse stages whose inputs did not change (e.g. after adding a target)")
    p.add_argument("--carbon", help="carbon intensity: g CO2e/kWh (default 475, or $OFA_CARBON) or an "
                                    "ISO 3166 alpha-3 country[:region], e.g. DEU or USA:california")
    p.add_argument("--pushgateway", default="", help="HOST:PORT of a Prometheus Pushgateway: every stage "
                                                     "pushes its energy and figures there")
    p.add_argument("--runner", default="subprocess", choices=("subprocess", "container"),
                   help="subprocess: every stage a process of this environment; container: every stage "
                        "in the project's image through podman (`make image` builds it)")
    p.add_argument("--image", help="with --runner container: the image of every stage "
                                   "(default localhost/onceforall-kfp:dev-cpu, what `make image` builds)")
    p.set_defaults(func=cmd_run)


def _compile_command(sub) -> None:
    p = sub.add_parser("compile", help="compile the pipeline to YAML for the Kubeflow UI or SDK")
    p.add_argument("--out", help="default pipelines/onceforall.yaml, with --specialize "
                                 "pipelines/onceforall-specialize.yaml")
    p.add_argument("--specialize", action="store_true",
                   help="the specialize-only pipeline (a supernet URI instead of training)")
    _compile_options(p)
    p.set_defaults(func=cmd_compile)


def _submit_command(sub) -> None:
    p = sub.add_parser("submit", help="upload the pipeline to a Kubeflow Pipelines server and start a run")
    _cluster_common(p)
    p.add_argument("--run-name")
    p.add_argument("--wait", action="store_true", help="wait for the run to finish and show its state")
    p.add_argument("--timeout", type=float, help="seconds to wait with --wait")
    p.set_defaults(func=cmd_submit)


def _schedule_command(sub) -> None:
    p = sub.add_parser("schedule", help="upload the pipeline and create a recurring run (retraining)")
    _cluster_common(p)
    p.add_argument("--cron", required=True,
                   help="cron in UTC: 5 fields ('0 2 * * 0'), 6 with seconds first, or @daily/@every 24h")
    p.add_argument("--max-concurrency", type=int, default=1)
    p.add_argument("--job-name", help="name of the recurring run")
    p.set_defaults(func=cmd_schedule)


def _phase_command(sub) -> None:
    p = sub.add_parser("phase", help="run one phase (a pipeline stage)")
    p.add_argument("name", help="teacher, kernel, depth-1, depth-2, width-1 or width-2")
    _common(p)
    p.add_argument("--out", required=True, help="this phase's checkpoint folder")
    p.add_argument("--init", help="previous phase's checkpoint folder")
    p.add_argument("--teacher", help="teacher checkpoint folder (for distillation)")
    p.add_argument("--checkpoint-uri",
                   help="durable copy of every checkpoint (s3://bucket/prefix or a folder); a run whose "
                        "--out has no checkpoint resumes from the newest one there")
    p.add_argument("--checkpoint-every-s", type=float,
                   help="seconds between mid-phase checkpoints (default: the schedule's checkpoint_every_s)")
    p.set_defaults(func=cmd_phase)


def _space_command(sub) -> None:
    p = sub.add_parser("space", help="show a search space or count its architectures")
    p.add_argument("action", choices=["show", "count"])
    p.add_argument("space", nargs="?", default="fashion-mnist")
    p.set_defaults(func=cmd_space)


def _sample_command(sub) -> None:
    p = sub.add_parser("sample", help="print random subnet configs as JSON lines")
    p.add_argument("--space", default="fashion-mnist")
    p.add_argument("-n", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)


def _evaluate_command(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy of subnets of a checkpoint (BN recalibrated)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--config", help="subnet config JSON or a file holding it (default: max, min, "
                                    "three middle)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--val-size", type=int, default=5000)
    p.set_defaults(func=cmd_evaluate)


def _import_official_command(sub) -> None:
    p = sub.add_parser("import-official", help="import a published MIT OFA-MobileNetV3 supernet "
                                               "(.pth, local or s3://) into a checkpoint folder")
    p.add_argument("source", help="e.g. ofa_mbv3_d234_e346_k357_w1.2 downloaded from mit-han-lab")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--bn", default="ours", choices=["ours", "reference"],
                   help="BN recalibration the model is meant for, recorded in the sidecar: reference "
                        "reproduces set_running_statistics of the reference code (biased variance)")
    p.set_defaults(func=cmd_import_official)


def _accuracy_data_command(sub) -> None:
    p = sub.add_parser("accuracy-data", help="measure validation accuracy of sampled subnets")
    p.add_argument("--supernet", required=True, help="checkpoint folder of the final phase")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--n", type=int, default=500, help="subnets in the whole (stratified) sample")
    p.add_argument("--chunk", type=int, default=0, help="this worker's chunk")
    p.add_argument("--num-chunks", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:N")
    p.add_argument("--out", required=True, help="JSON lines file (appended; reruns resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=True,
                   help="score each validation image and its mirror image, and average (less noise "
                        "in the predictor's labels; the default)")
    p.add_argument("--sampler", default="mixed", choices=["mixed", "balanced", "graded"],
                   help="balanced: each choice equally often per slot; graded: one size level per "
                        "subnet, reaching the large and small corners; mixed: half each (default)")
    p.set_defaults(func=cmd_accuracy_data)


def _fit_predictor_command(sub) -> None:
    p = sub.add_parser("fit-predictor", help="fit the accuracy predictor on measured subnets")
    p.add_argument("--supernet", required=True, help="checkpoint folder (gives the search space)")
    p.add_argument("--rows", nargs="+", required=True, help="accuracy-data JSON lines files")
    p.add_argument("--out", required=True, help="path prefix: writes PREFIX.safetensors/.json")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_fit_predictor)


def _target_command(sub, name: str, func, text: str) -> argparse.ArgumentParser:
    """A command that works on one target of a target spec YAML (profile, search, export)."""
    p = sub.add_parser(name, help=text)
    p.add_argument("--targets", default="examples/targets.yaml", help="target spec YAML")
    p.add_argument("--target", required=True, help="target name in that file")
    p.add_argument("--space", default="fashion-mnist")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=func)
    return p


def _profile_command(sub) -> None:
    p = _target_command(sub, "profile", cmd_profile, "measure a target's latency table here")
    p.add_argument("--out", required=True, help="latency table JSON")
    p.add_argument("--validate", type=int, default=0,
                   help="also measure N whole subnets and report MAPE / Kendall tau")


def _search_command(sub) -> None:
    p = _target_command(sub, "search", cmd_search, "evolutionary search for one target")
    p.add_argument("--predictor", required=True, help="predictor .safetensors or .json")
    p.add_argument("--latency", help="latency table JSON (latency_ms targets)")
    p.add_argument("--out", required=True, help="folder for search.json")
    p.add_argument("--verify-rounds", type=int, default=3,
                   help="latency budgets: measure the pick here and search again while it is "
                        "over budget, up to this many searches (0: trust the table; run on "
                        "the target's hardware otherwise)")
    p.add_argument("--supernet", help="checkpoint folder: refine the search with validation "
                                      "feedback (measure its best points, fit again)")
    p.add_argument("--rows", help="with --supernet: the accuracy data the predictor was fit on")
    p.add_argument("--data", default="fashion-mnist", help="with --supernet: the dataset")
    p.add_argument("--refine-rounds", type=int, default=4,
                   help="with --supernet: rounds of validation feedback")
    p.add_argument("--val-images", type=int,
                   help="with --supernet: measure on the first N validation images, as the "
                        "rows were (default: all)")


def _export_command(sub) -> None:
    p = _target_command(sub, "export", cmd_export, "export a searched subnet to ONNX + card")
    p.add_argument("--supernet", required=True)
    p.add_argument("--search", required=True, help="search.json of this target")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--out", required=True, help="folder for model.onnx + model_card.json")


# every subcommand, in the order `ofa --help` lists them
COMMANDS = (
    _train_command, _run_command, _compile_command, _submit_command, _schedule_command, _phase_command,
    _space_command, _sample_command, _evaluate_command, _import_official_command,
    _accuracy_data_command, _fit_predictor_command, _profile_command, _search_command, _export_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ofa", description=(
        "Once-for-All on Kubeflow: train one elastic supernet, specialize it for many targets."))
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"ofa: error: {exc.line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ofa: interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
