"""``ofa``: the command line. User errors print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .errors import UserError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", default="fashion-mnist",
                   help="search space preset (fashion-mnist, imagenet-mbv3) or YAML file")
    p.add_argument("--schedule", default="quick", help="smoke, quick, standard or paper")
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist, synthetic[:N], or a folder (IDX files or train/ test/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--val-size", type=int, default=5000, help="images held out of train for validation")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _setup(args: argparse.Namespace):
    from .data import load_dataset
    from .schedule import get_schedule
    from .space import get_space

    space = get_space(args.space)
    schedule = get_schedule(args.schedule)
    if getattr(args, "no_ps", False):
        schedule = schedule.without_progressive_shrinking()
    data = load_dataset(args.data, val_size=args.val_size, seed=args.seed,
                        image_size=max(space.resolutions))
    if data.channels != space.in_channels:
        raise UserError(f"dataset has {data.channels} channel(s), space {space.name!r} expects "
                        f"{space.in_channels}", field="data",
                        fix="use a space whose in_channels matches the data")
    if int(data.train.labels.max()) >= space.num_classes:
        raise UserError(f"dataset has {int(data.train.labels.max()) + 1} classes, space "
                        f"{space.name!r} has {space.num_classes}", field="data",
                        fix="use a space whose num_classes matches the data")
    return space, schedule, data


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train_supernet

    space, schedule, data = _setup(args)
    phases = args.phases.split(",") if args.phases else None
    for name in phases or []:
        schedule.phase(name)
    results = train_supernet(space, schedule, data, args.out, seed=args.seed, device=args.device,
                             progress=not args.quiet, phases=phases)
    print(json.dumps([r.to_dict() for r in results], indent=1))
    return 0


def cmd_phase(args: argparse.Namespace) -> int:
    from .train import run_phase

    space, schedule, data = _setup(args)
    result = run_phase(space, schedule, args.name, data, args.out, init=args.init,
                       teacher=args.teacher, seed=args.seed, device=args.device,
                       progress=not args.quiet)
    print(json.dumps(result.to_dict(), indent=1))
    return 0


def cmd_space(args: argparse.Namespace) -> int:
    from .space import get_space, space_yaml

    space = get_space(args.space)
    if args.action == "show":
        print(space_yaml(space), end="")
    else:
        print(json.dumps({"space": space.name, "architectures": space.num_architectures()}))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from .space import get_space

    space = get_space(args.space)
    for cfg in space.sample_many(np.random.default_rng(args.seed), args.n):
        print(cfg.to_json())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from .data import calibration_images, load_dataset
    from .evaluate import evaluate_subnets
    from .space import SubnetConfig
    from .supernet import OFASupernet
    from .train import reference_configs

    meta = ckpt.read_meta(args.checkpoint)
    space = ckpt.load_checkpoint(args.checkpoint).space
    net = OFASupernet(space)
    ckpt.load_weights(net, ckpt.load_checkpoint(args.checkpoint, space=space))
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
    calib = calibration_images(data, 2000, meta.get("seed", 0))
    print(json.dumps(evaluate_subnets(net, configs, data, calib, split=args.split), indent=1))
    return 0


def _target(args: argparse.Namespace):
    from .targets import load_targets

    targets = load_targets(args.targets)
    for t in targets:
        if t.name == args.target:
            return t
    raise UserError(f"no target named {args.target!r}", source=args.targets, field="name",
                    fix=f"use one of {[t.name for t in targets]}")


def _supernet(path: str):
    from .export import load_supernet

    return load_supernet(path)


def cmd_accuracy_data(args: argparse.Namespace) -> int:
    from .accuracy_data import collect_accuracy
    from .data import load_dataset
    from .progress import Progress

    net = _supernet(args.supernet)
    data = load_dataset(args.data, val_size=args.val_size, seed=args.seed)
    bar = Progress("accuracy-data", 1)

    def progress(i: int, total: int, seconds: float) -> None:
        bar.total = max(total, 1)
        bar.update(i, **{"s/subnet": seconds})

    collect_accuracy(net, data, args.out, args.n, seed=args.seed, chunk=args.chunk,
                     num_chunks=args.num_chunks, progress=progress)
    bar.close()
    return 0


def cmd_fit_predictor(args: argparse.Namespace) -> int:
    from .accuracy_data import load_accuracy_rows
    from .checkpoint import load_checkpoint
    from .predictor import fit_predictor

    space = load_checkpoint(args.supernet).space
    cfgs, accs = load_accuracy_rows(args.rows, space)
    predictor, metrics = fit_predictor(space, cfgs, accs, seed=args.seed)
    predictor.save(args.out)
    print(json.dumps(metrics, indent=1))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .progress import Progress
    from .space import get_space
    from .specialize import profile_target

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
    from .space import get_space
    from .specialize import search_target

    result = search_target(get_space(args.space), _target(args), args.predictor, args.out,
                           latency_path=args.latency, seed=args.seed)
    print(json.dumps({"best": result.best.to_dict(), "predicted_accuracy": result.best_score,
                      result.metric_name: result.best_metric}, indent=1))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .export import export_subnet
    from .space import SubnetConfig

    doc = json.loads(Path(args.search).read_text())
    net_space = _supernet(args.supernet).space
    cfg = SubnetConfig.from_dict(doc["best"], net_space, args.search)
    data = load_dataset(args.data, val_size=args.val_size, seed=args.seed)
    card = export_subnet(args.supernet, cfg, data, _target(args), args.out,
                         predicted_accuracy=doc.get("best_score"),
                         predicted_latency_ms=doc.get("predicted_latency_ms"), seed=args.seed)
    print(json.dumps({k: card[k] for k in ("accuracy", "latency", "macs", "params")}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ofa", description=(
        "Once-for-All on Kubeflow: train one elastic supernet, specialize it for many targets."))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the teacher and every progressive-shrinking phase")
    _common(p)
    p.add_argument("--out", required=True, help="output folder; one sub-folder per phase")
    p.add_argument("--phases", help="comma-separated subset of phases to run (default: all)")
    p.add_argument("--no-ps", action="store_true",
                   help="ablation: every dimension elastic from the first shrinking phase")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("phase", help="run one phase (a pipeline stage)")
    p.add_argument("name", help="teacher, kernel, depth-1, depth-2, width-1 or width-2")
    _common(p)
    p.add_argument("--out", required=True, help="this phase's checkpoint folder")
    p.add_argument("--init", help="previous phase's checkpoint folder")
    p.add_argument("--teacher", help="teacher checkpoint folder (for distillation)")
    p.set_defaults(func=cmd_phase)

    p = sub.add_parser("space", help="show a search space or count its architectures")
    p.add_argument("action", choices=["show", "count"])
    p.add_argument("space", nargs="?", default="fashion-mnist")
    p.set_defaults(func=cmd_space)

    p = sub.add_parser("sample", help="print random subnet configs as JSON lines")
    p.add_argument("--space", default="fashion-mnist")
    p.add_argument("-n", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="accuracy of subnets of a checkpoint (BN recalibrated)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--config", help="subnet config JSON or a file holding it (default: max, min, "
                                    "three middle)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--val-size", type=int, default=5000)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("accuracy-data", help="measure validation accuracy of sampled subnets")
    p.add_argument("--supernet", required=True, help="checkpoint folder of the final phase")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--n", type=int, default=500, help="subnets in the whole (stratified) sample")
    p.add_argument("--chunk", type=int, default=0, help="this worker's chunk")
    p.add_argument("--num-chunks", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON lines file (appended; reruns resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-size", type=int, default=5000)
    p.set_defaults(func=cmd_accuracy_data)

    p = sub.add_parser("fit-predictor", help="fit the accuracy predictor on measured subnets")
    p.add_argument("--supernet", required=True, help="checkpoint folder (gives the search space)")
    p.add_argument("--rows", nargs="+", required=True, help="accuracy-data JSON lines files")
    p.add_argument("--out", required=True, help="path prefix: writes PREFIX.safetensors/.json")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_fit_predictor)

    for name, func, text in (("profile", cmd_profile, "measure a target's latency table here"),
                             ("search", cmd_search, "evolutionary search for one target"),
                             ("export", cmd_export, "export a searched subnet to ONNX + card")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--targets", default="examples/targets.yaml", help="target spec YAML")
        p.add_argument("--target", required=True, help="target name in that file")
        p.add_argument("--space", default="fashion-mnist")
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(func=func)
        if name == "profile":
            p.add_argument("--out", required=True, help="latency table JSON")
            p.add_argument("--validate", type=int, default=0,
                           help="also measure N whole subnets and report MAPE / Kendall tau")
        elif name == "search":
            p.add_argument("--predictor", required=True, help="predictor .safetensors or .json")
            p.add_argument("--latency", help="latency table JSON (latency_ms targets)")
            p.add_argument("--out", required=True, help="folder for search.json")
        else:
            p.add_argument("--supernet", required=True)
            p.add_argument("--search", required=True, help="search.json of this target")
            p.add_argument("--data", default="fashion-mnist")
            p.add_argument("--val-size", type=int, default=5000)
            p.add_argument("--out", required=True, help="folder for model.onnx + model_card.json")
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
