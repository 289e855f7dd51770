"""The claim, measured: OFA subnets against the same architectures trained from scratch, and the cost
of N targets.

    python bench/claim.py [--seeds 0 1 2] [--kinds finetuned scratch scratch_kd] [--budget-min 60]

Quality: for every example target, the subnet the search picked on the `standard` supernet (from
`make bench-specialize`) is
  * taken as exported (no retraining): `ofa_test_acc`, from its model card;
  * fine-tuned briefly from its supernet weights: the paper's "OFA #25" (25 of 180 epochs) scaled to
    this schedule: 2 epochs, lr 0.01, no warm-up: `finetuned_test_acc`;
  * trained from scratch on the teacher's recipe (its epochs, lr and warm-up, the same data,
    augmentation and batch, at the subnet's own resolution), without and with distillation from the
    standard teacher: `scratch_test_acc`, `scratch_kd_test_acc`.
The supernet and teacher are fingerprinted (settings.trained_on: their weights' sha256 and the
teacher's recipe); a rerun on another supernet stops rather than mix rows.
Every training is metered (energy, CO2, wall time) and recorded in docs/results/claim.json as soon as
it finishes; a rerun skips what is measured (each training's folder under bench/_work/claim/ holds its
result), so the suite runs in pieces. Several seeds: mean and spread.

Cost: from the measured `quick` run of `make bench-pipeline` (docs/results/quick_run_report.json:
every stage metered by the same meter, and its train-scratch stage), OFA with N targets (shared
stages once, per-target stages N times) against N from-scratch trainings, N = 1, 4, 10, 40.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from progressive_shrinking import machine, weights_sha256  # noqa: E402

RESULT = ROOT / "docs" / "results" / "claim.json"
WORK = ROOT / "bench" / "_work"
SUPERNET = WORK / "standard" / "ps" / "width-2"
TEACHER = WORK / "standard" / "ps" / "teacher"
TARGETS = WORK / "specialize" / "targets"
CARDS = WORK / "claim" / "cards"  # the snapshot of the searched subnets the claim measures
FINETUNE = {"epochs": 2, "lr": 0.01}
KINDS = ("finetuned", "scratch", "scratch_kd")
NS = (1, 4, 10, 40)
# Why the measured gap is what it is (rendered under the quality table; keep it true to the numbers
# of the supernet in settings.trained_on).
WHY = ("The `standard` supernet is trained for 12 teacher epochs and then only 8 epochs of progressive "
       "shrinking over five phases, against the paper's 180 + ~400; its max subnet (91.51%) is below "
       "the teacher alone (91.89%), so the shared weights have not caught up with what each small "
       "architecture reaches when it has the whole 12-epoch recipe to itself (and at its own resolution: "
       "the supernet trains every batch at one of 20, 24 or 28 pixels). On Fashion-MNIST the "
       "small static networks reach about 92.4% alone. A 2-epoch fine-tune recovers 0.27-0.52 points of "
       "the gap. Closing it needs a longer shrinking schedule (issue 2's open accuracy targets are the "
       "same shortfall).")


def trained_on() -> dict:
    """What the claim's rows are measured on: the sha256 of the supernet's and the teacher's weights,
    and the teacher's recipe as its checkpoint records it (the scratch runs use that recipe)."""
    from onceforall.checkpoint import read_meta

    recipe = read_meta(TEACHER)["schedule"]["teacher"]
    return {"supernet_sha256": weights_sha256(SUPERNET), "teacher_sha256": weights_sha256(TEACHER),
            "teacher_recipe": {k: recipe[k] for k in ("epochs", "lr", "warmup_epochs")}
            | {"resolutions": recipe.get("n_resolutions") or "all"}}


def check_same_supernet(doc: dict) -> None:
    """A resumed claim must not mix rows measured on two different supernets."""
    now = trained_on()
    then = doc.setdefault("settings", {}).get("trained_on")
    if then and (then["supernet_sha256"], then["teacher_sha256"]) != (now["supernet_sha256"],
                                                                     now["teacher_sha256"]):
        raise SystemExit(f"{RESULT.relative_to(ROOT)} was measured on another standard supernet "
                         f"(sha256 {then['supernet_sha256'][:12]}, now {now['supernet_sha256'][:12]}): "
                         f"move it and bench/_work/claim aside to measure the new one from the start")
    doc["settings"]["trained_on"] = then or now


def load() -> dict:
    return json.loads(RESULT.read_text()) if RESULT.exists() else {}


def save(doc: dict) -> None:
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(doc, indent=1))


