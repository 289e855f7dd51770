"""The claim, measured: OFA subnets against the same architectures trained from scratch and against a
per-target NAS, and the cost of N targets against both.

    python bench/claim.py [--seeds 0 1 2] [--nas-seeds 0] [--kinds ...] [--budget-min 60] [--carbon 475]
    python bench/claim.py --tiny --work /tmp/claim-tiny   # ~15 s, synthetic data: the harness only

Quality: for every example target, the subnet the search picked on the `standard` supernet (from
`make bench-specialize`) is
  * taken as exported (no retraining): `ofa_test_acc`, from its model card;
  * fine-tuned from its supernet weights: the paper's "OFA #25" and "OFA #75" (25 and 75 of 180
    epochs, 14% and 42%) of the teacher recipe's epochs, lr 0.01, no warm-up:
    `finetune_14_test_acc`, `finetune_42_test_acc`;
  * trained from scratch on the teacher's recipe (its epochs, lr and warm-up, the same data,
    augmentation and batch, at the subnet's own resolution), without and with distillation from the
    standard teacher: `scratch_test_acc`, `scratch_kd_test_acc` (`--seeds 0 1 2`: mean and standard
    deviation), each seed paired with the OFA subnet image by image (exact McNemar test);
  * and, as the paper's alternative, found by a per-target NAS under the same budget and trained
    from scratch on that recipe (onceforall/specialization/nas_baseline.py: K random architectures within the
    budget, a short proxy each, the best on validation trained fully): `nas_test_acc`.
The supernet and teacher are fingerprinted (settings.trained_on: their weights' sha256 and the
teacher's recipe); a rerun on another supernet stops rather than mix rows.
The shared training (teacher + every shrinking phase, the recipe the supernet records) is trained
again in the same run (`shared`), metered, so that its wall time and one training alone of the
largest picked architecture are measured in one benchmark run (issue #21: at most 4x); whether it
reproduced the supernet's weights bit for bit is recorded.
Every training is metered (energy, CO2, wall time), paired with the OFA subnet and recorded in
docs/results/claim.json as soon as it finishes; a rerun skips what is measured, so the suite runs in
pieces, across sessions: what it reads is committed (the supernet and its teacher in bench/supernets
when bench/_work has none, the subnets and latency tables in bench/ledger/claim). Several seeds: mean
and spread.

Cost (onceforall/infra/cost.py), at each scale from what is measured at that scale: OFA with N targets
(shared training once, per-target stages N times) against N trainings alone and N per-target NAS
runs, N = 1, 2, 4, 10, 40, 100; break-even N against each; energy (J, Wh), CO2e at the carbon
setting, wall time; the assumptions beside the numbers. `quick`: docs/results/quick_run_report.json
(`make bench-pipeline`). `standard`: the shared training metered by `make bench-ps` on the same
supernet, the trainings above. The standard result and its provenance are also written to
onceforall/resources/standard_claim.json, which every run's report quotes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from progressive_shrinking import SUPERNET_FIXTURE, machine, weights_sha256  # noqa: E402

from onceforall.infra.cost import NS, Cost, cost_model  # noqa: E402

RESULT = ROOT / "docs" / "results" / "claim.json"
QUICK_REPORT = ROOT / "docs" / "results" / "quick_run_report.json"
PS_RESULTS = ROOT / "docs" / "results" / "progressive_shrinking.json"
RECIPE_RESULTS = ROOT / "docs" / "results" / "recipe.json"
PROVENANCE = ROOT / "onceforall" / "resources" / "standard_claim.json"
WORK = ROOT / "bench" / "_work"
TARGETS = ROOT / "bench" / "ledger" / "specialize" / "targets"  # bench/specialize.py keeps them there
SNAPSHOT = ROOT / "bench" / "ledger" / "claim"  # the subnets measured, committed (see `searched`)
# The paper's "OFA #25" and "OFA #75": fine-tuned for 25 and 75 of the 180 epochs a network trains
# from scratch, here that fraction of the teacher recipe's epochs; lr 0.01, no warm-up.
FINETUNES = {"finetune_14": 25 / 180, "finetune_42": 75 / 180}
FINETUNE_LR = 0.01
KINDS = (*FINETUNES, "scratch", "scratch_kd", "nas", "shared")
PAIRED = ("scratch", "scratch_kd")  # the trainings each OFA subnet is paired with, image by image
SHARED_BAR = 4.0  # issue #21: the shared training costs at most 4x one training alone of the largest pick
SE_POINTS = 0.27  # one standard error of a 10,000-image test set near 92%: the per-target parity bar
COMMAND = ("python bench/claim.py [--seeds ...] [--nas-seeds ...] [--kinds ...] [--budget-min M] "
           "[--standard DIR] [--carbon C] (make bench-claim)")


@dataclasses.dataclass
class Ctx:
    """What one claim run measures on and where it writes."""

    supernet: Path
    teacher: Path
    base_schedule: Any  # the schedule whose teacher phase, as the checkpoint records it, is the recipe
    data: Any
    cards: dict[str, dict]
    tables: dict[str, Path]  # target name -> its latency table (latency targets)
    work: Path  # the trainings' folders
    result: Path
    carbon: str | None
    nas: Any  # NASSettings
    tiny: bool = False
    ofa_right: dict = dataclasses.field(default_factory=dict, repr=False)  # target -> right answers


def trained_on(ctx: Ctx) -> dict:
    """What the claim's rows are measured on: the sha256 of the supernet's and the teacher's weights,
    and the teacher's recipe as its checkpoint records it (the scratch runs use that recipe)."""
    from onceforall.supernet.checkpoint import read_meta

    recipe = read_meta(ctx.teacher)["schedule"]["teacher"]
    return {"supernet_sha256": weights_sha256(ctx.supernet), "teacher_sha256": weights_sha256(ctx.teacher),
            "teacher_recipe": {k: recipe[k] for k in ("epochs", "lr", "warmup_epochs")}
            | {"resolutions": recipe.get("n_resolutions") or "all"}}


