"""The compiled pipeline against the KFP backend driver's own rules, for every supported version.

tests/fixtures/onceforall-3643940.yaml is the pipeline as committed before it was made to run on a
cluster: the checker must find what kept it from starting there, or it proves nothing.
"""

from pathlib import Path

import pytest

from onceforall_pipelines.fidelity import PER_RUN, RULES, check, load
from onceforall_pipelines.ofa_pipeline import COMPILED, COMPILED_SPECIALIZE, Options, compile_pipeline

OLD = Path(__file__).parent / "fixtures" / "onceforall-3643940.yaml"


def errors(path, version):
    return [str(i) for i in check(load(path), RULES[version]) if i.severity == "error"]


@pytest.mark.parametrize("compiled", [COMPILED, COMPILED_SPECIALIZE], ids=["train", "specialize"])
@pytest.mark.parametrize("version", sorted(RULES))
def test_committed_pipeline_runs_on_every_supported_backend(version, compiled):
    assert errors(compiled, version) == []


@pytest.mark.parametrize("specialize", [False, True], ids=["train", "specialize"])
@pytest.mark.parametrize("options", [Options(gpus=8, target_gpus=1, image="reg/x:1"),
                                     Options(nodes=2, gpus=8, image="reg/x:1"),
                                     Options(s3_secret="", pushgateway=""),
                                     Options(target_parallelism=2, retries=0)])
@pytest.mark.parametrize("version", sorted(RULES))
def test_compile_options_keep_it_runnable(tmp_path, options, version, specialize):
    path = compile_pipeline(tmp_path / "p.yaml", options, specialize=specialize)
    assert errors(path, version) == []


def test_supported_range_is_the_rules_range():
    from onceforall_pipelines.backends import MAX_BACKEND, MIN_BACKEND

    versions = sorted(tuple(map(int, v.split("."))) for v in RULES)
    assert versions[0] == MIN_BACKEND and versions[-1][:2] == MAX_BACKEND


def test_old_pipeline_fails_where_it_failed_on_clusters():
    old25, old217 = errors(OLD, "2.5.0"), errors(OLD, "2.17.0")
    for found in (old25, old217):
        # the loop's placement read a field of the loop item: the driver has no such parameter
        assert any("profile-target nodeSelectorJson: parent DAG does not have input parameter "
                   "targets-loop-item-subvar-node_selector" in e for e in found)
        assert any("tolerationJson: parent DAG does not have input parameter" in e for e in found)
        # the run id as a parameter: no stage is ever reused by another run
        assert any("train-teacher: input run_id = '{{$.pipeline_job_uuid}}'" in e for e in found)
    # dsl.Collected of artifacts and secretAsEnv.optional are newer than 2.5
    assert any("report input models: collects the outputs of the ParallelFor" in e for e in old25)
    assert any("secretAsEnv.optional" in e for e in old25)
    assert not any("collects the outputs" in e or "optional" in e for e in old217)


@pytest.mark.parametrize("compiled", [COMPILED, COMPILED_SPECIALIZE], ids=["train", "specialize"])
def test_training_stages_cache_across_runs(compiled):
    """Nothing per run and nothing about the targets reaches a shared stage's cache key."""
    spec = load(compiled).spec
    for name, task in spec.root.dag.tasks.items():
        if not name.startswith(("train-", "shrink", "fit-accuracy-predictor", "open-supernet")):
            continue
        assert task.caching_options.enable_cache, name
        for pname, p in task.inputs.parameters.items():
            assert p.component_input_parameter != "targets", name
            assert not any(r in p.runtime_value.constant.string_value for r in PER_RUN), (name, pname)


