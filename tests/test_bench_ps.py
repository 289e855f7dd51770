"""bench/progressive_shrinking.py: a run of another recipe starts over, and the bars it checks."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import progressive_shrinking as ps  # noqa: E402

from onceforall.training.schedule import get_schedule  # noqa: E402

ACC = {"max": 92.0, "mid": 90.0, "shallow-wide": 90.5, "deep-narrow": 89.0, "min": 89.6}


def test_a_run_of_another_recipe_keeps_only_the_summary_of_the_earlier_run():
    """`standard` changed under its name (issue #21): its earlier phases must not count as done."""
    old = {"schedule": "standard", "schedule_summary": "restarts", "supernet_sha256": "ab" * 32,
           "phases": [{"name": "teacher", "test_accuracy": {**ACC, "max": 92.35}}],
           "final": {"test_accuracy": ACC}, "baseline_no_ps": {"test_accuracy": {"min": 89.47}},
           "training_wall_s": 2480.0, "notes": ["why"], "previous_runs": [{"run": "older"}]}
    new = ps.carried_over(old)
    assert set(new) == {"previous_runs"}  # no phases, no final: every phase is trained and measured
    runs = new["previous_runs"]
    assert runs[0] == {"run": "older"} and runs[1]["run"] == f"supernet {'ab' * 6} (restarts)"
    assert runs[1]["teacher_max"] == 92.35 and runs[1]["final"] == ACC and runs[1]["baseline_min"] == 89.47
    assert runs[1]["notes"] == ["why"]
    assert ps.carried_over({}) == {}


def test_the_bars_are_issue_21s_on_the_final_supernet():
    results = {"phases": [{"test_accuracy": {**ACC, "max": 92.1}}], "final": {"test_accuracy": ACC},
               "baseline_no_ps": {"test_accuracy": {**ACC, "min": 89.7}}, "training_wall_s": 2400}
    c = ps.checks(results)
    assert c["max_within_0_1_of_its_teacher"] and c["min_at_least_89_5"]
    assert not c["ps_beats_baseline_on_min"] and not c["max_at_least_92_5"]
    results["phases"][0]["test_accuracy"]["max"] = 92.11
    assert not ps.checks(results)["max_within_0_1_of_its_teacher"]


def test_the_summary_names_the_lr_recipe():
    assert "one lr cosine over the whole training to 5% of its peak" in ps.summary(get_schedule("standard"))
    assert "every phase restarts its lr" in ps.summary(get_schedule("quick"))


def _checkpoint(folder: Path, sha: str, schedule: dict | None = None) -> None:
    from onceforall.supernet.checkpoint import FORMAT

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "checkpoint.json").write_text(json.dumps({"format": FORMAT, "space": {}, "phase": "p",
                                                        "files": {"weights.safetensors": sha},
                                                        "schedule": schedule or {}}))


def test_the_baseline_resumes_from_the_committed_teacher_on_a_fresh_checkout(tmp_path, monkeypatch):
    """bench-ps takes about 2 h, longer than some sessions, and a fresh checkout has no bench/_work:
    once its supernet is measured and committed with its teacher, the baseline starts from them."""
    schedule = get_schedule("standard")
    recipe = json.loads(json.dumps(schedule.to_dict()))
    results = {"recipe": recipe, "supernet_sha256": "ab" * 32,
               "phases": [{"name": p.name} for p in schedule.all_phases()]}
    committed = tmp_path / "committed"
    monkeypatch.setattr(ps, "SUPERNET_FIXTURE", committed)
    work = tmp_path / "work"
    assert ps.committed_teacher(results, schedule, work) is None  # nothing committed: train
    _checkpoint(committed, "ab" * 32)
    _checkpoint(committed / "teacher", "cd" * 32, recipe)
    assert ps.committed_teacher(results, schedule, work) == committed / "teacher"
    assert ps.committed_teacher({**results, "phases": results["phases"][:-1]}, schedule, work) is None
    assert ps.committed_teacher({**results, "supernet_sha256": "ef" * 32}, schedule, work) is None
    _checkpoint(work / "ps" / schedule.all_phases()[-1].name, "ab" * 32)
    assert ps.committed_teacher(results, schedule, work) is None  # trained here: resume as usual
    _checkpoint(committed / "teacher", "cd" * 32, {**recipe, "batch_size": 64})
    with pytest.raises(SystemExit, match="not the teacher"):
        ps.committed_teacher(results, schedule, tmp_path / "fresh")