def check_same_supernet(doc: dict, ctx: Ctx) -> None:
    """A resumed claim must not mix rows measured on two different supernets."""
    now = trained_on(ctx)
    then = doc.setdefault("settings", {}).get("trained_on")
    if then and (then["supernet_sha256"], then["teacher_sha256"]) != (now["supernet_sha256"],
                                                                     now["teacher_sha256"]):
        raise SystemExit(f"{ctx.result} was measured on another supernet (sha256 "
                         f"{then['supernet_sha256'][:12]}, now {now['supernet_sha256'][:12]}): move it "
                         f"and {ctx.work} aside to measure the new one from the start")
    doc["settings"]["trained_on"] = then or now


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def searched(targets: Path, snapshot: Path, supernet: Path) -> tuple[dict[str, dict], dict[str, Path]]:
    """Target name -> the model card of the subnet the claim measures, and target name -> the latency
    table its search used (latency targets; the per-target NAS searches within it).

    The claim measures the subnets of one specialization run: the first time it sees a target it
    snapshots that target's card and latency table into SNAPSHOT (committed: the claim runs for hours,
    in pieces, across sessions, and a fresh checkout keeps no ignored folder), and from then on it
    reads the snapshot, so a later `make bench-specialize` (which may pick other subnets, or time
    another host) never mixes results of different architectures or budgets into one row. The
    snapshot names its supernet's sha256 and is refused for another supernet.
    """
    if not (supernet / "checkpoint.json").is_file():
        raise SystemExit(f"needs the standard supernet ({supernet}): run `make bench-ps` first")
    sha = weights_sha256(supernet)
    marker = targets.parent / "supernet_sha256"  # which supernet the specialization searched on
    if marker.is_file() and marker.read_text().strip() != sha:
        raise SystemExit(f"{targets} holds the subnets searched on another supernet (sha256 "
                         f"{marker.read_text().strip()[:12]}, now {sha[:12]}): run `make bench-specialize` "
                         "on this one")
    index_path = snapshot / "subnets.json"
    index = load(index_path) or {"supernet_sha256": sha, "cards": {}}
    if index["supernet_sha256"] != sha:
        raise SystemExit(f"{index_path} holds the subnets searched on another supernet (sha256 "
                         f"{index['supernet_sha256'][:12]}, now {sha[:12]}): move {snapshot} and "
                         f"{RESULT.relative_to(ROOT)} aside to measure the new one from the start")
    for card_path in sorted(targets.glob("*/model/model_card.json")):
        name = card_path.parent.parent.name
        if name not in index["cards"]:
            index["cards"][name] = json.loads(card_path.read_text())
            table = card_path.parent.parent / "latency.json"
            if table.is_file():
                (snapshot / "latency").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(table, snapshot / "latency" / f"{name}.json")
            save(index, index_path)
    if not index["cards"]:
        raise SystemExit("needs the subnets searched on the standard supernet: run `make bench-specialize` "
                         "first")
    tables = {n: snapshot / "latency" / f"{n}.json" for n, c in index["cards"].items()
              if c["target"]["constraint"]["kind"] == "latency_ms"}
    return index["cards"], tables


def recipe_schedule(ctx: Ctx):
    """The scratch recipe: the teacher's as its checkpoint records it, not as the code says today."""
    recipe = trained_on(ctx)["teacher_recipe"]
    s = ctx.base_schedule
    return dataclasses.replace(s, teacher=dataclasses.replace(
        s.teacher, epochs=recipe["epochs"], lr=recipe["lr"], warmup_epochs=recipe["warmup_epochs"]))


def train_one(kind: str, name: str, card: dict, seed: int, ctx: Ctx) -> dict:
    """One training (or one per-target NAS), metered; a finished folder is read back."""
    from onceforall.supernet.space import SubnetConfig

    out = ctx.work / name / f"{kind}-s{seed}"
    net = _supernet(ctx.supernet)
    if kind == "nas":
        return nas_one(name, card, seed, ctx, net.space, out)
    cfg = SubnetConfig.from_dict(card["subnet"], net.space, name)
    kwargs: dict = {"seed": seed, "progress": not ctx.tiny}
    if kind in FINETUNES:
        kwargs.update(init=net.get_active_subnet(cfg), epochs=finetune_epochs(kind, ctx), lr=FINETUNE_LR)
    elif kind == "scratch_kd":
        kwargs.update(teacher=ctx.teacher)
    return metered_static(net.space, recipe_schedule(ctx), cfg, ctx, out, kwargs)


def finetune_epochs(kind: str, ctx: Ctx) -> float:
    """The fraction of the scratch epochs, exact to a step (a phase may run part of an epoch)."""
    return round(FINETUNES[kind] * recipe_schedule(ctx).teacher.epochs, 3)


