"""Per-target specialization stages: profile, search, export; plus the Pareto plot.

Each function takes paths and configs and writes its outputs into a folder, so the CLI, a KFP
component and a benchmark call the same code.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..supernet.efficiency import CostTable
from ..errors import UserError
from .latency import (LatencyTable, Profiler, build_latency_table, card_profiler, measure_configs,
                      validate_latency_table)
from .predictor import AccuracyPredictor, fit_predictor
from .search import EvolutionConfig, SearchResult, evolution_search
from ..supernet.space import SearchSpace, SubnetConfig
from ..supernet.subnet_batch import SubnetBatch
from .targets import Constraint, Target

log = logging.getLogger(__name__)

SEARCH_RESULT = "search.json"
SHORTLIST = 8  # Pareto points (and as many feedback-measured subnets) the export picks from


def profile_target(space: SearchSpace, target: Target, out_path: str | Path, *,
                   validate: int = 0, seed: int = 0, device: str = "", copies: int = 8,
                   rounds: int = 8, window_s: float = 2.0,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Measure the latency table of ``target`` here (run this on the target's hardware): each block
    variant timed as ``copies`` copies in one graph (build_latency_table), the smallest of
    ``rounds`` interleaved medians spanning at least ``window_s``."""
    profiler = Profiler(target.runtime, target.threads, target.batch_size, blocks=rounds, window_s=window_s)
    table = build_latency_table(space, profiler, device=device, copies=copies, progress=progress)
    table.save(out_path)
    summary: dict[str, Any] = {"table": str(out_path), "build_s": table.build_s,
                               "overhead_ms": table.overhead_ms}
    if validate:
        summary["validation"] = validate_latency_table(table, profiler, n=validate, seed=seed)
    return summary


def _no_table(target: Target) -> UserError:
    return UserError(f"target {target.name!r} has a latency budget but no latency table",
                     field="latency", fix="run the profile stage for this target first")


def resolve_budget(space: SearchSpace, target: Target, latency: LatencyTable | None) -> Target:
    """``target`` with a budget_of_max latency budget in ms: that fraction of the max subnet's
    latency as ``latency``, this target's table, predicts it. Other targets come back as they are.

    A fraction too small for any subnet (the min subnet's share, less the headroom) is a
    UserError naming the smallest fraction that fits."""
    c = target.constraint
    if c.budget_of_max is None or c.budget is not None:
        return target
    if latency is None:
        raise _no_table(target)
    max_ms, min_ms = latency.predict_one(space.max_config()), latency.predict_one(space.min_config())
    resolved = c.resolved(max_ms)
    if resolved.search_budget < min_ms:
        smallest = min_ms / max_ms / (1.0 - c.headroom_pct / 100.0)
        raise UserError(f"the budget_of_max {c.budget_of_max:g} of target {target.name!r} is "
                        f"{resolved.budget:.4g} ms on its table (less {c.headroom_pct:g}% headroom "
                        f"{resolved.search_budget:.4g}), below the min subnet's {min_ms:.4g} ms",
                        field="constraint.budget_of_max",
                        fix=f"give at least {math.ceil(smallest * 1000) / 1000:g}")
    log.info("%s: latency budget %g of the max subnet's %.4g ms = %.4g ms", target.name,
             c.budget_of_max, max_ms, resolved.budget)
    return replace(target, constraint=resolved)


def constraint_fn(space: SearchSpace, target: Target,
                  latency: LatencyTable | None) -> Callable[[SubnetBatch], np.ndarray]:
    kind = target.constraint.kind
    if kind == "latency_ms":
        if latency is None:
            raise _no_table(target)
        return latency.predict
    costs = CostTable.build(space)
    return costs.macs if kind == "macs" else costs.params


@dataclass(frozen=True)
class Refinement:
    """Validation feedback for the search (search_target).

    The predictor's error is not noise spread evenly: on the `standard` supernet it rated the
    region its first search settled in 0.2-0.3 points high, all five ensemble members alike, and
    that search's 8 best points measured 91.53-91.67 on validation against 91.66 for the best
    uniform subnet. So, ``rounds`` times: measure the best-scoring Pareto points not measured yet
    (``per_round``) with ``evaluate`` (validation accuracy in %, measured as ``accuracies`` were),
    add them to the predictor's data ``weight`` times over (a few points must move a fit on ~1,000),
    fit the predictor again and search again. Measured there (`make bench-specialize`, edge
    budget): rounds 2-4 measured 91.63-92.07, and on test (a diagnostic, never used to pick) their
    mean rose from 91.29 in round 1 to 91.46-91.47.
    """

    evaluate: Callable[[SubnetConfig], float]
    configs: Sequence[SubnetConfig]  # the predictor's data
    accuracies: Sequence[float]
    rounds: int = 4
    per_round: int = 8
    weight: int = 3


