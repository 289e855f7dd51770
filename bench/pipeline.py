"""The local pipeline's cost: `ofa run` (kfp's SubprocessRunner, one process per stage) against the
same stage functions called one after the other in one process, on the `quick` schedule, plus the
README's main command on a fresh clone (venv and installs included).

    python bench/pipeline.py [--skip-fresh-clone]

Writes docs/results/pipeline.json and re-renders docs/benchmarks.md. Run it on a quiet machine:
both sides train on the same 2 cores, and anything else running skews the comparison.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from progressive_shrinking import machine  # noqa: E402

from onceforall import stages  # noqa: E402
from onceforall.specialization.targets import EXAMPLE_TARGETS, load_targets  # noqa: E402

RESULT = ROOT / "docs" / "results" / "pipeline.json"


def direct(work: Path, schedule: str) -> dict:
    """Every stage, in the pipeline's order, in this one process."""
    run = stages.RunContext("direct")
    common = dict(data="fashion-mnist", space="fashion-mnist", schedule=schedule, seed=0, run=run)
    t0 = time.monotonic()
    records = [stages.train_teacher(work / "teacher", **common)]
    prev = work / "teacher"
    for phase in stages.SHRINK_PHASES:
        records.append(stages.shrink(phase, work / phase, init_dir=prev, teacher_dir=work / "teacher",
                                     **common))
        prev = work / phase
    records.append(stages.train_scratch(work / "scratch", **common))
    records.append(stages.fit_accuracy_predictor(prev, work / "predictor", data="fashion-mnist",
                                                 schedule=schedule, run=run))
    exports = []
    for t in load_targets(EXAMPLE_TARGETS):
        records.append(stages.profile(t, work / t.name / "profile", run=run))
        records.append(stages.search(t, work / "predictor", work / t.name / "profile",
                                     work / t.name / "search", run=run))
        records.append(stages.export(t, prev, work / t.name / "search", work / t.name / "export",
                                     data="fashion-mnist", run=run))
        exports.append(work / t.name / "export")
    records.append(stages.report(exports, work / "report", scratch_dir=work / "scratch",
                                 publish_uri=str(work / "published"), run=run))
    wall = time.monotonic() - t0
    return {"wall_s": round(wall, 1), "stages": _stage_walls(records)}


def _stage_walls(records: list[dict]) -> list[dict]:
    return [{"stage": r["stage"], "target": r.get("target"), "wall_s": r["wall_s"]} for r in records]


def local_kfp(work: Path, schedule: str, cmd: list[str], cwd: Path) -> dict:
    """`ofa run` as a user runs it; its wall time from the outside."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return {"wall_s": round(wall, 1), "stderr_tail": proc.stderr.splitlines()[-6:]}


def fresh_clone(work: Path) -> dict:
    """The README's main command (`make run`) on a fresh clone of this commit: venv, installs, run."""
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout
    t0 = time.monotonic()
    proc = subprocess.run(["make", "run"], cwd=clone, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"make run failed on the fresh clone:\n{proc.stderr[-3000:]}")
    m = re.search(r"ofa run: finished in (\d+) s", proc.stderr)
    published = clone / "runs" / "published"
    models = sorted(p.parent.name for p in published.glob("models/*/model_card.json"))
    report = json.loads((published / "report.json").read_text())
    # the whole report of this real run: docs/ plots its energy per stage (bench/render.py)
    (RESULT.parent / "quick_run_report.json").write_text(json.dumps(report, indent=1))
    return {"wall_s": round(wall, 1), "pipeline_s": float(m.group(1)) if m else None,
            "install_s": round(wall - float(m.group(1)), 1) if m else None, "commit": commit.strip(),
            "models": models, "report_md": (published / "report.md").is_file(),
            "energy": {k: report["energy"][k] for k in ("total_j", "emissions_g", "shared_j",
                                                         "marginal_j_per_target", "methods")},
            "savings": report["energy"].get("savings"),
            "test_acc": {k: v["test_acc"] for k, v in report["targets"].items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", default="quick")
    ap.add_argument("--skip-fresh-clone", action="store_true",
                    help="time `ofa run` in this checkout instead of `make run` on a fresh clone")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ofa-bench-pipeline-"))
    result = {"machine": machine(), "schedule": args.schedule, "command": "python bench/pipeline.py",
              "targets": len(load_targets(EXAMPLE_TARGETS))}
    try:
        d = direct(work / "direct", args.schedule)
        print(f"direct: {d['wall_s']} s", file=sys.stderr)
        if args.skip_fresh_clone:
            cmd = [sys.executable, "-m", "onceforall", "run", "--schedule", args.schedule,
                   "--out", str(work / "kfp" / "published"), "--pipeline-root", str(work / "kfp" / "root")]
            k = local_kfp(work / "kfp", args.schedule, cmd, ROOT)
            local_s, quick = k["wall_s"], None
        else:
            quick = fresh_clone(work)
            local_s = quick["pipeline_s"]
            print(f"fresh clone make run: {quick['wall_s']} s (pipeline {local_s} s)", file=sys.stderr)
        result.update({
            "direct_s": d["wall_s"], "local_kfp_s": local_s,
            "overhead_pct": round(100.0 * (local_s - d["wall_s"]) / d["wall_s"], 2),
            "quick_run_s": quick["wall_s"] if quick else None, "fresh_clone": quick,
            "direct_stages": d["stages"],
            "notes": "local_kfp_s is the pipeline's own wall time as `ofa run` prints it (input checks, "
                     "every stage as its own process, publication); quick_run_s is `make run` on a "
                     "fresh clone, creating the venv and installing everything first",
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1))
    subprocess.run([sys.executable, str(ROOT / "bench" / "render.py")], check=True)
    print(json.dumps({k: result[k] for k in ("direct_s", "local_kfp_s", "overhead_pct", "quick_run_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