def metered_static(space, schedule, cfg, ctx: Ctx, out: Path, kwargs: dict) -> dict:
    from onceforall.infra.energy import Meter
    from onceforall.training.train import RESUME_DIR, train_static

    fresh = not (out / "result.json").is_file()
    # a training cut short starts over, so that its energy is metered whole
    shutil.rmtree(out / RESUME_DIR, ignore_errors=True)
    with Meter(ctx.carbon) as meter:
        result = train_static(space, schedule, cfg, ctx.data, out, **kwargs)
    if fresh:
        result["energy"] = meter.reading.to_dict()
        (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def nas_one(name: str, card: dict, seed: int, ctx: Ctx, space, out: Path) -> dict:
    """The per-target NAS under the budget the OFA search had (the card's, in ms for a latency
    target), with the target's own latency table; recorded like a training."""
    from onceforall.specialization.latency import LatencyTable
    from onceforall.specialization.nas_baseline import run_nas
    from onceforall.specialization.targets import Target

    target = Target.from_dict(card["target"], where=f"{name} card target")
    table = LatencyTable.load(ctx.tables[name], space) if name in ctx.tables else None
    doc = run_nas(space, recipe_schedule(ctx), target, ctx.data, out, latency=table, settings=ctx.nas,
                  seed=seed, progress=not ctx.tiny, carbon=ctx.carbon)
    f, total = doc["final"], doc["energy"]["total"]
    return {"test_acc": f["test_acc"], "val_acc": f["val_acc"], "train_wall_s": total["duration_s"],
            "epochs": f["epochs"], "lr": recipe_schedule(ctx).teacher.lr, "energy": total,
            "nas": {"config": f["config"], "metric": f["metric"], "picked": doc["picked"],
                    "candidates": len(doc["candidates"]), "search_j": doc["energy"]["search"]["total_j"],
                    "final_j": doc["energy"]["final"]["total_j"],
                    "proxy_val_acc": [c["val_acc"] for c in doc["candidates"]]}}


def quality(doc: dict, ctx: Ctx, plan: list[tuple[int, str]], budget_s: float) -> None:
    t0 = time.monotonic()
    targets = doc.setdefault("targets", {})
    for name, card in ctx.cards.items():
        t = targets.setdefault(name, {})
        t["ofa_test_acc"] = card["accuracy"]["test_top1_pct_onnxruntime"]
        t["subnet"], t["macs"], t["params"] = card["subnet"], card["macs"], card["params"]
    for seed, kind in plan:
        for name, card in ctx.cards.items():
            runs = targets[name].setdefault("runs", {}).setdefault(kind, {})
            if str(seed) in runs:
                continue
            if time.monotonic() - t0 > budget_s:
                print(f"budget spent; rerun to continue ({kind} {name} seed {seed} next)", file=sys.stderr)
                return
            print(f"[claim] {kind} {name} seed {seed}", file=sys.stderr)
            r = train_one(kind, name, card, seed, ctx)
            runs[str(seed)] = {k: r[k] for k in ("test_acc", "val_acc", "train_wall_s", "epochs", "lr")}
            runs[str(seed)]["energy_j"] = r.get("energy", {}).get("total_j")
            runs[str(seed)]["g_per_kwh"] = r.get("energy", {}).get("g_per_kwh")
            runs[str(seed)]["wall_s"] = r.get("energy", {}).get("duration_s")  # metered, evaluation too
            if "nas" in r:
                runs[str(seed)]["nas"] = r["nas"]
            if kind in PAIRED:
                pair(targets[name], name, card, kind, str(seed), ctx)
            summarize(targets[name])
            save(doc, ctx.result)


def summarize(t: dict) -> None:
    for kind, runs in t.get("runs", {}).items():
        accs = [r["test_acc"] for r in runs.values()]
        if accs:
            t[f"{kind}_test_acc"] = round(statistics.mean(accs), 3)
            t[f"{kind}_test_acc_sd"] = round(statistics.stdev(accs), 3) if len(accs) > 1 else None
            t[f"{kind}_seeds"] = len(accs)
    if "scratch_test_acc" in t:
        best = max(t.get("scratch_test_acc", 0), t.get("scratch_kd_test_acc", 0))
        t["ofa_minus_best_scratch"] = round(t["ofa_test_acc"] - best, 3)
    if "nas_test_acc" in t:
        t["ofa_minus_nas"] = round(t["ofa_test_acc"] - t["nas_test_acc"], 3)
    if "scratch_test_acc" in t:
        t["ofa_within_se_of_scratch"] = t["ofa_test_acc"] >= t["scratch_test_acc"] - SE_POINTS


# -- paired tests and the issue's bars ---------------------------------------------------------

def mcnemar(ofa_right, other_right) -> dict:
    """Exact McNemar test of two classifiers on the same images: the images only one of them gets
    right, and the two-sided binomial p-value of that split under 'equally good'."""
    from scipy.stats import binomtest

    ofa_only = int((ofa_right & ~other_right).sum())
    other_only = int((~ofa_right & other_right).sum())
    n = ofa_only + other_only
    p = 1.0 if n == 0 else binomtest(ofa_only, n, 0.5).pvalue
    return {"ofa_only": ofa_only, "other_only": other_only, "p": round(float(p), 4)}


def test_right(model, data, resolution: int):
    """Which test images ``model`` classifies right (numpy bool, in test order)."""
    import torch

    from onceforall.data import eval_batches

    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x).argmax(1) == y for x, y in eval_batches(data, "test", resolution)]).numpy()