def _refine(space: SearchSpace, predictor: AccuracyPredictor,
            search: Callable[[AccuracyPredictor], SearchResult], result: SearchResult,
            refine: Refinement, seed: int) -> tuple[AccuracyPredictor, SearchResult, dict[str, Any]]:
    """The rounds of a Refinement; returns the last predictor and search, and a record of them."""
    measured: dict[str, float] = {}
    cfgs: list[SubnetConfig] = []
    rounds = []
    for r in range(refine.rounds):
        top = sorted(result.pareto, key=lambda p: -p.score)
        new = [p for p in top if _key(p.config) not in measured][:refine.per_round]
        if not new:
            break
        rows = []
        for p in new:
            measured[_key(p.config)] = refine.evaluate(p.config)
            cfgs.append(p.config)
            rows.append({"config": p.config.to_dict(), "predicted_acc": round(p.score, 3),
                         "metric": p.metric, "val_acc": round(measured[_key(p.config)], 3)})
        rounds.append({"measured": rows, "best_val_acc": round(max(measured.values()), 3)})
        log.info("refine round %d/%d: measured %s on validation (predicted %s)", r + 1, refine.rounds,
                 [row["val_acc"] for row in rows], [row["predicted_acc"] for row in rows])
        predictor, _ = fit_predictor(space, [*refine.configs, *cfgs * refine.weight],
                                     np.concatenate([np.asarray(refine.accuracies, dtype=float),
                                                     np.tile([measured[_key(c)] for c in cfgs],
                                                             refine.weight)]),
                                     seed=seed + r)
        result = search(predictor)
    record = {"rounds": rounds, "per_round": refine.per_round, "weight": refine.weight,
              "rows": len(refine.configs), "measured": measured}
    return predictor, result, record