def test_checker_sees_each_rule(tmp_path):
    """One deliberate breach per rule, so that no rule passes by being blind."""
    from kfp import compiler, dsl
    from kfp import kubernetes as k8s

    @dsl.component(base_image="python:3.11")
    def make(x: str) -> str:
        return x

    @dsl.component(base_image="python:3.11")
    def take(xs: list) -> str:
        return str(xs)

    @dsl.pipeline(name="breaches")
    def breaches(items: list = [{"a": "1", "sel": {"k": "v"}}]):  # noqa: B006 (kfp default)
        with dsl.ParallelFor(items) as item:
            t = make(x=dsl.PIPELINE_TASK_ID_PLACEHOLDER)
            k8s.add_node_selector_json(t, item.sel)
            k8s.use_secret_as_env(t, secret_name="s", secret_key_to_env={"K": "K"}, optional=True)
            t.set_retry(1)
        take(xs=dsl.Collected(t.output)).set_caching_options(True)

    path = tmp_path / "b.yaml"
    compiler.Compiler().compile(breaches, str(path))
    found25 = [str(i) for i in check(load(path), RULES["2.5.0"])]
    assert any("parent DAG does not have input parameter items-loop-item-subvar-sel" in e for e in found25)
    assert any("optional" in e for e in found25)
    assert any("collects the outputs of the ParallelFor" in e for e in found25)
    assert any("retries of a task inside a ParallelFor" in e for e in found25)
    assert any("changes every run" in e for e in found25)


def test_training_stages_get_their_launch_compiled_in(tmp_path):
    """--gpus 8: one pod, eight ranks; --nodes 2 --gpus 8: a launching pod without GPUs, which
    creates a TrainJob of two 8-GPU nodes (owner: that pod, from the downward API)."""
    import json

    import yaml

    def training(options):
        docs = list(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", options).read_text()))
        executors, platform = docs[0]["deploymentSpec"]["executors"], docs[1]["platforms"]["kubernetes"]
        for name in ("exec-train-teacher", "exec-shrink", "exec-train-scratch"):
            container = executors[name]["container"]
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            pod = platform["deploymentSpec"]["executors"][name]
            fields = {e["name"] for e in pod.get("fieldPathAsEnv", [])}
            yield json.loads(env.get("OFA_LAUNCH", "{}")), container.get("resources", {}), fields

    for launch, resources, fields in training(Options(gpus=8, image="reg/x:1")):
        assert (launch["procs_per_node"], launch["nodes"]) == (8, 1)
        assert resources["accelerator"]["count"] == "8"
    for launch, resources, fields in training(Options(nodes=2, gpus=8, image="reg/x:1")):
        assert (launch["procs_per_node"], launch["nodes"], launch["gpus_per_node"]) == (8, 2, 8)
        assert launch["image"] == "reg/x:1" and "accelerator" not in resources
        assert {"OFA_POD_NAME", "OFA_POD_UID", "OFA_POD_NAMESPACE"} <= fields
    assert all(launch == {} for launch, _, _ in training(Options()))


@pytest.mark.parametrize("specialize", [False, True], ids=["train", "specialize"])
def test_gpus_go_where_they_pay(tmp_path, specialize):
    """--gpus: fit-accuracy-predictor measures on all of them, also when training spans nodes;
    --target-gpus: each target's search and export get that many (never implied: they run on the
    target's nodes); profile-target measures latency on the target's CPU and gets none."""
    import yaml

    def accelerators(options):
        path = compile_pipeline(tmp_path / "p.yaml", options, specialize=specialize)
        executors = yaml.safe_load_all(path.read_text()).__next__()["deploymentSpec"]["executors"]
        return {name.removeprefix("exec-"): ex["container"].get("resources", {}).get("accelerator", {})
                .get("count") for name, ex in executors.items()}

    for nodes in (1, 2):
        got = accelerators(Options(nodes=nodes, gpus=8, image="reg/x:1"))
        assert got["fit-accuracy-predictor"] == "8"
        assert got["search"] is got["export"] is got["profile-target"] is None
    got = accelerators(Options(gpus=8, target_gpus=1, image="reg/x:1"))
    assert got["search"] == got["export"] == "1" and got["profile-target"] is None
    assert set(accelerators(Options()).values()) == {None}