def ofa_right(ctx: Ctx, card: dict, net):
    """The exported subnet's right answers, recomputed from the supernet ``net`` as the export
    computes them (BN recalibrated on the card's images and seed)."""
    from onceforall.supernet.bn import recalibrate_bn_batches
    from onceforall.data import calibration_batches
    from onceforall.supernet.space import SubnetConfig

    cfg = SubnetConfig.from_dict(card["subnet"], net.space)
    subnet = net.get_active_subnet(cfg)
    bn = card.get("bn_recalibration", {})
    recalibrate_bn_batches(subnet, calibration_batches(ctx.data, bn.get("images", 2000), bn.get("seed", 0),
                                                       cfg.r), semantics=net.bn_semantics)
    return test_right(subnet, ctx.data, cfg.r)


def static_right(ctx: Ctx, card: dict, folder: Path, space):
    """A training's right answers, from the weights it wrote (train_static's model.safetensors)."""
    from safetensors.torch import load_file

    from onceforall.supernet.space import SubnetConfig
    from onceforall.supernet.supernet import OFASupernet

    cfg = SubnetConfig.from_dict(card["subnet"], space)
    model = OFASupernet(space).get_active_subnet(cfg)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return test_right(model, ctx.data, cfg.r)


def significance(doc: dict, ctx: Ctx) -> None:
    """Every OFA subnet paired with every seed of the trainings in PAIRED (McNemar, per target) that
    is not yet: `quality` pairs each training as it finishes; this catches up on older rows."""
    for name, card in ctx.cards.items():
        t = doc["targets"][name]
        for kind in PAIRED:
            for seed in t.get("runs", {}).get(kind, {}):
                if seed not in t.get("mcnemar", {}).get(kind, {}):
                    pair(t, name, card, kind, seed, ctx)
                    save(doc, ctx.result)


def pair(t: dict, name: str, card: dict, kind: str, seed: str, ctx: Ctx) -> None:
    """The OFA subnet and one training of ``kind`` on the same test images (McNemar), from the weights
    that training wrote: done as soon as it is trained, since its folder need not outlive the session."""
    net = _supernet(ctx.supernet)
    if name not in ctx.ofa_right:
        ctx.ofa_right[name] = ofa_right(ctx, card, net)
        t["ofa_recomputed_test_acc"] = round(100.0 * float(ctx.ofa_right[name].mean()), 3)
    other = static_right(ctx, card, ctx.work / name / f"{kind}-s{seed}", net.space)
    t.setdefault("mcnemar", {}).setdefault(kind, {})[seed] = mcnemar(ctx.ofa_right[name], other)


@functools.lru_cache(maxsize=1)
def _supernet(path: Path):
    from onceforall.specialization.export import load_supernet

    return load_supernet(path)


def shared_training(doc: dict, ctx: Ctx) -> None:
    """The shared training (teacher and every shrinking phase) trained again in this run, metered,
    with the recipe, seed and data of the supernet the rows measure: its wall time against one
    training alone, both measured in one benchmark run. Whether it reproduced the supernet's weights
    is recorded (training on the CPU at a fixed thread count is deterministic)."""
    if "shared" in doc:
        return
    from onceforall.supernet.checkpoint import read_meta
    from onceforall.infra.energy import Meter
    from onceforall.specialization.export import load_supernet
    from onceforall.training.train import train_supernet

    recorded = read_meta(ctx.supernet).get("schedule")
    recipe = json.loads(json.dumps(ctx.base_schedule.to_dict()))
    if recorded is not None and recorded != recipe:
        raise SystemExit(f"the {ctx.base_schedule.name} preset is not the recipe {ctx.supernet} was trained "
                         "with: train the supernet with the preset as it is now (`make bench-ps`), or "
                         "measure without the shared training (--kinds without shared)")
    out = ctx.work / "shared"
    shutil.rmtree(out, ignore_errors=True)  # a run cut short starts over, so that it is metered whole
    print("[claim] shared training (teacher + shrinking phases), metered", file=sys.stderr)
    with Meter(ctx.carbon) as meter:
        results = train_supernet(load_supernet(ctx.supernet).space, ctx.base_schedule, ctx.data, out,
                                 progress=not ctx.tiny)
    sha = weights_sha256(results[-1].folder)
    doc["shared"] = {"wall_s": round(meter.reading.duration_s, 1), "energy": meter.reading.to_dict(),
                     "phases": [{"name": r.phase, "wall_s": r.wall_s} for r in results],
                     "supernet_sha256": sha,
                     "reproduces_supernet": sha == doc["settings"]["trained_on"]["supernet_sha256"]}
    save(doc, ctx.result)