def _key(cfg: SubnetConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def search_target(space: SearchSpace, target: Target, predictor_path: str | Path,
                  out_dir: str | Path, *, latency_path: str | Path | None = None, seed: int = 0,
                  config: EvolutionConfig = EvolutionConfig(), verify_rounds: int = 3,
                  shortlist: int = SHORTLIST, refine: Refinement | None = None) -> SearchResult:
    """Evolutionary search under the target's hard constraint; writes ``search.json``.

    With ``refine``, the search takes validation feedback first (see Refinement); the Pareto points
    it measured keep their ``val_acc`` (as the predictor's rows were measured, which may be fewer
    images than the pick on validation uses), and ``search.json`` its rounds under ``refinement``.

    A budget_of_max budget is resolved to ms against the table first (resolve_budget); search.json's
    ``target`` records it so. The search plans for the constraint's ``search_budget`` (the budget
    less its headroom_pct). A latency budget is searched on the table's predictions, and a table
    is an estimate: the pick is then measured end to end on the target's runtime (this stage runs
    on the target's hardware), with the host probe checked against the table's (card_profiler).
    While it measures over the search budget, the search runs again with the budget scaled down
    by how far the table was off, up to ``verify_rounds`` searches in all (0: no measurement).
    ``search.json`` keeps every round; when no round fits, the last pick is kept and ``verified``
    is false.

    ``search.json``'s ``shortlist`` is what select_on_validation picks from: the last search's
    ``shortlist`` best-scoring Pareto points and as many of the best subnets the feedback measured.
    Under a latency budget each is measured too (``measured_ms``), so that the pick on validation
    is among subnets measured within the search budget.
    """
    import time

    predictor = AccuracyPredictor.load(predictor_path, space)
    latency = LatencyTable.load(latency_path, space) if latency_path else None
    target = resolve_budget(space, target, latency)
    constraint = constraint_fn(space, target, latency)
    budget = target.constraint.search_budget

    def search(pred: AccuracyPredictor, within: float = budget) -> SearchResult:
        return evolution_search(space, pred.predict, constraint, within, np.random.default_rng(seed),
                                config, metric_name=target.constraint.kind)

    t0 = time.monotonic()
    result = search(predictor)
    seconds = time.monotonic() - t0
    refinement = None
    if refine is not None and refine.rounds > 0:
        t1 = time.monotonic()
        predictor, result, refinement = _refine(space, predictor, search, result, refine, seed)
        refinement["wall_s"] = round(time.monotonic() - t1, 3)
    rounds: list[dict[str, Any]] = []
    # An imported table's numbers are another device's (a phone's): nothing here can check them.
    if latency is not None and verify_rounds > 0 and latency.source is None:
        import torch

        from ..supernet.supernet import OFASupernet

        torch.manual_seed(seed)
        net = OFASupernet(space).eval()  # latency does not depend on the weights
        profiler = card_profiler(target.runtime, target.threads, target.batch_size, latency.probe_ms)
        t1 = time.monotonic()
        while True:
            probe: list[float] = []
            measured = float(measure_configs(profiler, net, [result.best], probe_out=probe)[0])
            rounds.append({"search_budget_ms": round(result.budget, 5),
                           "predicted_ms": round(latency.predict_one(result.best), 5),
                           "measured_ms": round(measured, 5), "config": result.best.to_dict(),
                           **({"host_probe_ms": round(probe[0], 5)} if probe else {})})
            if measured <= budget or len(rounds) >= verify_rounds:
                break
            # The table under-predicted this pick by measured/predicted: ask for that much less.
            tighter = result.budget * budget / measured * 0.98
            try:
                result = search(predictor, tighter)
            except UserError:  # no subnet is predicted that fast: keep the last pick, unverified
                break
    # The shortlist the export picks from on validation: the best-scoring Pareto points, and the
    # best subnets its validation feedback measured (they need not be on the last front).
    top = [p.config for p in sorted(result.pareto, key=lambda p: -p.score)[:shortlist]]
    validated = sorted(refinement["measured"].items(), key=lambda kv: -kv[1]) if refinement else []
    seen = {_key(c) for c in top}
    short = top + [c for c in (SubnetConfig.from_dict(json.loads(k), space) for k, _ in validated)
                   if _key(c) not in seen][:shortlist]
    short_ms: dict[str, float] = {}
    short_probe: list[float] = []
    if rounds:
        short_ms = dict(zip(map(_key, short), measure_configs(profiler, net, short,
                                                              probe_out=short_probe).tolist()))
        verify_s = time.monotonic() - t1
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"target": target.to_dict(), "search_s": round(seconds, 3), "seed": seed,
           "settings": {"population": config.population, "generations": config.generations,
                        "parent_ratio": config.parent_ratio, "mutation_ratio": config.mutation_ratio,
                        "mutate_prob": config.mutate_prob}, **result.to_dict()}
    if latency is not None:
        doc["predicted_latency_ms"] = latency.predict_one(result.best)
        if latency.source is not None:
            doc["latency_source"] = latency.source
    val_acc = refinement.pop("measured") if refinement is not None else {}
    scores, metrics = predictor.predict(short), constraint(short)
    doc["shortlist"] = [{"config": c.to_dict(), "score": float(sc), "metric": float(m),
                         "from": "pareto" if i < len(top) else "validation feedback",
                         **({"measured_ms": round(short_ms[_key(c)], 5)} if _key(c) in short_ms else {}),
                         **({"val_acc": round(val_acc[_key(c)], 3)} if _key(c) in val_acc else {})}
                        for i, (c, sc, m) in enumerate(zip(short, scores, metrics))]
    for point in doc["pareto"]:  # for the plot and the record
        key = json.dumps(point["config"], sort_keys=True)  # _key of its config
        if key in val_acc:
            point["val_acc"] = round(val_acc[key], 3)
        if key in short_ms:
            point["measured_ms"] = round(short_ms[key], 5)
    if refinement is not None:
        doc["refinement"] = refinement
    if rounds:
        doc["verification"] = {"rounds": rounds, "verified": rounds[-1]["measured_ms"] <= budget,
                               "budget_less_headroom_ms": round(budget, 5),
                               "measured_latency_ms": rounds[-1]["measured_ms"], "wall_s": round(verify_s, 3),
                               "statistic": profiler.statistic,
                               "host_probe_reference_ms": latency.probe_ms,
                               "shortlist_host_probe_ms": [round(v, 5) for v in short_probe]}
    (out_dir / SEARCH_RESULT).write_text(json.dumps(doc, indent=1))
    return result


