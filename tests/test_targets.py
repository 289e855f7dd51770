from dataclasses import replace

import pytest
import yaml

from onceforall.errors import UserError
from onceforall.specialization.targets import Target, load_targets, parse_targets

EXAMPLE = "examples/targets.yaml"
CLUSTER_EXAMPLE = "examples/targets-cluster.yaml"
# labels the kubelet puts on every node: a selector of these alone schedules on any such cluster
WELL_KNOWN_LABELS = {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}


def test_example_file_has_four_clearly_different_targets():
    targets = load_targets(EXAMPLE)
    assert len(targets) >= 4
    assert {t.constraint.kind for t in targets} == {"latency_ms", "macs", "params"}
    assert {t.threads for t in targets} == {1, 2}


def test_the_defaults_carry_no_placement():
    # a node selector no cluster has leaves the pods Pending: placement lives in the cluster example
    assert all(not t.node_selector and not t.tolerations for t in load_targets(EXAMPLE))


def test_the_cluster_example_is_the_defaults_plus_a_placement_that_schedules():
    defaults = {t.name: t for t in load_targets(EXAMPLE)}
    cluster = load_targets(CLUSTER_EXAMPLE)
    assert [t.name for t in cluster] == list(defaults)  # no drift of budgets or runtimes either
    for t in cluster:
        assert replace(t, node_selector={}, tolerations=()) == defaults[t.name]
        assert set(t.node_selector.items()) <= set(WELL_KNOWN_LABELS.items())
    latency = [t for t in cluster if t.constraint.kind == "latency_ms"]
    assert latency and all(t.node_selector and t.tolerations for t in latency)


def _one(**override):
    base = {"name": "edge", "runtime": "onnxruntime", "threads": 1, "batch_size": 1,
            "constraint": {"kind": "latency_ms", "budget": 2.0}}
    base.update(override)
    return {"targets": [base]}


@pytest.mark.parametrize("override, field", [
    ({"runtime": "tensorrt"}, "targets[0].runtime"),
    ({"constraint": {"kind": "energy", "budget": 1}}, "targets[0].constraint.kind"),
    ({"constraint": {"kind": "macs", "budget": -5}}, "targets[0].constraint.budget"),
    ({"constraint": {"kind": "macs", "budget": 0}}, "targets[0].constraint.budget"),
    ({"constraint": {"kind": "macs"}}, "targets[0].constraint"),
    ({"constraint": {"kind": "latency_ms", "budget": 2, "margin": 5}}, "targets[0].constraint"),
    ({"constraint": {"kind": "latency_ms", "budget": 2, "headroom_pct": -1}},
     "targets[0].constraint.headroom_pct"),
    ({"constraint": {"kind": "latency_ms", "budget": 2, "headroom_pct": 50}},
     "targets[0].constraint.headroom_pct"),
    ({"constraint": {"kind": "latency_ms", "budget": 2, "headroom_pct": "5%"}},
     "targets[0].constraint.headroom_pct"),
    ({"constraint": {"kind": "macs", "budget": 4e6, "headroom_pct": 5}},
     "targets[0].constraint.headroom_pct"),
    ({"constraint": {"kind": "latency_ms", "budget_of_max": 0}}, "targets[0].constraint.budget_of_max"),
    ({"constraint": {"kind": "latency_ms", "budget_of_max": 1.5}}, "targets[0].constraint.budget_of_max"),
    ({"constraint": {"kind": "latency_ms", "budget_of_max": "half"}},
     "targets[0].constraint.budget_of_max"),
    ({"constraint": {"kind": "latency_ms", "budget": 2, "budget_of_max": 0.5}},
     "targets[0].constraint.budget_of_max"),
    ({"constraint": {"kind": "macs", "budget_of_max": 0.5}}, "targets[0].constraint.budget_of_max"),
    ({"threads": 0}, "targets[0].threads"),
    ({"name": "Edge CPU"}, "targets[0].name"),
    ({"colour": "red"}, "targets[0].colour"),
    ({"placement": {"node_selector": {"zone": 3}}}, "targets[0].placement.node_selector"),
    ({"placement": {"tolerations": [{"kee": "x"}]}}, "targets[0].placement.tolerations[0]"),
])
def test_bad_target_names_the_field(override, field):
    with pytest.raises(UserError) as info:
        parse_targets(_one(**override), "t.yaml")
    assert info.value.field == field and info.value.source == "t.yaml" and info.value.fix


def test_headroom_lowers_what_the_search_plans_for_not_the_budget():
    t = parse_targets(_one(constraint={"kind": "latency_ms", "budget": 2.0, "headroom_pct": 5}))[0]
    assert t.constraint.budget == 2.0 and t.constraint.search_budget == pytest.approx(1.9)
    assert parse_targets({"targets": [t.to_dict()]})[0] == t  # round-trips through to_dict
    plain = parse_targets(_one())[0]
    assert plain.constraint.search_budget == 2.0 and "headroom_pct" not in plain.to_dict()["constraint"]


def test_budget_of_max_is_resolved_to_ms_and_recorded_so():
    t = parse_targets(_one(constraint={"kind": "latency_ms", "budget_of_max": 0.5, "headroom_pct": 10}))[0]
    assert t.constraint.budget is None and t.constraint.budget_of_max == 0.5
    with pytest.raises(UserError, match="not resolved") as info:
        t.constraint.search_budget  # noqa: B018 - a budget in ms needs the target's table
    assert info.value.field == "constraint.budget" and info.value.fix
    assert parse_targets({"targets": [t.to_dict()]})[0] == t  # the spec round-trips unresolved
    resolved = t.constraint.resolved(max_ms=0.8)
    assert resolved.budget == pytest.approx(0.4) and resolved.search_budget == pytest.approx(0.36)
    # search.json and the card record both; read back, the ms hold (a user's file may not give both)
    back = Target.from_dict({**t.to_dict(), "constraint": resolved.to_dict()})
    assert back.constraint == resolved
    assert parse_targets(_one())[0].constraint.resolved(0.8).budget == 2.0  # an ms budget stays


def test_duplicate_names():
    raw = _one()
    raw["targets"].append(dict(raw["targets"][0]))
    with pytest.raises(UserError, match="duplicate"):
        parse_targets(raw)


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("targets: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_targets(bad)
    with pytest.raises(UserError, match="not found"):
        load_targets(tmp_path / "nope.yaml")
    bad.write_text(yaml.safe_dump({"target": []}))
    with pytest.raises(UserError, match="targets"):
        load_targets(bad)