def acceptance(doc: dict) -> None:
    """Issue #21's bars on what is measured: the shared training against one training alone of the
    largest picked architecture, and the OFA subnets against their scratch means."""
    targets = {n: t for n, t in doc.get("targets", {}).items() if "scratch_test_acc" in t}
    out: dict[str, Any] = {}
    if targets:
        largest = max(targets, key=lambda n: targets[n]["macs"])
        walls = [r.get("wall_s") or r["train_wall_s"] for r in targets[largest]["runs"]["scratch"].values()]
        out["largest_pick"] = {"target": largest, "scratch_wall_s": round(statistics.mean(walls), 1)}
        if "shared" in doc:
            ratio = doc["shared"]["wall_s"] / out["largest_pick"]["scratch_wall_s"]
            out["shared_over_scratch_wall"] = {"ratio": round(ratio, 2), "bar": SHARED_BAR,
                                               "holds": ratio <= SHARED_BAR}
        ofa = statistics.mean(t["ofa_test_acc"] for t in targets.values())
        scratch = statistics.mean(t["scratch_test_acc"] for t in targets.values())
        out["per_target_within_se"] = {n: t["ofa_within_se_of_scratch"] for n, t in targets.items()}
        out["mean_over_targets"] = {"ofa": round(ofa, 3), "scratch": round(scratch, 3),
                                    "holds": ofa >= scratch}
        out["scratch_seeds"] = min(t["scratch_seeds"] for t in targets.values())
    doc["acceptance"] = out


def trained_schedule(ctx: Ctx) -> dict:
    """The schedule the supernet was trained with, as its checkpoint records it."""
    from onceforall.supernet.checkpoint import read_meta

    return read_meta(ctx.supernet).get("schedule") or ctx.base_schedule.to_dict()


def why(doc: dict, schedule: dict, ps: dict, recipe: dict) -> str:
    """What the measurements say about OFA's gap to training alone, from the numbers themselves (a
    fixed text went stale when the recipe changed): the training's budget, the max subnet against its
    teacher (progressive_shrinking.json, when it trained this supernet), how much of the gap the
    fine-tunes close, and what twice the shrinking bought on validation (recipe.json)."""
    shrink = round(sum(p["epochs"] for p in schedule["phases"]), 3)
    out = [f"The `{schedule['name']}` supernet is trained for {schedule['teacher']['epochs']:g} teacher "
           f"epochs, then {shrink:g} epochs of shrinking over {len(schedule['phases'])} phase(s), against "
           "the paper's 180 + ~400."]
    sha = doc.get("settings", {}).get("trained_on", {}).get("supernet_sha256")
    if ps.get("supernet_sha256") == sha and ps.get("phases"):
        teacher, last = ps["phases"][0]["test_accuracy"]["max"], ps["phases"][-1]["test_accuracy"]["max"]
        out.append(f"Its max subnet reaches {last:.2f}% on test, its teacher {teacher:.2f}%.")
    targets = [t for t in doc.get("targets", {}).values() if "scratch_test_acc" in t]
    for kind, fraction in FINETUNES.items():
        closed = [(t[f"{kind}_test_acc"] - t["ofa_test_acc"]) / (t["scratch_test_acc"] - t["ofa_test_acc"])
                  for t in targets if f"{kind}_test_acc" in t and t["scratch_test_acc"] > t["ofa_test_acc"]]
        if closed:
            out.append(f"A fine-tune of {fraction:.0%} of the scratch epochs closes {min(closed):.0%} to "
                       f"{max(closed):.0%} of the gap to the scratch mean.")
    longer = recipe.get("longer")
    if longer:
        out.append(f"On validation, twice the shrinking epochs gave {longer['gain']:+.2f} points "
                   f"(recipe.json, {longer['of']}, seeds {', '.join(map(str, longer['seeds']))}); "
                   "the whole shared training may cost at most 4x one scratch training (issue #21).")
    return " ".join(out)


# -- cost --------------------------------------------------------------------------------------

def quick_figures() -> dict | None:
    """The measured `quick` run: shared stages, per-target stages (and each target's profile),
    its train-scratch stage."""
    if not QUICK_REPORT.exists():
        return None
    report = json.loads(QUICK_REPORT.read_text())
    stages = report["energy"]["stages"]
    shared = [s for s in stages if s["target"] is None and s["stage"] not in ("train-scratch", "report")]
    per_target = [s for s in stages if s["target"] is not None]
    scratch = next(s for s in stages if s["stage"] == "train-scratch")
    n_t = len({s["target"] for s in per_target})
    return {"run_id": report["run_id"], "methods": report["energy"]["methods"], "targets": n_t,
            "shared": Cost(sum(s["total_j"] for s in shared), sum(s["wall_s"] for s in shared)),
            "marginal": Cost(sum(s["total_j"] for s in per_target) / n_t,
                             sum(s["wall_s"] for s in per_target) / n_t),
            "scratch": Cost(scratch["total_j"], scratch["wall_s"]),
            "profile": {s["target"]: Cost(s["total_j"], s["wall_s"])
                        for s in per_target if s["stage"] == "profile-target"}}


def g_per_kwh(carbon: str | None, doc: dict) -> float:
    """The carbon setting's intensity; for a country, the one CodeCarbon applied to the trainings."""
    from onceforall.infra.energy import Carbon

    c = Carbon.parse(carbon)
    if c.source == "fixed":
        return float(c.g_per_kwh)
    runs = [r for t in doc.get("targets", {}).values() for k in t.get("runs", {}).values()
            for r in k.values() if r.get("energy_j")]
    rates = [r["g_per_kwh"] for r in runs if r.get("g_per_kwh")]
    if not rates:
        raise SystemExit(f"--carbon {carbon}: no metered training records its intensity yet")
    return statistics.mean(rates)