def select_on_validation(net: Any, data: Any, search: dict[str, Any], *, k: int = SHORTLIST,
                         seed: int = 0, mirror: bool = True) -> tuple[SubnetConfig, dict[str, Any]]:
    """The subnet to export: of the search's shortlist (its best-scoring Pareto points and the
    best subnets its validation feedback measured, all within budget; for a search.json without
    one, its ``k`` best-scoring Pareto points), the one with the highest measured validation
    accuracy (BN recalibrated and, with ``mirror``, over each image and its mirror image, as the
    predictor's data is measured; measured again here, on every validation image). The predictor
    ranks subnets to within its error (RMSE ~0.2 points), and the points near the top of the front
    differ by less than that; a few real evaluations settle it. Points the search measured over a
    latency budget less its headroom (``measured_ms``, see search_target) are left out.

    ``net`` is the supernet, ``data`` a dataset with a validation split; ``k`` <= 1 keeps the
    search's best. Returns the config and a record for the model card: ``shortlist`` (each row's
    config, predicted accuracy and constrained metric) and ``picked``, the index of the pick.
    """
    from .accuracy_data import SubnetEvaluator

    space = net.space
    if k <= 1:
        row = {"config": search["best"], "predicted_acc": round(search["best_score"], 3),
               search["metric_name"]: search["best_metric"]}
        return (SubnetConfig.from_dict(search["best"], space),
                {"rule": "the search's best (no shortlist)", "picked": 0, "shortlist": [row]})
    budget = Constraint(**search["target"]["constraint"]).search_budget
    # the search's shortlist (its best-scoring Pareto points and the best subnets its validation
    # feedback measured); a search.json from before it had one: the k best-scoring Pareto points
    listed = search.get("shortlist") or search["pareto"]
    listed = [p for src in ("pareto", "validation feedback")
              for p in sorted((p for p in listed if p.get("from", "pareto") == src),
                              key=lambda p: -p["score"])[:k]]
    points = [p for p in listed if p.get("measured_ms", 0.0) <= budget]
    if not points:
        return select_on_validation(net, data, search, k=1)
    evaluate = SubnetEvaluator(net, data, split="val", seed=seed, mirror=mirror)
    rows = [{"config": p["config"], "predicted_acc": round(p["score"], 3),
             search["metric_name"]: p["metric"], **({"from": p["from"]} if "from" in p else {}),
             **({"measured_ms": p["measured_ms"]} if "measured_ms" in p else {}),
             "val_acc": round(evaluate(SubnetConfig.from_dict(p["config"], space)), 3)}
            for p in points]
    picked = max(range(len(rows)), key=lambda i: (rows[i]["val_acc"], rows[i]["predicted_acc"]))
    views = " (each image and its mirror image)" if mirror else ""
    measured = (f" ({len(rows)} of them measured within the budget)"
                if any("measured_ms" in p for p in listed) else "")
    fed = sum(p.get("from") == "validation feedback" for p in listed)
    among = (f"the search's {len(listed) - fed} best-scoring Pareto points"
             + (f" and the {fed} best subnets its validation feedback measured" if fed else ""))
    return (SubnetConfig.from_dict(rows[picked]["config"], space),
            {"rule": f"highest validation accuracy{views} among {among}{measured}", "picked": picked,
             "shortlist": rows})


def uniform_configs(space: SearchSpace) -> list[SubnetConfig]:
    """Every subnet with the same depth, kernel and expand ratio everywhere, at every resolution."""
    return [space.uniform_config(d, k, e, r) for d in space.depths for k in space.kernels
            for e in space.expands for r in space.resolutions]


def pareto_plot(search: dict[str, Any], out_png: str | Path, out_html: str | Path | None = None, *,
                points: list[tuple[float, float, str]] = ()) -> None:
    """Predicted accuracy vs the constrained metric: the front, the pick, the budget, extra points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = search["pareto"]
    kind = search["metric_name"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot([p["metric"] for p in front], [p["score"] for p in front], "-o", ms=3,
            label="Pareto front (predicted)")
    ax.axvline(search["budget"], color="grey", ls=":", label=f"budget {search['budget']:g}")
    ax.plot([search["best_metric"]], [search["best_score"]], "r*", ms=14, label="searched subnet")
    for x, y, label in points:
        ax.plot([x], [y], "s", ms=6, label=label)
    ax.set_xlabel({"latency_ms": "predicted latency (ms)", "macs": "MACs",
                   "params": "parameters"}[kind])
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{search['target']['name']}: {kind} <= {search['budget']:g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    Path(out_png).write_bytes(buf.getvalue())
    if out_html:
        rows = "".join(f"<tr><td>{p['metric']:.4g}</td><td>{p['score']:.3f}</td>"
                       f"<td><code>{json.dumps(p['config'])}</code></td></tr>" for p in front)
        Path(out_html).write_text(
            "<html><body><h3>Pareto front: " + search["target"]["name"] + "</h3>"
            f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'/>"
            f"<table border=1><tr><th>{kind}</th><th>predicted acc (%)</th><th>config</th></tr>"
            f"{rows}</table></body></html>")