def searched() -> dict[str, dict]:
    """Target name -> the model card of the subnet the claim measures.

    The claim measures the subnets of one specialization run: the first time it sees a target it
    snapshots that target's card into bench/_work/claim/cards/, and from then on it reads the
    snapshot, so a later `make bench-specialize` (which may pick other subnets) never mixes results
    of different architectures into one row.
    """
    CARDS.mkdir(parents=True, exist_ok=True)
    for card in sorted(TARGETS.glob("*/model/model_card.json")):
        snapshot = CARDS / f"{card.parent.parent.name}.json"
        if not snapshot.exists():
            snapshot.write_text(card.read_text())
    cards = {p.stem: json.loads(p.read_text()) for p in sorted(CARDS.glob("*.json"))}
    if not cards or not (SUPERNET / "checkpoint.json").is_file():
        raise SystemExit("needs the standard supernet and its searched subnets: run `make bench-ps` and "
                         "`make bench-specialize` first")
    return cards


def train_one(kind: str, name: str, card: dict, seed: int, data) -> dict:
    """One training, metered; resumes nothing but skips a finished folder (train_static)."""
    from onceforall.energy import Meter
    from onceforall.export import load_supernet
    from onceforall.schedule import get_schedule
    from onceforall.space import SubnetConfig
    from onceforall.train import RESUME_DIR, train_static

    out = WORK / "claim" / name / f"{kind}-s{seed}"
    net = load_supernet(SUPERNET)
    # The teacher's recipe as its checkpoint records it, not as the code's schedule says today.
    schedule = get_schedule("standard")
    recipe = trained_on()["teacher_recipe"]
    schedule = dataclasses.replace(schedule, teacher=dataclasses.replace(
        schedule.teacher, epochs=recipe["epochs"], lr=recipe["lr"],
        warmup_epochs=recipe["warmup_epochs"]))
    cfg = SubnetConfig.from_dict(card["subnet"], net.space, name)
    kwargs: dict = {"seed": seed}
    if kind == "finetuned":
        kwargs.update(init=net.get_active_subnet(cfg), **FINETUNE)
    elif kind == "scratch_kd":
        kwargs.update(teacher=TEACHER)
    fresh = not (out / "result.json").is_file()
    # a training cut short starts over, so that its energy is metered whole
    shutil.rmtree(out / RESUME_DIR, ignore_errors=True)
    with Meter() as meter:
        result = train_static(net.space, schedule, cfg, data, out, **kwargs)
    if fresh:
        result["energy"] = meter.reading.to_dict()
        (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def quality(doc: dict, seeds: list[int], kinds: list[str], budget_s: float) -> None:
    from onceforall.data import load_dataset

    t0 = time.monotonic()
    data = load_dataset("fashion-mnist", val_size=5000, seed=0)
    cards = searched()
    targets = doc.setdefault("targets", {})
    for name, card in cards.items():
        t = targets.setdefault(name, {})
        t["ofa_test_acc"] = card["accuracy"]["test_top1_pct_onnxruntime"]
        t["subnet"], t["macs"], t["params"] = card["subnet"], card["macs"], card["params"]
    for seed in seeds:
        for kind in kinds:
            for name, card in cards.items():
                runs = targets[name].setdefault("runs", {}).setdefault(kind, {})
                if str(seed) in runs:
                    continue
                if time.monotonic() - t0 > budget_s:
                    print(f"budget spent; rerun to continue ({kind} {name} seed {seed} next)",
                          file=sys.stderr)
                    return
                print(f"[claim] {kind} {name} seed {seed}", file=sys.stderr)
                r = train_one(kind, name, card, seed, data)
                runs[str(seed)] = {k: r[k] for k in ("test_acc", "val_acc", "train_wall_s", "epochs", "lr")}
                runs[str(seed)]["energy_j"] = r.get("energy", {}).get("total_j")
                summarize(targets[name])
                save(doc)


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


def cost(doc: dict) -> None:
    path = ROOT / "docs" / "results" / "quick_run_report.json"
    if not path.exists():
        print("no docs/results/quick_run_report.json: run `make bench-pipeline` for the cost part",
              file=sys.stderr)
        return
    report = json.loads(path.read_text())
    e = report["energy"]
    stages = e["stages"]
    shared = [s for s in stages if s["target"] is None and s["stage"] not in ("train-scratch", "report")]
    per_target = [s for s in stages if s["target"] is not None]
    scratch = next(s for s in stages if s["stage"] == "train-scratch")
    n_t = len({s["target"] for s in per_target})
    shared_j, shared_s = sum(s["total_j"] for s in shared), sum(s["wall_s"] for s in shared)
    shared_g = sum(s["emissions_g"] for s in shared)
    marg_j = sum(s["total_j"] for s in per_target) / n_t
    marg_s = sum(s["wall_s"] for s in per_target) / n_t
    marg_g = sum(s["emissions_g"] for s in per_target) / n_t
    rows = [{"n": n, "ofa_j": round(shared_j + n * marg_j, 1), "scratch_j": round(n * scratch["total_j"], 1),
             "ofa_wall_s": round(shared_s + n * marg_s, 1), "scratch_wall_s": round(n * scratch["wall_s"], 1),
             "ofa_g": round(shared_g + n * marg_g, 4), "scratch_g": round(n * scratch["emissions_g"], 4)}
            for n in NS]
    gap = scratch["total_j"] - marg_j
    doc["cost"] = {
        "source": "docs/results/quick_run_report.json (run " + report["run_id"] + ", schedule quick)",
        "shared_j": round(shared_j, 1), "per_target_marginal_j": round(marg_j, 1),
        "scratch_per_target_j": round(scratch["total_j"], 1),
        "break_even_n": round(shared_j / gap, 2) if gap > 0 else None, "rows": rows,
        "methods": e["methods"],
        "assumptions": [
            "shared = teacher + 5 shrinking phases + accuracy predictor (report stage excluded); "
            "per target = profile + search + export, averaged over the run's targets",
            "from scratch = the run's train-scratch stage (the middle subnet on the teacher's recipe) "
            "per target; its architecture search and export are not counted",
            "N > the run's targets scales the measured per-target cost linearly",
        ]}


def cost_standard(doc: dict) -> None:
    """The same comparison at the `standard` scale, from what is measured at that scale: the scratch
    trainings of the quality part (metered) and, once `make bench-ps` has metered its phases, the
    shared training. The per-target stages do not depend on the schedule: the quick run's."""
    runs = [r["energy_j"] for t in doc.get("targets", {}).values()
            for r in t.get("runs", {}).get("scratch", {}).values() if r.get("energy_j")]
    ps_path = ROOT / "docs" / "results" / "progressive_shrinking.json"
    ps = json.loads(ps_path.read_text()) if ps_path.exists() else {}
    energies = [p.get("energy") for p in ps.get("phases", [])]
    same = ps.get("supernet_sha256") == doc.get("settings", {}).get("trained_on", {}).get("supernet_sha256")
    shared = sum(e["total_j"] for e in energies) if same and energies and all(energies) else None
    scratch = statistics.mean(runs) if runs else None
    marginal = doc.get("cost", {}).get("per_target_marginal_j")
    std = {"scratch_per_target_j": None if scratch is None else round(scratch, 1),
           "scratch_trainings_metered": len(runs), "shared_j": shared,
           "per_target_marginal_j": marginal,
           "break_even_n": (round(shared / (scratch - marginal), 2)
                            if shared and scratch and marginal and scratch > marginal else None)}
    if shared is None:
        std["pending"] = ("the training of the supernet these rows measure was not metered (`make "
                          "bench-ps` meters every phase, but it has retrained the supernet since: "
                          "rerun the claim on it)" if not same else
                          "the standard supernet's training was not metered yet: rerun `make bench-ps`")
    doc.setdefault("cost", {})["standard"] = std


def throughput(doc: dict) -> None:
    path = ROOT / "docs" / "results" / "throughput.json"
    if path.exists():
        t = json.loads(path.read_text())
        doc["throughput"] = t.get("throughput", {})
        for key in ("extraction_ms", "bn_recalibration_ms"):
            if key in t:
                doc[key] = t[key]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--budget-min", type=float, default=float("inf"),
                    help="stop starting new trainings after this many minutes (rerun to continue)")
    ap.add_argument("--standard", type=Path, default=WORK / "standard",
                    help="the standard run's folder (ps/teacher, ps/width-2) the claim measures")
    args = ap.parse_args()
    global SUPERNET, TEACHER
    std = args.standard.resolve()
    SUPERNET, TEACHER = std / "ps" / "width-2", std / "ps" / "teacher"
    doc = load()
    check_same_supernet(doc)
    doc.update({"machine": machine(), "command": "python bench/claim.py [--seeds ...] [--kinds ...] "
                "[--budget-min M] [--standard DIR] (make bench-claim)",
                "why": WHY,
                "settings": {**doc["settings"], "finetune": FINETUNE,
                             "scratch": "teacher phase of the standard schedule",
                             "supernet": str(SUPERNET.relative_to(ROOT)),
                             "subnets": str(CARDS.relative_to(ROOT)) + " (snapshot of the "
                             "specialization run they were first taken from)"}})
    cost(doc)
    throughput(doc)
    save(doc)
    quality(doc, args.seeds, args.kinds, args.budget_min * 60)
    cost_standard(doc)
    save(doc)
    subprocess.run([sys.executable, str(ROOT / "bench" / "render.py")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