def run_costs(doc: dict, kind: str, quick: dict | None) -> tuple[Cost, int] | None:
    """Mean metered cost of one target's training of ``kind`` (a NAS: plus the target's latency
    table, which it needs as OFA does, from the quick run's profile stage)."""
    per: list[Cost] = []
    for name, t in doc.get("targets", {}).items():
        for r in t.get("runs", {}).get(kind, {}).values():
            if r.get("energy_j"):
                extra = (quick or {}).get("profile", {}).get(name, Cost(0.0, 0.0)) if kind == "nas" \
                    else Cost(0.0, 0.0)
                wall = r.get("wall_s") or r["train_wall_s"]  # rows before the metered wall: training only
                per.append(Cost(r["energy_j"] + extra.j, wall + extra.wall_s))
    if not per:
        return None
    return Cost(statistics.mean(c.j for c in per), statistics.mean(c.wall_s for c in per)), len(per)


def quick_model(quick: dict, g: float) -> dict:
    model = cost_model(quick["shared"], quick["marginal"], {"scratch": quick["scratch"]}, g, NS)
    return model | {
        "scale": "quick", "source": f"docs/results/quick_run_report.json (run {quick['run_id']})",
        "methods": quick["methods"],
        "measures": "the README's `make run`: 2 teacher epochs and 5 one-epoch shrinking phases on a "
                    "third of Fashion-MNIST, against one fixed architecture (the middle subnet) trained "
                    "alone on the same 2-epoch recipe, no search",
        "assumptions": [
            "shared = teacher + 5 shrinking phases + accuracy predictor (report stage excluded); per "
            "target = profile + search + export, averaged over the run's targets",
            "training alone = the run's train-scratch stage per target; its architecture is given "
            "for free (no search, no latency table) and its export is not counted",
            "no per-target NAS is run at this scale",
            "N > the run's targets scales the measured per-target cost linearly",
            "CO2e = energy x the carbon setting's intensity"]}


def shared_standard(doc: dict, ps: dict, spec: dict) -> tuple[Cost | None, list[str], str | None]:
    """The standard shared training, metered by bench/progressive_shrinking.py on the supernet the
    rows measure, plus the accuracy predictor's measurements (not metered at this scale: their
    wall at the training's mean power, labelled an estimate)."""
    from onceforall.training.schedule import get_schedule

    energies = [p.get("energy") for p in ps.get("phases", [])]
    same = ps.get("supernet_sha256") == doc.get("settings", {}).get("trained_on", {}).get("supernet_sha256")
    if not same:
        return None, [], ("the training of the supernet these rows measure was not metered (`make "
                          "bench-ps` meters every phase, but its last run trained another supernet: "
                          "rerun the claim on the supernet it trained)")
    if not energies or not all(energies):
        return None, [], ("a phase of the standard supernet's training was not metered "
                          "(progressive_shrinking.json): rerun `make bench-ps`")
    train = Cost(sum(e["total_j"] for e in energies), sum(p["wall_s"] for p in ps["phases"]))
    per_s = spec.get("accuracy_data", {}).get("eval_s_per_subnet")
    n = get_schedule("standard").predictor_subnets
    if not per_s:
        return train, ["the accuracy predictor's measurements are not included (no specialize.json)"], None
    pred_s = n * per_s
    pred = Cost(pred_s * train.j / train.wall_s, pred_s)
    return Cost(train.j + pred.j, train.wall_s + pred.wall_s), [
        f"shared = the metered training phases ({train.j:.0f} J, {train.wall_s:.0f} s) + the accuracy "
        f"predictor's {n} subnet measurements, estimated as {per_s} s each (specialize.json) at the "
        f"training's mean power ({pred.j:.0f} J): an estimate, not metered"], None


def standard_model(doc: dict, quick: dict | None, g: float, ps: dict | None = None,
                   spec: dict | None = None) -> dict:
    """``ps``, ``spec``: progressive_shrinking.json and specialize.json (default: the committed)."""
    results = ROOT / "docs" / "results"
    ps = load(results / "progressive_shrinking.json") if ps is None else ps
    spec = load(results / "specialize.json") if spec is None else spec
    scratch, nas = run_costs(doc, "scratch", quick), run_costs(doc, "nas", quick)
    shared, notes, pending = shared_standard(doc, ps, spec)
    out: dict[str, Any] = {
        "scale": "standard",
        "measured": {"scratch_per_target_j": None if scratch is None else round(scratch[0].j, 1),
                     "scratch_trainings_metered": 0 if scratch is None else scratch[1],
                     "nas_per_target_j": None if nas is None else round(nas[0].j, 1),
                     "nas_runs_metered": 0 if nas is None else nas[1],
                     "shared_j": None if shared is None else round(shared.j, 1),
                     "per_target_marginal_j": None if quick is None else round(quick["marginal"].j, 1)}}
    baselines = {k: v[0] for k, v in (("scratch", scratch), ("nas", nas)) if v is not None}
    if shared is None or quick is None or not baselines:
        out["pending"] = pending or "the scratch trainings or the quick run's per-target stages are missing"
        return out
    out |= cost_model(shared, quick["marginal"], baselines, g, NS)
    out["assumptions"] = [
        *notes,
        "per target (profile + search + export) = the quick run's measured stages: they do not train, "
        "and the latency settings are the same at both scales",
        "training alone = the searched subnet of each example target trained from scratch on the "
        "teacher's recipe, mean over targets and seeds; its architecture is given for free",
        "per-target NAS = onceforall/specialization/nas_baseline.py per target (K proxies, the best "
        "trained fully on the same recipe), mean over targets and seeds, plus that target's latency "
        "table (the quick "
        "run's profile stage) where its budget is a latency",
        "N > 4 scales the measured per-target costs linearly",
        "CO2e = energy x the carbon setting's intensity"]
    return out


