"""Benchmark: specialize the `standard` supernet for the example targets.

1. accuracy data: stratified subnets (two balanced sets and a graded one that reaches the corners;
   see onceforall/specialization/accuracy_data.py), BN recalibrated, validation accuracy over each
   image and its mirror image (resumable);
2. accuracy predictor: fit, then RMSE / Kendall tau on held-out subnets (all, and by sampler), and
   its error on the uniform subnets and the max subnet (step 5 measures them on validation);
3. latency tables: onnxruntime at 1 and 2 threads (batch 1), validated on 50 whole subnets;
4. search speed: population 100 x 500 generations (and the reference implementation's, when
   bench/reference_search.py has been run in its own venv: see that file);
5. per example target: search with validation feedback (4 rounds: its 8 best new points measured
   on validation, the predictor fit again on them and the rows), a latency pick and the 8 best
   Pareto points measured on the runtime, the pick among those 8 by validation accuracy, export
   (ONNX + card), the best uniform subnet under the same budget (a latency budget measured, as
   the pick's; also chosen on validation), and an independent onnxruntime reproduction.

Results: docs/results/specialize.json, rendered into docs/benchmarks.md.

    python bench/specialize.py [--supernet bench/_work/standard/ps/width-2] [--n 600]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from progressive_shrinking import SUPERNET_FIXTURE, machine, weights_sha256  # noqa: E402

from onceforall.specialization.accuracy_data import (  # noqa: E402
    SubnetEvaluator, collect_accuracy, load_accuracy_rows, read_rows)
from onceforall.data import load_dataset  # noqa: E402
from onceforall.supernet.efficiency import CostTable  # noqa: E402
from onceforall.specialization.export import export_subnet, load_supernet  # noqa: E402
from onceforall.specialization.latency import (  # noqa: E402
    LatencyTable, Profiler, build_latency_table, card_profiler, measure_configs, validate_latency_table)
from onceforall.specialization.predictor import fit_predictor, regression_metrics, split_indices  # noqa: E402
from onceforall.specialization.search import EvolutionConfig, evolution_search  # noqa: E402
from onceforall.specialization.specialize import (  # noqa: E402
    Refinement, constraint_fn, pareto_plot, resolve_budget, search_target, select_on_validation,
    uniform_configs)
from onceforall.supernet.space import SubnetConfig  # noqa: E402
from onceforall.specialization.targets import load_targets  # noqa: E402


# What the benchmark measures on the supernet and later sessions need, kept where git keeps it (a
# fresh checkout has no bench/_work): the accuracy rows (accuracy*.jsonl), the targets' model cards
# and latency tables (targets/<name>/model/model_card.json, targets/<name>/latency.json: bench/claim.py
# measures these subnets for hours, in later sessions), and the supernet's sha256.
KEPT = ROOT / "bench/ledger/specialize"


def latency_key(threads: int, batch_size: int | None = None) -> str:
    """The name of a latency table's validation in specialize.json's ``latency``: ``threads_N``
    for the benchmark's batch-1 tables, ``threads_N_batch_B`` for a target's own table."""
    return f"threads_{threads}" + ("" if batch_size is None else f"_batch_{batch_size}")


def validate(table: LatencyTable, prof: Profiler, net, seed: int) -> dict:
    """``table`` against 50 whole subnets measured end to end, and those measured a second time."""
    space = net.space
    v = validate_latency_table(table, prof, n=50, seed=seed, net=net)
    # The floor under any table's error: the same subnets measured a second time, right after.
    again = measure_configs(prof, net, [SubnetConfig.from_dict(c, space) for c in v["configs"]])
    first = np.array(v["measured_ms"])
    return {"mape_pct": v["mape_pct"], "kendall_tau": v["kendall_tau"], "max_ape_pct": v["max_ape_pct"],
            "n": v["n"], "build_s": table.build_s, "overhead_ms": table.overhead_ms,
            "scale": round(table.scale, 4),
            "measured_ms_range": [min(v["measured_ms"]), max(v["measured_ms"])],
            "remeasured_mape_pct": round(float(100 * np.mean(np.abs(again - first) / first)), 3),
            "remeasured_kendall_tau": round(float(kendalltau(again, first).statistic), 4)}


def revalidate_latency(res: dict, work: Path, net, seed: int, save) -> None:
    """Validate the stored latency tables again (the same tables the targets used, not rebuilt)
    on a quiet host; each earlier validation is kept under ``earlier``, none is dropped."""
    done = set()
    for path in sorted(work.glob("latency_t*_b1.json")) + sorted(work.glob("targets/*/latency.json")):
        table = LatencyTable.load(path, net.space)
        key = latency_key(table.threads, None if path.parent == work else table.batch_size)
        if key in done or key not in res.get("latency", {}):
            continue  # a target's copy of a benchmark table (never validated under its own name)
        done.add(key)
        old = res["latency"][key]
        new = validate(table, Profiler(table.runtime, table.threads, table.batch_size), net, seed)
        new["earlier"] = old.pop("earlier", []) + [old]
        res["latency"][key] = new
        print(f"[specialize] latency {key} again: {new}", flush=True)
        save()


def reproduce_card(card: Path, data_dir: str) -> dict:
    """``python -m onceforall.reproduce CARD``, in a process of its own, as anyone with the card
    would run it. Called in this process instead, right after its torch work, it timed the 1-thread
    cards 12-38% slower than the cards (0.270 -> 0.322 ms; 0.242 -> 0.334), where a fresh process,
    and a fresh session after the test-set pass in one, both timed 0.27-0.28 ms."""
    proc = subprocess.run([sys.executable, "-m", "onceforall.reproduce", str(card), "--data", data_dir],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"reproducing {card} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def fold_reference(res: dict) -> None:
    """The side-by-side file of bench/reference_search.py (both sides timed in one process of the
    reference's venv, its own ours_s) into ``search``."""
    ref = ROOT / "docs/results/reference_search.json"
    if ref.exists():
        side = json.loads(ref.read_text())
        res["search"].update(reference_s=side["reference_s"], speedup=side["speedup"], side_by_side=side)


def recheck(res: dict, work: Path, data_dir: str, save) -> None:
    """Reproduce every stored card again (each in its own process), keeping the earlier
    reproduction under ``earlier``; and fold in the side-by-side search file again."""
    for name, t in res.get("targets", {}).items():
        new = reproduce_card(work / "targets" / name / "model" / "model_card.json", data_dir)
        old = t["reproduced"]
        new["earlier"] = old.pop("earlier", []) + [old]
        t["reproduced"] = new
        print(f"[specialize] {name} reproduced again: {new}", flush=True)
        save()
    fold_reference(res)
    save()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    trained = ROOT / "bench/_work/standard/ps/width-2"  # what bench/progressive_shrinking.py trains
    ap.add_argument("--supernet", default=str(trained if trained.is_dir() else SUPERNET_FIXTURE),
                    help=f"default: {trained.relative_to(ROOT)} when it exists, else the committed "
                         f"{SUPERNET_FIXTURE.relative_to(ROOT)}")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist",
                    help="IDX folder for the independent card reproduction")
    ap.add_argument("--targets", default=str(ROOT / "examples/targets.yaml"))
    ap.add_argument("--n", type=int, default=600, help="subnets per balanced stratified set")
    ap.add_argument("--graded", type=int, default=600, help="subnets in the graded set (0: none)")
    ap.add_argument("--sets", type=int, default=2,
                    help="stratified sets of --n subnets (sampling seeds seed, seed+1, ...), measured "
                         "the same way; a later set extends the earlier ones")
    ap.add_argument("--work", default=str(ROOT / "bench/_work/specialize"))
    ap.add_argument("--out", default=str(ROOT / "docs/results/specialize.json"))
    ap.add_argument("--keep", default=str(KEPT), help="where the targets' model cards and latency tables "
                                                      "are kept for bench/claim.py (committed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--revalidate-latency", action="store_true",
                    help="only validate the stored latency tables again (on a quiet host), keeping "
                         "the earlier validation beside the new one; then render")
    ap.add_argument("--recheck", action="store_true",
                    help="only reproduce the stored cards again (each in its own process), keeping "
                         "the earlier reproduction, and fold in docs/results/reference_search.json "
                         "again (after bench/reference_search.py); then render")
    args = ap.parse_args()

    work, out, keep = Path(args.work), Path(args.out), Path(args.keep)
    res = json.loads(out.read_text()) if out.exists() else {}
    # Resumable, but never across supernets: the rows, predictor and cards belong to one.
    sha = weights_sha256(args.supernet)
    markers = [work / "supernet_sha256", keep / "supernet_sha256"]
    for where, then in ((out, res.get("supernet_sha256")),
                        *((m.parent, m.read_text().strip() if m.exists() else None) for m in markers)):
        if then not in (None, sha):
            raise SystemExit(f"{where} holds results of another supernet (sha256 {then[:12]}, now "
                             f"{sha[:12]}): move {out}, {work} and {keep} aside to measure this one")
    for m in markers:
        m.parent.mkdir(parents=True, exist_ok=True)
        m.write_text(sha)
    supernet = Path(args.supernet).resolve()
    supernet = str(supernet.relative_to(ROOT) if supernet.is_relative_to(ROOT) else supernet)
    res.update({"machine": machine(), "supernet": supernet, "supernet_sha256": sha,
                "command": f"python bench/specialize.py --supernet {supernet} --n {args.n} "
                           f"--sets {args.sets} --graded {args.graded}"})

    def save() -> None:
        out.write_text(json.dumps(res, indent=1))

    def log(msg: str) -> None:
        print(f"[specialize] {msg}", flush=True)

    net = load_supernet(args.supernet)
    space = net.space
    if args.revalidate_latency or args.recheck:
        if args.revalidate_latency:
            revalidate_latency(res, work, net, args.seed, save)
        if args.recheck:
            recheck(res, work, args.data_dir, save)
        from render import render

        render()
        return 0
    data = load_dataset(args.data, seed=args.seed)

    # 1. accuracy data: balanced sets (each choice equally often per slot) and a graded set (one
    # size level per subnet, reaching the corners where generous budgets are spent). The rows are kept
    # with the targets, in a folder git tracks, row by row (~1 h of measuring a session may not finish).
    sets = [(keep / ("accuracy.jsonl" if s == 0 else f"accuracy_set{s}.jsonl"), "balanced", args.seed + s)
            for s in range(args.sets)]
    if args.graded:
        sets.append((keep / "accuracy_graded.jsonl", "graded", args.seed))
    rows_paths = [p for p, _, _ in sets]
    t0 = time.monotonic()
    for rows_path, sampler, sample_seed in sets:
        n = args.graded if sampler == "graded" else args.n
        collect_accuracy(net, data, rows_path, n, seed=args.seed, sample_seed=sample_seed,
                         sampler=sampler,
                         progress=lambda i, total, sec, name=rows_path.name: i % 50 == 0
                         and log(f"accuracy data {name}: {i}/{total} ({sec:.2f} s/subnet)"))
    cfgs, accs = load_accuracy_rows(rows_paths, space)
    rows = [{"sampler": sampler, **r} for p, sampler, _ in sets for r in read_rows(p)]
    views = rows[0]["views"]
    counts = {smp: sum(r["sampler"] == smp for r in rows) for smp in ("balanced", "graded")}
    if "accuracy_data" not in res or (res["accuracy_data"]["n"], res["accuracy_data"].get("views"),
                                      res["accuracy_data"].get("samplers")) != (len(cfgs), views, counts):
        res["accuracy_data"] = {"n": len(cfgs), "sets": len(sets), "views": views, "samplers": counts,
                                "eval_s_total": round(sum(r["eval_s"] for r in rows), 1),
                                "eval_s_per_subnet": round(float(np.mean([r["eval_s"] for r in rows])), 3),
                                "eval_s_per_subnet_by_set": [
                                    round(float(np.mean([r["eval_s"] for r in read_rows(p)])), 3)
                                    for p in rows_paths],
                                "this_run_wall_s": round(time.monotonic() - t0, 1),
                                "val_acc_min": float(accs.min()), "val_acc_max": float(accs.max()),
                                "val_images": len(data.val)}
    save()

    # 2. predictor
    predictor, metrics = fit_predictor(space, cfgs, accs, seed=args.seed, epochs=500, patience=60)
    predictor.save(work / "predictor")
    _, test = split_indices(len(accs), 0.1, metrics["members"], np.random.default_rng(args.seed))
    test_pred = predictor.predict([cfgs[i] for i in test])
    # The same held-out subnets judged against their accuracy on the images alone (one view), and
    # apart by sampler (the balanced ones are the kind every earlier run was judged on).
    plain = np.array([rows[i]["val_acc_plain"] for i in test])
    by_sampler = {}
    for smp in counts:
        mask = np.array([rows[i]["sampler"] == smp for i in test])
        if mask.sum() >= 10:
            by_sampler[smp] = {"n": int(mask.sum()), **regression_metrics(test_pred[mask], accs[test][mask])}
    res["predictor"] = {"kendall_tau": metrics["kendall_tau"], "rmse_pts": metrics["rmse"],
                        "mae_pts": metrics["mae"], "spearman_rho": metrics["spearman_rho"],
                        "labels": "validation accuracy over each image and its mirror image",
                        "vs_plain_labels": regression_metrics(test_pred, plain),
                        "by_sampler": by_sampler,
                        "model": f"{metrics['members']} x MLP "
                                 f"{'x'.join(map(str, predictor.hidden))}, cross-fitted",
                        "n_fit": metrics["n_fit"], "n_test": metrics["n_test"]}
    log(f"predictor {res['predictor']}")
    save()

    # 3. latency tables at 1 and 2 threads, batch 1
    res.setdefault("latency", {})

    tables = {}
    for threads in (1, 2):
        key = latency_key(threads)
        path = work / f"latency_t{threads}_b1.json"
        prof = Profiler("onnxruntime", threads, 1)
        if not path.exists():
            build_latency_table(space, prof).save(path)
        tables[(threads, 1)] = table = LatencyTable.load(path, space)
        if key not in res["latency"]:
            res["latency"][key] = validate(table, prof, net, args.seed)
            save()
        log(f"latency {key}: {res['latency'][key]}")

    # 4. search speed: the paper's settings, MACs constraint
    costs = CostTable.build(space)
    t = time.monotonic()
    evolution_search(space, predictor.predict, costs.macs, 6e6, np.random.default_rng(args.seed),
                     EvolutionConfig())
    res["search"] = {"ours_s": round(time.monotonic() - t, 3),
                     "ours_predictor": "this run's fitted predictor"}
    fold_reference(res)
    save()

    # 5. targets
    evaluator_val = SubnetEvaluator(net, data, split="val", seed=args.seed, mirror=True)
    evaluator_test = SubnetEvaluator(net, data, split="test", seed=args.seed)
    # Validation accuracy of uniform subnets, kept in the work folder: a measurement of the
    # supernet alone, so a later run (say, of one target) reuses it
    uniform_path = work / "uniform_val.json"
    uniform_val: dict[str, float] = json.loads(uniform_path.read_text()) if uniform_path.exists() else {}

    def uniform_acc(c: SubnetConfig) -> float:
        if c.to_json() not in uniform_val:
            uniform_val[c.to_json()] = evaluator_val(c)
            uniform_path.write_text(json.dumps(uniform_val))
        return uniform_val[c.to_json()]

    res.setdefault("targets", {})
    for target in load_targets(args.targets):
        tdir = work / "targets" / target.name
        latency_path = None
        if target.constraint.kind == "latency_ms":
            latency_path = tdir / "latency.json"
            key = (target.threads, target.batch_size)
            if key not in tables:
                prof = Profiler(target.runtime, target.threads, target.batch_size)
                if not latency_path.exists():
                    build_latency_table(space, prof).save(latency_path)
                tables[key] = table = LatencyTable.load(latency_path, space)
                name = latency_key(target.threads, target.batch_size)
                if name not in res["latency"]:  # this target's own table, validated the same way
                    res["latency"][name] = validate(table, prof, net, args.seed)
                    save()
            else:
                tdir.mkdir(parents=True, exist_ok=True)
                tables[key].save(latency_path)
            target = resolve_budget(space, target, tables[key])  # budget_of_max: in ms, as the search does
        # validation feedback: the search measures its best points and fits the predictor again
        refine = Refinement(evaluator_val, cfgs, accs)
        result = search_target(space, target, work / "predictor.safetensors", tdir,
                               latency_path=latency_path, seed=args.seed, refine=refine)
        doc = json.loads((tdir / "search.json").read_text())
        picked, selection = select_on_validation(net, data, doc, seed=args.seed)
        pick = selection["shortlist"][selection["picked"]]
        probe_ref = doc.get("verification", {}).get("host_probe_reference_ms")
        card = export_subnet(args.supernet, picked, data, target, tdir / "model",
                             predicted_accuracy=pick["predicted_acc"],
                             predicted_latency_ms=pick.get("latency_ms"), host_probe_reference_ms=probe_ref,
                             seed=args.seed, net=net, extra={"selection": selection})
        kept = keep / "targets" / target.name
        (kept / "model").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tdir / "model" / "model_card.json", kept / "model" / "model_card.json")
        if latency_path is not None:
            shutil.copyfile(latency_path, kept / "latency.json")
        # Best uniform subnet under the same budget, chosen on validation, judged on test.
        # A latency budget is judged as the searched pick is (measured on the target's runtime
        # with the card's statistic, against the budget less its headroom), every uniform subnet
        # measured, not only those the table says fit.
        every = uniform_configs(space)
        if latency_path:
            metric = measure_configs(card_profiler(target.runtime, target.threads, target.batch_size,
                                                   tables[(target.threads, target.batch_size)].probe_ms),
                                     net, every)
        else:
            metric = constraint_fn(space, target, None)(every)
        uniform_metric = {c.to_json(): float(m) for c, m in zip(every, metric)}
        uniform = [c for c in every if uniform_metric[c.to_json()] <= target.constraint.search_budget]
        best_u = None
        for c in uniform:
            if best_u is None or uniform_acc(c) > uniform_acc(best_u):
                best_u = c
        u_test = evaluator_test(best_u) if best_u else None
        s_val = evaluator_val(picked)
        pareto_plot(doc, tdir / "pareto.png", tdir / "pareto.html",
                    points=[(uniform_metric[best_u.to_json()], uniform_val[best_u.to_json()],
                             "best uniform (val)")] if best_u else [])
        (ROOT / "docs" / "pareto").mkdir(parents=True, exist_ok=True)
        (ROOT / "docs" / "pareto" / f"{target.name}.png").write_bytes((tdir / "pareto.png").read_bytes())
        rep = reproduce_card(tdir / "model" / "model_card.json", args.data_dir)
        res["targets"][target.name] = {
            "constraint": target.constraint.kind, "budget": target.constraint.budget,
            "headroom_pct": target.constraint.headroom_pct,
            **({"budget_of_max": target.constraint.budget_of_max} if target.constraint.budget_of_max else {}),
            "searched_test_acc": card["accuracy"]["test_top1_pct_onnxruntime"],
            "searched_val_acc": round(s_val, 3),
            "predicted_acc": pick["predicted_acc"], "searched_metric": pick[doc["metric_name"]],
            "searched_config": picked.to_dict(),
            "search_best_config": result.best.to_dict(), "shortlist_pick": selection["picked"],
            "best_uniform_test_acc": None if u_test is None else round(u_test, 3),
            "best_uniform_val_acc": None if best_u is None else uniform_val[best_u.to_json()],
            "best_uniform_config": None if best_u is None else best_u.to_dict(),
            "best_uniform_metric": None if best_u is None else uniform_metric[best_u.to_json()],
            "uniform_rule": "measured on the target's runtime" if latency_path else "analytic",
            "uniform_feasible": len(uniform), "macs": card["macs"], "params": card["params"],
            "measured_latency_ms": card["latency"]["measured_ms"],
            "predicted_latency_ms": card["latency"]["predicted_ms"],
            "card_host_probe_ms": card["latency"]["host_probe_ms"],
            "host_probe_reference_ms": card["latency"]["host_probe_reference_ms"],
            "search_s": doc["search_s"], "reproduced": rep,
            "search_rounds": len(doc.get("verification", {}).get("rounds", [])) or 1,
            "latency_verified": doc.get("verification", {}).get("verified"),
            "refinement": {"rounds": len(doc["refinement"]["rounds"]),
                           "per_round": doc["refinement"]["per_round"],
                           "weight": doc["refinement"]["weight"], "wall_s": doc["refinement"]["wall_s"],
                           "val_acc_by_round": [[m["val_acc"] for m in r["measured"]]
                                                for r in doc["refinement"]["rounds"]]},
        }
        log(f"target {target.name}: {res['targets'][target.name]}")
        save()

    # The corners: every uniform subnet (the max among them), predicted against measured validation.
    max_cfg = space.max_config()
    ucfgs = uniform_configs(space)
    uval = np.array([uniform_acc(c) for c in ucfgs])
    upred = predictor.predict(ucfgs)
    res["predictor"]["uniform_subnets"] = {
        "n": len(ucfgs), **regression_metrics(upred, uval),
        "bias_pts": round(float(np.mean(upred - uval)), 3),
        "max_subnet": {"predicted": round(float(predictor.predict([max_cfg])[0]), 3),
                       "val_acc": uniform_acc(max_cfg)}}
    log(f"uniform subnets: {res['predictor']['uniform_subnets']}")
    save()

    from render import render

    render()
    return 0


if __name__ == "__main__":
    sys.exit(main())
