"""Render docs/results/*.json into docs/benchmarks.md (tables) and docs/*.png (plots).

    python bench/render.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"
SUBNETS = ("max", "mid", "shallow-wide", "deep-narrow", "min")


def _pyplot():
    """matplotlib (a dependency of the project) without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt_s(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


def _machine(m: dict) -> str:
    isa = f" ({m['cpu_capability']})" if "cpu_capability" in m else ""
    return (f"{m.get('cpu', '?')}{isa}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')} "
            f"({m.get('torch_threads', '?')} threads), Python {m.get('python', '?')}")


def progressive_shrinking(r: dict) -> list[str]:
    lines = ["## Progressive shrinking (issue: core library)", "",
             f"Command: `{r.get('command', 'python bench/progressive_shrinking.py')}`  ",
             f"Machine: {_machine(r.get('machine', {}))}  ",
             f"Data: {r['dataset']['name']} ({r['dataset']['train']} train / {r['dataset']['val']} val / "
             f"{r['dataset']['test']} test), schedule `{r['schedule']}`, space `{r['space']}`", "",
             "Test accuracy (%) of reference subnets after each phase, BN recalibrated on 2,000 "
             "training images:", "",
             "| phase | wall | img/s | " + " | ".join(SUBNETS) + " |",
             "|---|---|---|" + "---|" * len(SUBNETS)]
    for p in r.get("phases", []):
        acc = p["test_accuracy"]
        lines.append(f"| {p['name']} | {_fmt_s(p['wall_s'])} | {p['images_per_s']:.0f} | "
                     + " | ".join(f"{acc[s]:.2f}" for s in SUBNETS) + " |")
    if "training_wall_s" in r:
        lines += ["", f"Whole training (teacher + 5 phases): **{_fmt_s(r['training_wall_s'])}**."]
    if r.get("baseline_phases"):
        lines += ["", "Baseline without progressive shrinking (same teacher, same phases, epochs and "
                  "sampling; every dimension elastic from the start):", "",
                  "| phase | wall | " + " | ".join(SUBNETS) + " |", "|---|---|" + "---|" * len(SUBNETS)]
        for p in r["baseline_phases"]:
            acc = p["test_accuracy"]
            lines.append(f"| {p['name']} | {_fmt_s(p['wall_s'])} | "
                         + " | ".join(f"{acc[s]:.2f}" for s in SUBNETS) + " |")
    if "baseline_no_ps" in r and "final" in r:
        fin, base = r["final"]["test_accuracy"], r["baseline_no_ps"]["test_accuracy"]
        lines += ["", "| final | " + " | ".join(SUBNETS) + " |", "|---|" + "---|" * len(SUBNETS),
                  "| progressive shrinking | " + " | ".join(f"{fin[s]:.2f}" for s in SUBNETS) + " |",
                  "| no progressive shrinking | " + " | ".join(f"{base[s]:.2f}" for s in SUBNETS) + " |"]
    if r.get("checks"):
        lines += ["", "Acceptance: " + ", ".join(f"{k}: **{'yes' if v else 'NO'}**"
                                                 for k, v in r["checks"].items())]
    lines += [f"\n{n}" for n in r.get("notes", [])]
    if r.get("previous_runs"):
        lines += ["", "Earlier runs of this benchmark (other schedules; final test accuracy, %):", "",
                  "| run | teacher max | " + " | ".join(SUBNETS) + " | baseline min |",
                  "|---|---|" + "---|" * len(SUBNETS) + "---|"]
        this = [{"run": f"this run ({r.get('schedule_summary', '')})",
                 "teacher_max": r["phases"][0]["test_accuracy"]["max"], "final": r["final"]["test_accuracy"],
                 "baseline_min": r.get("baseline_no_ps", {}).get("test_accuracy", {}).get("min")}
                ] if "final" in r else []
        for p in r["previous_runs"] + this:
            base = "pending" if p.get("baseline_min") is None else f"{p['baseline_min']:.2f}"
            lines.append(f"| {p['run']} | {p['teacher_max']:.2f} | "
                         + " | ".join(f"{p['final'][s]:.2f}" for s in SUBNETS) + f" | {base} |")
    if _plot_ps(r):
        lines += ["", "![accuracy per phase](progressive_shrinking.png)"]
    return lines


def kernel_phase(r: dict) -> list[str]:
    t = r["teacher_test_accuracy"]
    lines = ["### What the first shrinking phase costs the max subnet", "",
             f"Command: `{r['command']}`  ", f"Machine: {_machine(r['machine'])}", "",
             f"The kernel phase (one epoch) from the `standard` teacher (`{r['teacher']}`, weights "
             f"sha256 `{r['teacher_sha256'][:12]}`), one change at a time. Test accuracy (%), BN "
             "recalibrated:", "",
             "| kernel phase | wall | " + " | ".join(SUBNETS) + " |", "|---|---|" + "---|" * len(SUBNETS),
             "| (the teacher, before it) | | " + " | ".join(f"{t[s]:.2f}" for s in SUBNETS) + " |"]
    for v in r["variants"]:
        acc = v["test_accuracy"]
        lines.append(f"| {v['name']} | {_fmt_s(v['wall_s'])} | "
                     + " | ".join(f"{acc[s]:.2f}" for s in SUBNETS) + " |")
    return lines + [f"\n{n}" for n in r.get("notes", [])]


def recipe(r: dict) -> list[str]:
    """bench/recipe.py: the ablation's validation scores, and the final recipe's test accuracy."""
    runs = {(x["name"], x["seed"]): x for x in r["runs"]}
    base = runs.get(("base", 0))
    lines = ["## The shrinking recipe, one change at a time (issue #21)", "",
             f"Command: `{r['command']}`  ", f"Machine: {_machine(r['machine'])}  ",
             f"Code: `{r['code_commit'][:12]}`", "",
             f"Score: {r['score']} (validation split; a second seed where a change is within "
             f"{r['close_points']} points of the base). Wall: the whole training, teacher included; "
             "planned = the variant's measured seconds per step times its steps over the base's "
             "(plans now match it to a step; a ratio away from 1.00 is a plan made in whole epochs, "
             "before a phase could run part of one).", "",
             "| recipe | seeds | val score (seed 0) | gain (mean over seeds) | max | min | wall "
             "| planned wall |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    if base is not None:
        lines.append(f"| base{_mark(base)} | 0 | {base['val_score']:.3f} | | {_recipe_cells(base)} | 1.00 |")
    for name, g in r.get("gains", {}).items():
        first = runs[(name, 0)]
        lines.append(f"| {name}{_mark(first)} | {', '.join(map(str, g['seeds']))} | "
                     f"{first['val_score']:.3f} | {g['gain']:+.3f} | {_recipe_cells(first)} | "
                     f"{_or_dash(first['planned_wall_ratio'])} |")
    if "transcribed" in r:
        lines += ["", "\\* transcribed (a dash: not kept): " + r["transcribed"]]
    lines += [f"\n{n}" for n in r.get("notes", [])]
    final = r.get("final", {})
    if "recipe" in final:  # chosen
        combined = final["combined"]
        lines += ["", "Chosen on validation (mean of seeds " + ", ".join(map(str, final["seeds"])) + "): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in final["val_scores"].items())
                  + (f" (combined: {', '.join(combined['changes'])})" if "plan" in combined else "")
                  + (f"; left out: {'; '.join(combined['left_out'])}" if combined["left_out"] else "")
                  + f". **{final['recipe']}**: the base with {', '.join(final['changes']) or 'no change'}.",
                  "", "| candidate | val score, seed 0 / 1 | mean | max, seed 0 / 1 | min, seed 0 / 1 |",
                  "|---|---:|---:|---:|---:|"]
        for name, mean in final["val_scores"].items():
            rows = [runs[(name, s)] for s in final["seeds"]]
            lines.append(f"| {name}{_mark(rows[0])} | {_per_seed(rows, 'val_score', '.3f')} | {mean:.3f} | "
                         f"{_per_seed(rows, 'max')} | {_per_seed(rows, 'min')} |")
        if "longer" in r:
            g = r["longer"]
            rows = [runs[(g["recipe"], s)] for s in g["seeds"]]
            against = (f"; against {g['of']} as this code trains it, val "
                       + " / ".join(f"{v:.3f}" for v in g["of_val_scores"].values())
                       if "of_val_scores" in g else "")
            lines += ["", f"Evidence, not a choice: {g['recipe']} (its shrinking epochs x{g['scale']:g}, "
                      f"wall {' / '.join(_fmt_s(x['wall_s']) for x in rows)}): val score "
                      f"{_per_seed(rows, 'val_score', '.3f')}, {g['gain']:+.2f} (seeds "
                      f"{', '.join(map(str, g['seeds']))}{against}); max {_per_seed(rows, 'max')}, "
                      f"min {_per_seed(rows, 'min')}."]
        same = {True: "yes", False: "no", None: "not known (no sha256 was kept)"}
        again = [f"seed {s}: val {x['val_score']:.2f} (measured {x['measured']:.2f}), same weights "
                 f"{same[x['same_weights']]}" for s, x in _retrained(runs, final).items()]
        if again:
            lines += ["", f"{final['recipe']}'s supernets were trained again for the test read (their "
                      "checkpoints were gone): " + "; ".join(again) + "."]
        for seed, t in final.get("test_accuracy_by_seed", {}).items():
            lines += ["", f"Test accuracy (%) of {final['recipe']}, seed {seed}'s supernet, read once: "
                      + ", ".join(f"{k} {t[k]:.2f}" for k in SUBNETS if k in t) + "."]
        if "test_accuracy" in final:
            t = final["test_accuracy"]
            lines += ["", f"Test accuracy (%) of {final['recipe']}, read once (mean of its seeds' "
                      "supernets): " + ", ".join(f"{k} {t[k]:.2f}" for k in SUBNETS if k in t) + "."]
    return lines


def _per_seed(rows: list[dict], key: str, fmt: str = ".2f") -> str:
    """One ablation row's value per seed, "a / b": its val score, or a subnet's val accuracy."""
    return " / ".join(_or_dash(x[key] if key == "val_score" else x["val_accuracy"].get(key), fmt)
                      for x in rows)


def _or_dash(v: float | None, fmt: str = ".2f") -> str:
    return "—" if v is None else format(v, fmt)


def _mark(row: dict) -> str:
    return " \\*" if row.get("source") == "transcribed" else ""


def _recipe_cells(row: dict) -> str:
    """max | min | wall of one ablation row (a transcribed row may lack any of them)."""
    acc = row["val_accuracy"]
    wall = "—" if row.get("wall_s") is None else _fmt_s(row["wall_s"])
    return f"{_or_dash(acc.get('max'))} | {_or_dash(acc.get('min'))} | {wall}"


def _retrained(runs: dict, final: dict) -> dict:
    """The chosen recipe's runs that were trained again for the test read, by seed."""
    chosen = {s: runs[(final["recipe"], s)] for s in final["seeds"]}
    return {s: {**x["retrained"], "measured": x["val_score"]} for s, x in chosen.items() if "retrained" in x}


def _plot_ps(r: dict) -> bool:
    plt = _pyplot()
    phases = r.get("phases", [])
    if not phases:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [p["name"] for p in phases]
    for s in SUBNETS:
        ax.plot(names, [p["test_accuracy"][s] for p in phases], marker="o", label=s)
    if r.get("baseline_phases"):
        base = r["baseline_phases"]
        xs = names[-len(base):]
        for s in ("max", "min"):
            ax.plot(xs, [p["test_accuracy"][s] for p in base], ls="--", marker="x",
                    label=f"{s} (no PS)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Progressive shrinking, {r['space']}, schedule {r['schedule']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "progressive_shrinking.png", dpi=120)
    plt.close(fig)
    return True


def specialize(r: dict) -> list[str]:
    lines = ["## Specialization per target (issue: predictor, latency, search, export)", "",
             f"Command: `{r.get('command', 'python bench/specialize.py')}`  ",
             f"Machine: {_machine(r.get('machine', {}))}  ", f"Supernet: `{r.get('supernet')}`"
             + (f" (weights sha256 `{r['supernet_sha256'][:12]}`)" if r.get("supernet_sha256") else ""), ""]
    if "accuracy_data" in r:
        a = r["accuracy_data"]
        sets = f" ({a['sets']} stratified sets)" if a.get("sets", 1) > 1 else ""
        if len(a.get("eval_s_per_subnet_by_set", [])) > 1:
            by_set = ", ".join(f"{v:.2f}" for v in a["eval_s_per_subnet_by_set"])
            sets += f" (s per subnet by set: {by_set})"
        views = " and their mirror images (both views averaged)" if a.get("views") == 2 else ""
        if a.get("samplers"):
            sets += " (" + ", ".join(f"{v} {k}" for k, v in a["samplers"].items()) + \
                "; onceforall/specialization/accuracy_data.py explains the samplers)"
        lines += [f"Accuracy data: {a['n']} stratified subnets{sets}, BN recalibrated, validation accuracy "
                  f"on {a['val_images']} images{views}; {a['eval_s_per_subnet']:.2f} s per subnet "
                  f"({_fmt_s(a['eval_s_total'])} in all); accuracies {a['val_acc_min']:.2f} to "
                  f"{a['val_acc_max']:.2f}%.", ""]
    if "predictor" in r:
        p = r["predictor"]
        lines += ["| predictor (held-out subnets) | Kendall tau | RMSE (pts) | MAE (pts) | Spearman | "
                  "fit/test subnets |", "|---|---|---|---|---|---|",
                  f"| {p['model']} | {p['kendall_tau']:.3f} | {p['rmse_pts']:.3f} | {p['mae_pts']:.3f} | "
                  f"{p['spearman_rho']:.3f} | {p['n_fit']}/{p['n_test']} |"]
        if p.get("vs_plain_labels"):
            v = p["vs_plain_labels"]
            lines.append(f"| the same, judged on the images alone (one view) | {v['kendall_tau']:.3f} | "
                         f"{v['rmse']:.3f} | {v['mae']:.3f} | {v['spearman_rho']:.3f} | |")
        for smp, v in p.get("by_sampler", {}).items():
            lines.append(f"| the {smp} held-out subnets alone | {v['kendall_tau']:.3f} | {v['rmse']:.3f} | "
                         f"{v['mae']:.3f} | {v['spearman_rho']:.3f} | /{v['n']} |")
        if p.get("uniform_subnets"):
            u = p["uniform_subnets"]
            tau = "-" if u["kendall_tau"] is None else f"{u['kendall_tau']:.3f}"
            rho = "-" if u["spearman_rho"] is None else f"{u['spearman_rho']:.3f}"
            lines.append(f"| uniform subnets, all of them (the corners) | {tau} | "
                         f"{u['rmse']:.3f} | {u['mae']:.3f} | {rho} | /{u['n']} |")
            m = u["max_subnet"]
            lines += ["", f"On the uniform subnets the predictor is off by {u['bias_pts']:+.3f} points on "
                      f"average; the max subnet: predicted {m['predicted']:.2f}%, measured "
                      f"{m['val_acc']:.2f}% on validation."]
        lines.append("")
    noise_path = RESULTS / "predictor_noise.json"
    if noise_path.exists():
        n = json.loads(noise_path.read_text())
        if n.get("supernet_sha256") == r.get("supernet_sha256"):
            lines += [f"Label noise (`{n['command']}`, the {n['n_subnets']} held-out subnets, their "
                      f"{n['val_images']} validation images bootstrapped): a perfect predictor would "
                      f"reach tau **{n['ceiling_tau']:.3f}** against these labels; with every "
                      f"validation image's mirror image averaged in, **{n['ceiling_tau_with_mirror']:.3f}**. "
                      f"This predictor (fitted on the {n.get('labels', 'plain labels')}) ranks the held-out "
                      f"subnets at tau {n.get('predictor_tau_vs_plain', n.get('predictor_tau')):.3f} "
                      f"against the plain labels and "
                      f"{n['predictor_tau_vs_mirror_averaged']:.3f} against the mirror-averaged ones "
                      f"(accuracy sd {n['accuracy_sd_pts']:.2f} points).", ""]
    if r.get("latency"):
        lines += ["| latency table (onnxruntime; batch 1 unless named) | MAPE | Kendall tau | max APE | "
                  "subnets | measured range (ms) | the same subnets measured again: MAPE, tau | build |",
                  "|---|---|---|---|---|---|---|---|"]
        def row(label: str, v: dict) -> str:
            lo, hi = v["measured_ms_range"]
            cv = (f"{v['remeasured_mape_pct']:.2f}%, {v['remeasured_kendall_tau']:.3f}"
                  if "remeasured_mape_pct" in v else "-")
            return (f"| {label} | {v['mape_pct']:.2f}% | {v['kendall_tau']:.3f} | {v['max_ape_pct']:.1f}% | "
                    f"{v['n']} | {lo:.3f} to {hi:.3f} | {cv} | {_fmt_s(v['build_s'])} |")

        for k, v in r["latency"].items():
            lines.append(row(k.replace("_", " "), v))
            # the same table validated before (bench/specialize.py --revalidate-latency)
            lines += [row(f"{k.replace('_', ' ')}, validated earlier", e) for e in v.get("earlier", [])]
        lines += ["", "Every measurement is the smallest of at least 8 medians of 20 calls (as many as "
                  "span 2 s), the models interleaved round by round after a timed warm-up "
                  "(onceforall/specialization/ort_timing.py, time_many). Measured again: the same 50 "
                  "subnets measured a second time right after the first, against the first: the "
                  "noise floor under any "
                  "table's MAPE on this machine at the time.", ""]
    if r.get("search"):
        s = r["search"]
        lines += [f"Search (population 100, 500 generations, MACs budget 6M): "
                  f"**{s['ours_s']:.2f} s**.", ""]
    ref_path = RESULTS / "reference_search.json"
    if ref_path.exists():
        ref = json.loads(ref_path.read_text())
        lines += [f"Side by side in one run (`{ref['command']}`, torch {ref['torch']}, predictors "
                  f"randomly initialised, same settings, {ref.get('statistic', 'one run per side')}): "
                  f"reference `{ref['reference_package']}` EvolutionFinder with its 3x400 MLP "
                  f"**{ref['reference_s']:.2f} s**; ours with "
                  f"{ref.get('ours_predictor', 'the same MLP shape')} **{ref['ours_s']:.3f} s** "
                  f"(**{ref['speedup']:.1f}x**)"
                  + (f"; ours with the reference's 3x400 MLP **{ref['ours_reference_mlp_s']:.3f} s** "
                     f"(**{ref['speedup_reference_mlp']:.1f}x**: the search code alone)"
                     if "ours_reference_mlp_s" in ref else "") + ".", ""]
    else:
        lines += ["Reference search speed: pending (`make bench-reference`).", ""]
    if r.get("targets"):
        lines += ["| target | constraint | budget | searched: test acc | best uniform: test acc | "
                  "validation acc: searched / uniform | MACs | params | latency measured / predicted (ms) "
                  "| reproduced acc / in budget |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        def budget(t: dict) -> str:  # a budget_of_max budget: the fraction, and in ms on this host
            return (f"{t['budget_of_max']:g} of max = {t['budget']:.4g}" if t.get("budget_of_max")
                    else f"{t['budget']:g}")

        for name, t in r["targets"].items():
            rep = t["reproduced"]
            lat = (f"{t['measured_latency_ms']:.3f} / {t['predicted_latency_ms']:.3f}"
                   if t.get("predicted_latency_ms") is not None else f"{t['measured_latency_ms']:.3f} / -")
            if t.get("search_rounds", 1) > 1:
                lat += f" ({t['search_rounds']} searches)"
            uni = "none fits" if t["best_uniform_test_acc"] is None else f"{t['best_uniform_test_acc']:.2f}"
            val = (f"{t['searched_val_acc']:.2f} / {t['best_uniform_val_acc']:.2f}"
                   if t.get("best_uniform_val_acc") is not None else "-")
            lines.append(f"| {name} | {t['constraint']} | {budget(t)} | {t['searched_test_acc']:.2f} | "
                         f"{uni} | {val} | {t['macs'] / 1e6:.2f}M | {t['params'] / 1e3:.0f}k | {lat} | "
                         f"{rep['test_acc']:.2f} / {'yes' if rep['within_budget'] else 'NO'} |")
        lines += ["", "A latency target's pick is measured on its runtime by the search itself, which "
                  "searches again under a tighter budget while the pick measures over budget, and "
                  "measures its shortlist (its 8 best-scoring Pareto points and the 8 best subnets its "
                  "validation feedback measured); the export picks, of those within the budget less "
                  "its headroom, the best on validation (each image and its mirror image). The best "
                  "uniform subnet (same depth, kernel and expand everywhere, any resolution) is chosen "
                  "the same way: of the 81, those within the budget less its headroom (a latency "
                  "budget measured on the target's runtime with the card's statistic), the best on "
                  "validation; both are then judged once on the test set.", ""]
        cards = {n: t for n, t in r["targets"].items()
                 if t["constraint"] == "latency_ms" and "host_slowdown" in t["reproduced"]}
        if cards:
            lines += ["Latency cards and their reproduction (`python -m onceforall.reproduce`, a fresh "
                      "process right after the export). The host probe "
                      "(onceforall/specialization/ort_timing.py) is timed in the same rounds as the "
                      "model: its time when the target's latency table was "
                      "measured, with the card, and with the reproduction (their ratio: how much slower "
                      "the reproduction's host ran):", "",
                      "| target | budget (headroom) | card (ms) | reproduced (ms) | probe: table / card / "
                      "reproduction (ms) | reproduction's host slowdown | verdict |",
                      "|---|---|---|---|---|---|---|"]
            for n, t in cards.items():
                rep = t["reproduced"]
                ref = t.get("host_probe_reference_ms")
                lines.append(f"| {n} | {budget(t)} ms ({t.get('headroom_pct', 0):g}%) | "
                             f"{t['measured_latency_ms']:.4f} | {rep['latency_ms']:.4f} | "
                             f"{'-' if ref is None else f'{ref:.3f}'} / {t['card_host_probe_ms']:.3f} / "
                             f"{rep['host_probe_ms']:.3f} | {rep['host_slowdown']:.3f} | "
                             f"{rep['latency_verdict']} |")
            lines.append("")
        refined = {n: t["refinement"] for n, t in r["targets"].items() if t.get("refinement")}
        if refined:
            lines += ["Validation feedback in each search (onceforall/specialization/specialize.py, "
                      "Refinement): per round, the validation accuracy (%) of the 8 best-scoring "
                      "points not measured yet, "
                      "before the predictor is fit again on them (weight 3) and its rows:", "",
                      "| target | " + " | ".join(f"round {i + 1}" for i in range(
                          max(len(f["val_acc_by_round"]) for f in refined.values()))) + " | wall |",
                      "|---|" + "---|" * (max(len(f["val_acc_by_round"]) for f in refined.values()) + 1)]
            for n, f in refined.items():
                lines.append(f"| {n} | " + " | ".join(f"{min(v):.2f}-{max(v):.2f}"
                                                      for v in f["val_acc_by_round"])
                             + f" | {_fmt_s(f['wall_s'])} |")
            lines.append("")
        lines += [f"{n}\n" for n in r.get("notes", [])]
        lines += [f"![{n}](pareto/{n}.png)" for n in r["targets"]]
    return lines


def cpu_speed(r: dict) -> list[str]:
    lines = ["## Training step speed on CPU (what helps)", "",
             f"Command: `{r['command']}`", "",
             f"Images/s of one training step (forward, backward, SGD), batch {r['batch']}, resolution "
             f"{r['resolution']}. `oneDNN depthwise grad` is the elastic supernet with torch's own "
             "depthwise weight gradient everywhere, instead of the project's where the kernel is larger "
             "than the feature map (`onceforall/supernet/ops.py`)."]
    for run in [r] + r.get("other_machines", []):
        before = not any("oneDNN" in row["layout"] for row in run["rows"])
        lines += ["", f"Machine: {_machine(run['machine'])}"
                  + (" (measured before the small-map gradient: its channels_last rows are oneDNN's "
                     "gradient)" if before else ""), "",
                  "| model | subnet | threads | layout | images/s | first step |",
                  "|---|---|---|---|---|---|"]
        for row in run["rows"]:
            rate = f"{row['images_per_s']:.0f}" if "images_per_s" in row else f"failed: {row['error']}"
            first = f"{row['first_step_s']:.1f} s" if "first_step_s" in row else ""
            lines.append(f"| {row['model']} | {row['subnet']} | {row['threads']} | {row['layout']} | "
                         f"{rate} | {first} |")
    return lines


def _rate(t: dict, key: str) -> str:
    if f"{key}_img_s" not in t or t[f"{key}_img_s"] is None:
        return f"failed: {t.get(f'{key}_error', '?')}"
    return f"{t[f'{key}_img_s']:.1f} ({t[f'{key}_step_ms']:.0f} ms)"


def throughput(r: dict) -> list[str]:
    s = r["settings"]
    lines = ["## Training speed against the reference (issue 6)", "",
             f"Command: `{r['command']}` (both halves in one run, one after the other, "
             f"{_fmt_s(r['total_s'])} in all)  ", f"Machine: {_machine(r['machine'])}  ",
             f"Reference: `{s['reference_package']}` in its own venv, torch {s['reference_torch']}, "
             f"torchvision {s['reference_torchvision']}", "",
             f"Images/s of one supernet training step (forward, cross-entropy with label smoothing "
             f"{s['label_smoothing']}, backward, SGD Nesterov) on `{s['space']}` at resolution "
             f"{s['resolution']}, batch {s['batch']}, {s['threads']} threads, {s['timed_steps']} timed steps "
             f"after {s['warmup_steps']} warm-up (median step time in brackets); `random` is a new random "
             f"subnet every step, the same sequence on both sides. Ours runs channels-last (its training "
             f"path), the reference its default contiguous layout; the other layout of each is extra "
             f"information:", "",
             "| subnet | ours | reference | ours / reference | ours, contiguous | reference, channels-last |",
             "|---|---|---|---|---|---|"]
    for row, t in r["throughput"].items():
        ratio = f"**{t['speedup']:.2f}x**" if "speedup" in t else "-"
        lines.append(f"| {row} | {_rate(t, 'ours')} | {_rate(t, 'reference')} | {ratio} | "
                     f"{_rate(t, 'ours_contiguous')} | {_rate(t, 'reference_channels_last')} |")
    e, b = r["extraction_ms"], r["bn_recalibration_ms"]
    lines += ["", "| per subnet (median) | ours | reference | ours / reference |", "|---|---|---|---|",
              f"| extraction of a static subnet ({e['subnets']} random subnets) | {e['ours']:.1f} ms | "
              f"{e['reference']:.1f} ms | **{e['reference'] / e['ours']:.2f}x** |",
              f"| BN recalibration ({b['images']:,} images in batches of {b['batch']}, {b['subnets']} "
              f"random subnets) | {_fmt_ms(b['ours'])} | {_fmt_ms(b['reference'])} | "
              f"**{b['reference'] / b['ours']:.2f}x** |", ""]
    ratios = {f"training {k}": t["speedup"] for k, t in r["throughput"].items() if "speedup" in t}
    ratios |= {"extraction": e["reference"] / e["ours"], "BN recalibration": b["reference"] / b["ours"]}
    slower = [f"{k} ({v:.2f}x)" for k, v in ratios.items() if v < 1]
    faster = [f"{k} ({v:.2f}x)" for k, v in ratios.items() if v >= 1]
    if not slower:
        lines.append(f"Ours is at least as fast as the reference on every row: {', '.join(faster)}.")
    else:
        lines.append(f"Ours is at least as fast on {', '.join(faster) or 'no row'}, and slower on "
                     f"{', '.join(slower)}.")
    p = r.get("max_subnet_params", {})
    if p:
        lines.append(f"Max subnet parameters: ours {p['ours']:,}, reference {p['reference']:,}.")
    lines += ["", r.get("notes", "")]
    return lines


def _fmt_ms(ms: float) -> str:
    return f"{ms / 1e3:.2f} s" if ms >= 1e3 else f"{ms:.0f} ms"


def pipeline(r: dict) -> list[str]:
    lines = ["## The local pipeline (issue: Kubeflow pipeline)", "",
             f"Command: `{r['command']}`  ", f"Machine: {_machine(r['machine'])}", "",
             f"The `{r['schedule']}` schedule, Fashion-MNIST, the {r['targets']} example targets:", "",
             "| | wall |", "|---|---|",
             f"| every stage called in one process | {_fmt_s(r['direct_s'])} |",
             f"| `ofa run` (kfp SubprocessRunner, one process per stage) | {_fmt_s(r['local_kfp_s'])} |",
             f"| overhead of the local kfp run | **{r['overhead_pct']:.1f} %** |"]
    fresh = r.get("fresh_clone")
    if fresh:
        lines += [f"| README main command `make run` on a fresh clone (venv + installs + run) | "
                  f"**{_fmt_s(r['quick_run_s'])}** (install {_fmt_s(fresh['install_s'])}) |", "",
                  f"Fresh clone of `{fresh['commit'][:10]}`: {len(fresh['models'])} models published "
                  f"({', '.join(fresh['models'])}), report.md: {'yes' if fresh['report_md'] else 'no'}; "
                  "test accuracy " + ", ".join(f"{k} {v:.2f}%" for k, v in fresh["test_acc"].items()) + "."]
        e, s = fresh["energy"], fresh.get("savings") or {}
        lines += ["", f"Energy of that run ({', '.join(e['methods'])}; `model` = CodeCarbon estimate): "
                  f"{e['total_j'] / 3.6e3:.2f} Wh, {e['emissions_g']:.2f} g CO2e; shared stages "
                  f"{e['shared_j'] / 3.6e3:.2f} Wh, one more target {e['marginal_j_per_target']:.0f} J."]
        if s:
            be = ("never at this scale: one more OFA target (profile + search + export, "
                  f"{e['marginal_j_per_target']:.0f} J) costs as much as one such training"
                  if s["break_even_targets"] is None else f"{s['break_even_targets']:.1f} targets")
            lines.append(f"What this measures: the `{r['schedule']}` schedule's scale (its few teacher and "
                         "shrinking epochs) against one fixed architecture (the middle subnet) trained "
                         f"alone on the same teacher recipe for each of the {s['targets']} targets "
                         f"({s['scratch_per_target_j']:.0f} J each), with no search: savings ratio "
                         f"{s['ratio']:.2f}x, break-even {be}. Against per-target NAS and at the "
                         "`standard` scale: the claim section below.")
    lines += ["", r.get("notes", "")]
    report = RESULTS / "quick_run_report.json"
    if report.exists() and _plot_energy(json.loads(report.read_text())):
        lines += ["", "Energy per stage of that run, from its report (`docs/results/quick_run_report.json`; "
                  "the same figures every stage pushed to the Pushgateway):", "",
                  "![energy per stage](pipeline_energy.png)"]
    return lines


def _plot_energy(report: dict) -> bool:
    plt = _pyplot()
    rows = report["energy"]["stages"]
    labels = [r["stage"] + (f"\n{r['target']}" if r.get("target") else "") for r in rows]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    bottom = [0.0] * len(rows)
    for comp, color in (("cpu_j", "#4c72b0"), ("ram_j", "#55a868"), ("gpu_j", "#c44e52")):
        vals = [r[comp] for r in rows]
        if any(vals):
            ax.bar(range(len(rows)), vals, bottom=bottom, color=color, label=comp[:-2].upper())
            bottom = [b + v for b, v in zip(bottom, vals)]
    methods = sorted({m for r in rows for m in r["methods"].values() if m != "none"})
    ax.set_xticks(range(len(rows)), labels, rotation=70, fontsize=7)
    ax.set_ylabel("energy (J)")
    ax.set_title(f"energy per stage, run {report['run_id']} (method: {', '.join(methods)})", fontsize=9)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(DOCS / "pipeline_energy.png", dpi=110)
    plt.close(fig)
    return True


def _recipe(r: dict) -> str:
    t = r["settings"]["trained_on"]  # bench/claim.py writes it before anything else
    return (f"{t['teacher_recipe']['epochs']} epochs; the supernet's weights sha256 "
            f"`{t['supernet_sha256'][:12]}`")


def claim(r: dict, docs: Path = DOCS) -> list[str]:
    lines = ["## The claim: OFA subnets vs the same architectures from scratch and vs per-target NAS "
             "(issues: the claim, 22)", "",
             f"Command: `{r['command']}` (resumable: a rerun skips every training already measured)  ",
             f"Machine: {_machine(r['machine'])}", ""]
    targets = r.get("targets", {})
    if targets:
        ft = r["settings"]["finetune"]
        fts = {"finetuned": ft} if "epochs" in ft else ft  # one 2-epoch fine-tune before issue #21
        said = "; ".join(f"{v['epochs']} epochs" + (f" ({v['fraction']:.0%} of the recipe's)"
                                                     if "fraction" in v else "") for v in fts.values())
        lines += ["Test accuracy (%) of the subnet the search picked for each example target on the "
                  "`standard` supernet: as exported (no retraining), fine-tuned from the supernet "
                  f"({said}; lr {next(iter(fts.values()))['lr']}), and the same architecture trained from "
                  f"scratch on the teacher's recipe ({_recipe(r)}), without and with distillation from the "
                  "teacher. Mean ± standard deviation over seeds where there are several; `pending` = "
                  "not measured yet. McNemar: the exact two-sided p-value of the OFA subnet against each "
                  "scratch seed on the same test images. The subnets are a snapshot "
                  f"(`{r['settings'].get('subnets', 'the specialization run')}`), so a later "
                  "specialization run that picks other subnets does not mix into these rows.", "",
                  "| target | MACs | OFA as exported | "
                  + " | ".join(f"OFA fine-tuned {v['epochs']} ep" for v in fts.values())
                  + " | scratch | scratch + KD | per-target NAS | OFA − best scratch "
                    "| McNemar p vs scratch |",
                  "|---|---:|---:|" + "---:|" * len(fts) + "---:|---:|---:|---:|---|"]

        def cell(t: dict, kind: str) -> str:
            if f"{kind}_test_acc" not in t:
                return "pending"
            sd = t.get(f"{kind}_test_acc_sd")
            return f"{t[f'{kind}_test_acc']:.2f}" + (f" ± {sd:.2f}" if sd else "") + \
                f" ({t[f'{kind}_seeds']} seed{'s' if t[f'{kind}_seeds'] > 1 else ''})"
        for name, t in targets.items():
            diff = t.get("ofa_minus_best_scratch")
            p = t.get("mcnemar", {}).get("scratch", {})
            lines.append(f"| {name} | {t['macs'] / 1e6:.2f}M | {t['ofa_test_acc']:.2f} | "
                         + "".join(f"{cell(t, k)} | " for k in fts)
                         + f"{cell(t, 'scratch')} | {cell(t, 'scratch_kd')} | "
                         f"{cell(t, 'nas')} | {'pending' if diff is None else f'{diff:+.2f}'} | "
                         + (", ".join(f"{v['p']:.3g}" for _, v in sorted(p.items())) or "pending") + " |")
        lines += _claim_acceptance(r)
        nas = r["settings"].get("nas")
        if nas:
            lines += ["", f"Per-target NAS (`{nas['module']}`): {nas['candidates']} random architectures "
                      f"within the target's budget (drawn from those using at least {nas['band']:.0%} "
                      f"of it), each trained {nas['proxy_epochs']} epoch(s) on "
                      f"{nas['proxy_train_images'] or 'all'} images at its own resolution, the best on "
                      "validation then trained on the same recipe as `scratch`; its cost counts every "
                      "proxy and the final training (why this is a fair, cheap NAS: the module's "
                      "docstring)."]
    gaps = [t["ofa_minus_best_scratch"] for t in targets.values() if "ofa_minus_best_scratch" in t]
    if gaps:
        if max(gaps) < 0:
            lines += ["", "**OFA falls short**: from scratch beats the exported OFA subnet at every "
                      f"measured target, by {-max(gaps):.2f} to {-min(gaps):.2f} points. " + r.get("why", "")]
        elif min(gaps) >= 0:
            lines += ["", "OFA matches or beats from-scratch training at every measured target."]
    models = r.get("cost_model")
    for model in (models or {}).values():
        lines += [""] + cost_model_lines(model, docs)
    c = None if models else r.get("cost")  # the format before the NAS baseline
    if c:
        be = "never" if c["break_even_n"] is None else f"{c['break_even_n']:.1f}"
        lines += ["", f"Cost of N targets, from measured stages ({c['source']}; energy method: "
                  f"{', '.join(c['methods'])}, `model` = CodeCarbon's estimate):", "",
                  f"Shared stages {c['shared_j']:.0f} J; one more target {c['per_target_marginal_j']:.0f} J; "
                  f"one from-scratch training {c['scratch_per_target_j']:.0f} J; break-even at **{be}** "
                  "targets.", "", "| N | OFA (J) | from scratch (J) | OFA wall | scratch wall | "
                  "OFA CO2e (g) | scratch CO2e (g) |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in c["rows"]:
            lines.append(f"| {row['n']} | {row['ofa_j']:.0f} | {row['scratch_j']:.0f} | "
                         f"{_fmt_s(row['ofa_wall_s'])} | {_fmt_s(row['scratch_wall_s'])} | "
                         f"{row['ofa_g']:.2f} | {row['scratch_g']:.2f} |")
        lines += ["", "Assumptions: " + "; ".join(c["assumptions"]) + "."]
        std = c.get("standard")
        if std and std.get("scratch_per_target_j"):
            lines += ["", "At the `standard` scale: one from-scratch training "
                      f"(teacher recipe, {_recipe(r)}) "
                      f"measured {std['scratch_per_target_j']:.0f} J (mean of "
                      f"{std['scratch_trainings_metered']} metered trainings), against "
                      f"{std['per_target_marginal_j']:.0f} J for one more OFA target; "
                      + (f"shared training {std['shared_j']:.0f} J, break-even at "
                         f"{std['break_even_n']:.1f} targets." if std.get("shared_j")
                         else f"shared training: pending ({std['pending']})")]
        if _plot_cost(c):
            lines += ["", "![cost vs N](claim_cost.png)"]
    t = r.get("throughput")
    if t:
        lines += ["", "Training-step throughput (images/s) against the reference: see the training speed "
                  "section below (`docs/results/throughput.json`)."]
    lines += ["", "GPU: no GPU was available to this project's benchmark runs so far; the `standard` "
              "schedule and the throughput rows on a GPU are **pending**."]
    return lines


def _claim_acceptance(r: dict) -> list[str]:
    """Issue #21's bars, as bench/claim.py measured them (nothing until there are scratch runs)."""
    a = r.get("acceptance") or {}
    if not a:
        return []
    mean, within = a["mean_over_targets"], a["per_target_within_se"]
    lines = ["", f"Against training alone ({a['scratch_seeds']} seed(s) per target at least): "
             f"{sum(within.values())} of {len(within)} targets within one standard error (0.27 points) of "
             f"their scratch mean or above it"
             + (f" (not: {', '.join(n for n, ok in within.items() if not ok)})" if not all(within.values())
                else "")
             + f"; over targets, OFA {mean['ofa']:.2f} against scratch {mean['scratch']:.2f} "
             f"({'holds' if mean['holds'] else 'does not hold'})."]
    shared, lp = a.get("shared_over_scratch_wall"), a["largest_pick"]
    if shared:
        s = r["shared"]
        lines += ["", f"Shared training (teacher + every shrinking phase), trained again in this run: "
                  f"{_fmt_s(s['wall_s'])}, **{shared['ratio']:.2f}x** one training alone of the largest "
                  f"picked architecture ({lp['target']}, {_fmt_s(lp['scratch_wall_s'])}); the bar is "
                  f"{shared['bar']:g}x ({'holds' if shared['holds'] else 'does not hold'}). The retraining "
                  + ("reproduced the supernet's weights bit for bit." if s["reproduces_supernet"] else
                     f"gave other weights (sha256 `{s['supernet_sha256'][:12]}`): its time stands, its "
                     "weights are not the measured supernet's.")]
    return lines


BASELINES = {"scratch": "training alone", "nas": "per-target NAS"}


def cost_model_lines(m: dict, docs: Path = DOCS) -> list[str]:
    """One scale's cost of N targets (bench/claim.py, onceforall/infra/cost.py): OFA against each
    measured baseline, the break-even N against each, or what is pending."""
    scale = m["scale"]
    head = f"**Cost of N targets at the `{scale}` scale**"
    if "rows" not in m:
        got = ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in m.get("measured", {}).items() if v is not None)
        return [f"{head}: pending ({m.get('pending')}). Measured so far: {got or 'nothing'}."]
    names = [b for b in BASELINES if b in m["baselines"]]
    be = "; ".join(f"against {BASELINES[b]} at **" + ("never" if m["break_even_n"][b] is None
                                                       else f"N = {m['break_even_n'][b]:.1f}") + "**"
                   for b in names)
    lines = [f"{head}" + (f" ({m['source']})" if m.get("source") else "") + ":" +
             (f" it measures {m['measures']}." if m.get("measures") else ""), "",
             f"Shared {m['shared']['j']:.0f} J ({m['shared']['wh']:.2f} Wh, "
             f"{_fmt_s(m['shared']['wall_s'])}); "
             f"one more OFA target {m['per_target_marginal']['j']:.0f} J; " +
             "; ".join(f"{BASELINES[b]} {m['baselines'][b]['j']:.0f} J per target" for b in names) +
             f". Break-even {be}. CO2e at {m['g_per_kwh']:g} g/kWh.", "",
             "| N | OFA (Wh) | " + " | ".join(f"{BASELINES[b]} (Wh)" for b in names) +
             " | OFA CO2e (g) | " + " | ".join(f"{BASELINES[b]} CO2e (g)" for b in names) +
             " | OFA wall | " + " | ".join(f"{BASELINES[b]} wall" for b in names) + " |",
             "|---:|" + "---:|" * (3 + 3 * len(names))]
    for row in m["rows"]:
        sides = ["ofa", *names]
        lines.append(f"| {row['n']} | " + " | ".join(f"{row[f'{s}_wh']:.2f}" for s in sides) + " | " +
                     " | ".join(f"{row[f'{s}_g']:.2f}" for s in sides) + " | " +
                     " | ".join(_fmt_s(row[f"{s}_wall_s"]) for s in sides) + " |")
    lines += ["", "Assumptions: " + "; ".join(m["assumptions"]) + "."]
    if _plot_cost_model(m, docs / f"claim_cost_{scale}.png"):
        lines += ["", f"![cost vs N, {scale}](claim_cost_{scale}.png)"]
    return lines


def _plot_cost_model(m: dict, path: Path) -> bool:
    plt = _pyplot()
    ns = [row["n"] for row in m["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [row["ofa_wh"] for row in m["rows"]], "-o", label="OFA: train once, specialize N")
    for b, mark in (("scratch", "-s"), ("nas", "-^")):
        if b in m["baselines"]:
            ax.plot(ns, [row[f"{b}_wh"] for row in m["rows"]], mark, label=f"N x {BASELINES[b]}")
            if m["break_even_n"][b]:
                ax.axvline(m["break_even_n"][b], color="grey", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of targets N")
    ax.set_ylabel("energy (Wh)")
    ax.set_title(f"cost of N targets, {m['scale']} scale (dotted: break-even)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_cost(c: dict) -> bool:
    plt = _pyplot()
    ns = [row["n"] for row in c["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [row["ofa_j"] / 3.6e3 for row in c["rows"]], "-o", label="OFA: train once, specialize N")
    ax.plot(ns, [row["scratch_j"] / 3.6e3 for row in c["rows"]], "-s", label="N trainings from scratch")
    if c["break_even_n"]:
        ax.axvline(c["break_even_n"], color="grey", ls=":", label=f"break-even N = {c['break_even_n']:.1f}")
    ax.set_xscale("log")
    ax.set_xlabel("number of targets N")
    ax.set_ylabel("energy (Wh)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "claim_cost.png", dpi=110)
    plt.close(fig)
    return True


LBS_G = 453.592  # grams per pound


def _ours_n40(claim: dict) -> tuple[list[tuple[str, str, float, float, float]], list[str]]:
    """Our cost of 40 targets from claim.json, per scale and side: (scale, side, wall s, J, g CO2e);
    and the scales still pending."""
    rows, pending = [], []
    models = claim.get("cost_model") or {}
    if not models and "cost" in claim:  # the format before the NAS baseline: quick, scratch only
        r40 = next(r for r in claim["cost"]["rows"] if r["n"] == 40)
        row = {f"{s}_{k}": r40[f"{s}_{k}"] for s in ("ofa", "scratch") for k in ("wall_s", "j", "g")}
        models = {"quick": {"rows": [{"n": 40, **row}], "baselines": {"scratch": {}}}}
        pending.append("standard: the claim's standard cost is pending (see the claim section)")
    for scale, m in models.items():
        if "rows" not in m:
            pending.append(f"{scale}: {m.get('pending', 'not measured')}")
            continue
        r40 = next(r for r in m["rows"] if r["n"] == 40)
        for side in ("ofa", *[b for b in BASELINES if b in m["baselines"]]):
            rows.append((scale, side, r40[f"{side}_wall_s"], r40[f"{side}_j"], r40[f"{side}_g"]))
    return rows, pending


def paper_table1(r: dict) -> list[str]:
    src, der = r["source"], r["derivation"]
    ofa = next(x for x in r["rows"] if x["method"] == "OFA w/ PS")["total_n40"]["co2e_lbs"]

    def cost(c: dict | None) -> str:
        if c is None:
            return "-"
        parts = ([f"{c['fixed']:,}"] if c["fixed"] else []) + ([f"{c['per_n']:,}N"] if c["per_n"] else [])
        return " + ".join(parts) or "0"
    lines = ["## The paper's comparison beside ours (OFA paper, Table 1)", "",
             f"Source: {src['paper']}; {src['table']}. {src['text']}. {src['news']}.", "",
             f"How the paper's figures are made: {der['gpu_hours']}; CO2e {der['co2e']}; dollars: "
             f"{der['aws']}. None of them is metered. {src['how_read']}. {src['versions']}. "
             f"{src['not_in_table']}.", "",
             "| method | ImageNet top1 (%) | search (GPU-h) | training (GPU-h) | N = 40: GPU-h | "
             "CO2e (lbs) | AWS | CO2e / OFA |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        t = x["total_n40"]
        lines.append(f"| {x['method']}{' ¹' if 'note' in x else ''} | {x['imagenet_top1_pct']:.1f} | "
                     f"{cost(x['search_gpu_hours'])} | {cost(x['training_gpu_hours'])} | "
                     f"{t['gpu_hours'] / 1e3:,g}k | {t['co2e_lbs'] / 1e3:,g}k | ${t['aws_usd'] / 1e3:,g}k | "
                     f"{t['co2e_lbs'] / ofa:,.1f}x |")
    notes = [x for x in r["rows"] if "note" in x]
    lines += [f"\n¹ {x['method']}: {x['note']}." for x in notes]
    claim_path = RESULTS / "claim.json"
    ours, pending = _ours_n40(json.loads(claim_path.read_text())) if claim_path.exists() else ([], [])
    names = {"ofa": "OFA", **BASELINES}
    lines += ["", "Ours on the same axes, N = 40 targets (Fashion-MNIST on 2 CPU cores, from "
              "`docs/results/claim.json`): energy metered per stage by CodeCarbon (on these VMs its "
              "CPU-load x TDP model: an estimate, but of this work, not GPU-hours x a rate); device-hours "
              "= wall hours of the 2-core machine; CO2e at the carbon setting of the claim.", "",
              "| scale | side | device-hours | energy (kWh) | CO2e (lbs) | CO2e / OFA |",
              "|---|---|---:|---:|---:|---:|"]
    ofa_g = {scale: g for scale, side, _, _, g in ours if side == "ofa"}
    for scale, side, wall, j, g in ours:
        lines.append(f"| {scale} | {names[side]} | {wall / 3600:.2f} | {j / 3.6e6:.4f} | {g / LBS_G:.5f} | "
                     f"{g / ofa_g[scale]:.2f}x |")
    lines += [f"\nPending: {p}." for p in pending]
    return lines


def host_probe(r: dict) -> list[str]:
    lines = ["## The host probe: does it see what slows a model?", "",
             f"Command: `{r['command']}`  ", f"Machine: {_machine(r['machine'])}", "",
             "Each window is a model card's statistic (the smallest of at least 8 interleaved medians "
             "of 25 calls over 2 s) of a model and of the host probe, timed together; windows back to "
             f"back. The last columns keep the windows where the probe ran within {r['tolerance_pct']:g}% "
             "of its best window, as a card's check against its reference does.", "",
             "| setting | subnet | windows | model (ms) | model spread | probe spread | correlation | "
             "windows kept | model spread in them |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v in r["settings"].items():
        lo, hi = v["model_ms_range"]
        lines.append(f"| {name} | {v['subnet']} | {v['windows']} | {lo:.3f} to {hi:.3f} | "
                     f"{v['model_spread_pct']:.1f}% | {v['probe_spread_pct']:.1f}% | "
                     f"{v['correlation']:.2f} | {v['windows_probe_within_tolerance']} | "
                     f"{v['model_spread_in_those_pct']:.1f}% |")
    return lines + [f"\n{n}" for n in r.get("notes", [])]


def containers(r: dict) -> list[str]:
    b, side = r["build"], r["side_by_side"]
    lines = ["## The image, built and run here (issue 20: images)", "",
             f"Machine: {_machine(r['machine'])}; {r['machine_note']}", "",
             f"Build: `{b['command']}`: buildah {b['buildah']}, from a Debian bookworm base made with "
             "mmdebstrap, every wheel from images/wheelhouse (OFFLINE=1).", "",
             "| | |", "|---|---|",
             f"| `buildah bud` of images/Dockerfile.cpu | {_fmt_s(b['buildah_s'])} ({b['buildah_note']}) |",
             f"| the whole `make image` | {_fmt_s(b['total_s'])} ({b['total_note']}) |",
             f"| image size (podman) | {b['size_mb']} MB |", "",
             f"The smoke pipeline, subprocess runner and container runner side by side "
             f"({side['when']}; load average {side['load']}): the tasks both finished, in seconds "
             "as kfp's log times them.", "",
             "| task | subprocess | container |", "|---|---|---|"]
    lines += [f"| {name} | {sub:.0f} | {con:.0f} |" for name, sub, con in side["tasks"]]
    lines += ["", side["outcome"]]
    solo = r.get("solo")
    if solo:
        lines += ["", f"Then each alone, one after the other ({solo['when']}): `ofa run`'s own wall (the "
                  "smoke pipeline's 21 tasks), the tasks' own time (the sum of the stages' `wall_s` in "
                  "the run's report) and the rest, which is the runner's (starting a process or a "
                  "container, kfp's executor, listing artifacts):", "",
                  "| runner | wall | tasks' own time | runner's share | the whole test |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {_fmt_s(x['wall_s'])} | {_fmt_s(x['stages_s'])} | "
                  f"{x['wall_s'] - x['stages_s']:.0f} s | {_fmt_s(x['test_s'])} |"
                  for name, x in solo["runs"].items()]
        lines += ["", solo["outcome"]]
    lines += ["", r.get("notes", "")]
    return lines


def stream_speed(r: dict) -> list[str]:
    st, mem = r["streamed"], r["in_memory"]
    lines = ["## Streamed training data against the in-memory path (issue 24)", "",
            f"Command: `{r.get('command', 'python bench/stream_speed.py')}`  ",
            f"Machine: {_machine(r.get('machine', {}))}  ", f"Code: `{r.get('code_commit', 'not recorded')}`",
            "", f"{r['what']}. {r.get('notes', '')}", "",
            "| path | data | px | batch | decoding processes | images | images/s |",
            "|---|---|---|---|---|---|---|",
            f"| streamed (stream.py) | `{st['data']}` | {st['resolution']} | {st['batch']} | "
            f"{st['workers']} | {st['images']} | {st['images_per_s']:,.0f} |",
            f"| in memory (data.train_batch) | `{mem['data']}` | {mem['resolution']} | {mem['batch']} | - | "
            f"{mem['images']} | {mem['images_per_s']:,.0f} |"]
    sm = r.get("small_streamed")
    if sm:
        lines.append(f"| streamed, the in-memory set's images as PNGs | `{mem['data']}` | "
                     f"{sm['resolution']} | {sm['batch']} | {sm['workers']} | {sm['images']} | "
                     f"{sm['images_per_s']:,.0f} |")
    return lines


PREDICTOR_DATA_WHAT = (
    "`bench/predictor_data_speed.py` measures what the fit-accuracy-predictor stage spends per subnet "
    "on an `imagefolder:` dataset at 224 px: JPEG decoding alone (`decode_images_per_s`), images "
    "through a subnet end to end (2,000 calibration images under the reference's training transform "
    "plus each validation image and its mirror image: `images_per_s`) and `s_per_subnet`, with random "
    "imagenet-mbv3 weights (speed does not depend on them) or `--supernet DIR`.")


def predictor_data_speed(r: dict) -> list[str]:
    return ["## Predictor data on streamed ImageNet-layout data, 224 px (issue 23)", "",
            f"Command: `{r.get('command', 'python bench/predictor_data_speed.py')}`  ",
            f"Code: `{r.get('code_commit', 'not recorded')}`", "",
            PREDICTOR_DATA_WHAT, "", f"Data: `{r['data']}`; supernet: {r['supernet']}; machine: "
            f"{r['machine']}, {r['cpus']} CPUs, {r['torch_threads']} torch threads, {r['workers']} "
            "decoding processes", "",
            "| subnets | calibration images | validation images x views | decode images/s | "
            "images/s end to end | s per subnet |", "|---|---|---|---|---|---|",
            f"| {r['subnets']} | {r['calib_images']} | {r['val_images']} x {r['views']} | "
            f"{r['decode_images_per_s']:,.1f} | {r['images_per_s']:,.1f} | {r['s_per_subnet']:.2f} |",
            "", r.get("notes", "")]


# What a pending section says: how to measure it.
PENDING = {
    "predictor_data_speed.json": [
        PREDICTOR_DATA_WHAT, "",
        "    OMP_NUM_THREADS=2 PYTHONPATH=. python bench/predictor_data_speed.py "
        "--data imagefolder:/data/imagenet --out docs/results/predictor_data_speed.json", "",
        "(`--make-jpegs 5000` instead of `--data` writes noise JPEGs of ImageNet's typical 500 x 375; "
        "they are larger than photos and decode slower, so the figure is then a lower bound.) To be run "
        "on an idle machine (and on a GPU host): a figure measured beside another benchmark says nothing."],
    "stream_speed.json": ["`make bench-stream` (`bench/stream_speed.py`: a streamed ImageFolder epoch at 224 "
                          "px against the in-memory path at 28 px, the data path only), on an idle machine."],
    "recipe.json": ["`make bench-recipe` (hours on 2 cores; resumable: run it on an idle machine, since "
                    "its equal-wall-time plan times training steps)."],
}

# Benchmarks that run over several sessions keep their partial results in a committed ledger.
LEDGERS = {"recipe.json": ROOT / "bench" / "ledger" / "recipe.json"}  # bench/recipe.py LEDGER

SECTIONS = {"progressive_shrinking.json": progressive_shrinking, "kernel_phase.json": kernel_phase,
            "recipe.json": recipe,
            "specialize.json": specialize, "predictor_data_speed.json": predictor_data_speed,
            "host_probe.json": host_probe,
            "cpu_speed.json": cpu_speed, "throughput.json": throughput, "pipeline.json": pipeline,
            "claim.json": claim, "paper_table1.json": paper_table1, "containers.json": containers,
            "stream_speed.json": stream_speed}


def render() -> Path:
    out = ["# Benchmarks", "",
           "Generated by `python bench/render.py` from `docs/results/*.json`; each section names the "
           "command that measured it and the machine it ran on. Nothing here is estimated, except "
           "energy figures whose method is `model` (CodeCarbon's estimate where no RAPL/NVML counters "
           "are readable), and they say so.", ""]
    for name, section in SECTIONS.items():
        path = RESULTS / name
        if path.exists():
            out += section(json.loads(path.read_text())) + [""]
        elif name in LEDGERS and LEDGERS[name].exists() and "gains" in json.loads(LEDGERS[name].read_text()):
            lines = section(json.loads(LEDGERS[name].read_text()))
            out += [lines[0] + ": in progress", "", f"From the ledger `{LEDGERS[name].relative_to(ROOT)}`; "
                    f"`docs/results/{name}` is written when the run is complete.", *lines[1:], ""]
        else:
            out += [f"## {name}: pending (not measured yet)", "", *PENDING.get(name, []), ""]
    target = DOCS / "benchmarks.md"
    target.write_text("\n".join(out))
    return target


if __name__ == "__main__":
    print(render())