def provenance(doc: dict, std: dict) -> dict:
    """What every run's report quotes as the standard-scale result."""
    trained = doc.get("settings", {}).get("trained_on", {})
    return {"format": "onceforall-standard-claim/1", "scale": "standard",
            "source": "docs/results/claim.json", "command": doc.get("command", COMMAND),
            "date": doc.get("date"), "supernet_sha256": trained.get("supernet_sha256"),
            "teacher_recipe": trained.get("teacher_recipe"), "machine": doc.get("machine", {}),
            "cost": std}


def cost(doc: dict, ctx: Ctx, tiny_shared: Cost | None = None) -> None:
    quick = quick_figures()
    g = g_per_kwh(ctx.carbon, doc)
    models: dict[str, Any] = {}
    if quick is not None:
        models["quick"] = quick_model(quick, g)
    if ctx.tiny:
        scratch, nas = run_costs(doc, "scratch", quick), run_costs(doc, "nas", quick)
        baselines = {k: v[0] for k, v in (("scratch", scratch), ("nas", nas)) if v is not None}
        if quick is not None and baselines and tiny_shared is not None:
            models["tiny"] = cost_model(tiny_shared, quick["marginal"], baselines, g, NS) | {
                "scale": "tiny", "assumptions": ["tiny: the harness only; numbers mean nothing"]}
    else:
        models["standard"] = standard_model(doc, quick, g)
    doc["cost_model"] = models
    doc.pop("cost", None)  # the format before the NAS baseline (quick scale and scratch only)


def throughput(doc: dict) -> None:
    path = ROOT / "docs" / "results" / "throughput.json"
    if path.exists():
        t = json.loads(path.read_text())
        doc["throughput"] = t.get("throughput", {})
        for key in ("extraction_ms", "bn_recalibration_ms"):
            if key in t:
                doc[key] = t[key]


# -- the two ways to run it --------------------------------------------------------------------

def standard_ctx(args) -> Ctx:
    from onceforall.data import load_dataset
    from onceforall.specialization.nas_baseline import NASSettings
    from onceforall.training.schedule import get_schedule

    supernet, teacher = standard_supernet(args.standard.resolve())
    cards, tables = searched(TARGETS, SNAPSHOT, supernet)
    return Ctx(supernet, teacher, get_schedule("standard"),
               load_dataset("fashion-mnist", val_size=5000, seed=0), cards, tables, WORK / "claim",
               RESULT, args.carbon, NASSettings())


def standard_supernet(std: Path) -> tuple[Path, Path]:
    """The supernet and its teacher: the ones `make bench-ps` trained under ``std`` where they are
    there, else the committed ones (bench/supernets; a fresh checkout has no bench/_work)."""
    if (std / "ps" / "width-2").is_dir():
        return std / "ps" / "width-2", std / "ps" / "teacher"
    if not (SUPERNET_FIXTURE / "teacher" / "checkpoint.json").is_file():
        raise SystemExit(f"neither {std / 'ps'} nor a committed teacher ({SUPERNET_FIXTURE / 'teacher'}): "
                         "run `make bench-ps` first")
    return SUPERNET_FIXTURE, SUPERNET_FIXTURE / "teacher"


def tiny_ctx(work: Path, carbon: str | None) -> tuple[Ctx, Cost]:
    """Synthetic images, a two-unit space and the smoke schedule on 64 images: a supernet trained
    here (metered: the tiny shared cost), a MACs and a params target, each with its largest uniform
    subnet within budget as its "searched" subnet (no search; its accuracy measured on test)."""
    from onceforall.data import load_dataset
    from onceforall.supernet.efficiency import CostTable
    from onceforall.infra.energy import Meter
    from onceforall.specialization.nas_baseline import NASSettings
    from onceforall.training.schedule import get_schedule
    from onceforall.supernet.space import UnitSpec, get_space
    from onceforall.training.train import train_supernet

    space = dataclasses.replace(
        get_space("fashion-mnist"), name="tiny", stem_width=8, first_block_width=8,
        units=(UnitSpec(16, 2, "relu", False), UnitSpec(24, 2, "hswish", True)),
        resolutions=(16, 20, 24), final_expand_width=64, feature_width=64)
    schedule = dataclasses.replace(get_schedule("smoke"), name="tiny", batch_size=32, train_images=64,
                                   val_images=None, bn_calib_images=64, bn_calib_batch=64)
    data = load_dataset("synthetic:400", val_size=100)
    energy_path = work / "ps" / "energy.json"
    if not energy_path.is_file():
        shutil.rmtree(work / "ps", ignore_errors=True)
        with Meter(carbon) as meter:
            train_supernet(space, schedule, data, work / "ps", progress=False)
        save(meter.reading.to_dict(), energy_path)
    e = json.loads(energy_path.read_text())
    costs = CostTable.build(space)
    lo, hi = (float(v) for v in costs.macs([space.min_config(), space.max_config()]))
    plo, phi = (float(v) for v in costs.params([space.min_config(), space.max_config()]))
    targets = {"tiny-macs": {"kind": "macs", "budget": lo + 0.5 * (hi - lo)},
               "tiny-params": {"kind": "params", "budget": plo + 0.6 * (phi - plo)}}
    cards = tiny_cards(space, schedule, data, work, targets)
    ctx = Ctx(work / "ps" / "width-2", work / "ps" / "teacher", schedule, data, cards, {},
              work / "trainings", work / "claim.json", carbon,
              NASSettings(candidates=3, proxy_train_images=32, pool=500), tiny=True)
    return ctx, Cost(e["total_j"], e["duration_s"])


def tiny_cards(space, schedule, data, work: Path, targets: dict) -> dict[str, dict]:
    from onceforall.data import calibration_images
    from onceforall.supernet.efficiency import subnet_macs, subnet_params
    from onceforall.supernet.evaluate import evaluate_subnets
    from onceforall.specialization.export import load_supernet
    from onceforall.specialization.specialize import uniform_configs

    net = load_supernet(work / "ps" / "width-2")
    calib = calibration_images(data, schedule.bn_calib_images, 0)
    cards = {}
    for name, c in targets.items():
        size = subnet_macs if c["kind"] == "macs" else subnet_params
        cfg = max((u for u in uniform_configs(space) if size(space, u) <= c["budget"]),
                  key=lambda u: size(space, u))
        acc = evaluate_subnets(net, {name: cfg}, data, calib, split="test")[name]
        cards[name] = {"subnet": cfg.to_dict(), "macs": subnet_macs(space, cfg),
                       "params": subnet_params(space, cfg),
                       "accuracy": {"test_top1_pct_onnxruntime": round(float(acc), 3)},
                       "bn_recalibration": {"images": schedule.bn_calib_images, "seed": 0},
                       "target": {"name": name, "runtime": "onnxruntime", "threads": 1, "batch_size": 1,
                                  "constraint": c}}
    return cards


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--nas-seeds", type=int, nargs="+", default=[0],
                    help="seeds of the per-target NAS (its cost is ~1.5 scratch trainings each)")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--budget-min", type=float, default=float("inf"),
                    help="stop starting new trainings after this many minutes (rerun to continue)")
    ap.add_argument("--standard", type=Path, default=WORK / "standard",
                    help="the standard run's folder (ps/teacher, ps/width-2) the claim measures")
    ap.add_argument("--carbon", default=None, help="g CO2e/kWh or a country code (default $OFA_CARBON "
                                                   "or 475, see onceforall/infra/energy.py)")
    ap.add_argument("--tiny", action="store_true", help="synthetic data, a tiny space: the harness only")
    ap.add_argument("--work", type=Path, default=None, help="with --tiny: its folder (results there)")
    args = ap.parse_args(argv)
    if args.tiny:
        if args.work is None:
            ap.error("--tiny needs --work (a scratch folder; tiny results never go to docs/results)")
        ctx, shared = tiny_ctx(args.work.resolve(), args.carbon)
    else:
        ctx, shared = standard_ctx(args), None
    doc = load(ctx.result)
    check_same_supernet(doc, ctx)
    doc.update({"machine": machine(), "command": COMMAND + (" --tiny" if ctx.tiny else ""),
                "settings": {
                    **doc["settings"], "finetune": {
                        k: {"fraction": round(f, 3), "epochs": finetune_epochs(k, ctx), "lr": FINETUNE_LR}
                        for k, f in FINETUNES.items()},
                    "scratch": f"teacher phase of the {ctx.base_schedule.name} schedule",
                    "nas": dataclasses.asdict(ctx.nas)
                    | {"module": "onceforall/specialization/nas_baseline.py"},
                    "carbon": ctx.carbon or "default (OFA_CARBON or 475 g/kWh)",
                    "supernet": str(ctx.supernet.relative_to(ROOT) if ctx.supernet.is_relative_to(ROOT)
                                    else ctx.supernet),
                    "subnets": f"{SNAPSHOT.relative_to(ROOT)}/subnets.json (snapshot of the "
                               "specialization run they were first taken from)"}})
    throughput(doc)
    plan = [(s, k) for s in args.seeds for k in args.kinds if k not in ("nas", "shared")]
    plan += [(s, "nas") for s in args.nas_seeds if "nas" in args.kinds]
    if "shared" in args.kinds:
        shared_training(doc, ctx)
    quality(doc, ctx, plan, args.budget_min * 60)
    significance(doc, ctx)
    acceptance(doc)
    doc["why"] = why(doc, trained_schedule(ctx), load(PS_RESULTS), load(RECIPE_RESULTS))
    doc["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    cost(doc, ctx, shared)
    save(doc, ctx.result)
    if ctx.tiny:
        return render_tiny(doc, args.work.resolve())
    save(provenance(doc, doc["cost_model"]["standard"]), PROVENANCE)
    subprocess.run([sys.executable, str(ROOT / "bench" / "render.py")], check=True)
    return 0


def render_tiny(doc: dict, work: Path) -> int:
    """The claim's section and its plot, as render.py makes them, into the work folder."""
    import render

    (work / "claim.md").write_text("\n".join(render.claim(doc, docs=work)) + "\n")
    print(work / "claim.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
