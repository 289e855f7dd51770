"""Hold a compiled pipeline to the rules of the KFP backend's driver, version by version.

kfp's local runner ignores what a cluster's backend does with a compiled pipeline: how its driver
resolves each task's inputs, a ParallelFor's items, the runtime placeholders and the Kubernetes
platform fields, which fields an older backend silently drops, and what enters its cache key. This
module walks the compiled IR with kfp's own protobuf classes and resolves every one of them the way
the driver of each supported backend does (kubeflow/pipelines, backend/src/v2/driver/; the function
each rule follows is named beside it), so that a pipeline that cannot start on a cluster fails a
test here instead.

    problems = check(load("pipelines/onceforall.yaml"), RULES["2.5.0"])   # [] when it runs there

A problem is an ``Issue(version, where, what)``; ``severity`` "error" means the task cannot start or
the backend does something other than what the pipeline says; "degraded" means the backend ignores
a setting (retries inside a ParallelFor) and docs/deploy.md says what that costs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

PLACEHOLDER = re.compile(r"\{\{\$\.[a-z_]+\}\}")
# Placeholders whose value changes from run to run: in a task's parameters they change its cache key
# (backend/src/v2/cacheutils/cache.go GenerateCacheKey hashes every input parameter value).
PER_RUN = frozenset({"{{$.pipeline_job_name}}", "{{$.pipeline_job_resource_name}}", "{{$.pipeline_job_uuid}}",
                     "{{$.pipeline_task_uuid}}", "{{$.pipeline_job_create_time_utc}}",
                     "{{$.pipeline_job_schedule_time_utc}}"})


@dataclass(frozen=True)
class Rules:
    """What one backend version's driver and compiler do with a compiled pipeline."""

    version: str
    # resolveInputParameter, RuntimeValue constants (2.5.0 driver.go; 2.17.0 resolve.go): the
    # placeholders it substitutes; any other `{{$.…}}` string reaches the component as it is.
    placeholders: frozenset[str]
    # resolveUpstreamParameters / resolveUpstreamArtifacts: a ParallelFor's outputs (dsl.Collected)
    # for a task after the loop. 2.5.0's getDAGTasks skips ParallelFor DAGs ("should be handled with
    # dsl.Collected", unimplemented); from 2.14 (kubeflow/pipelines#11725).
    fan_in: bool
    # extendPodSpecPatch (2.5.0 driver.go) / k8s.go (2.17.0): secretAsEnv.optional is read from 2.15;
    # older backends drop the field, so a Secret without the key stalls the pod.
    secret_env_optional: bool
    # argocompiler: retryPolicy of tasks inside a ParallelFor. Nested DAGs get retries from 2.14
    # (#11908); a ParallelFor's iterations only after 2.17.0 (975015c75f, not in any release yet).
    loop_retries: bool
    # the platform fields (KubernetesExecutorConfig) its driver reads; others are dropped
    platform_fields: frozenset[str] = field(default_factory=frozenset)


_BASE_PLACEHOLDERS = frozenset({"{{$.pipeline_job_name}}", "{{$.pipeline_job_resource_name}}",
                                "{{$.pipeline_job_uuid}}", "{{$.pipeline_task_name}}",
                                "{{$.pipeline_task_uuid}}"})
# extendPodSpecPatch at 2.5.0 reads these (driver.go: GetPvcMount ... GetActiveDeadlineSeconds)
_FIELDS_25 = frozenset({"pvcMount", "imagePullPolicy", "nodeSelector", "tolerations", "secretAsVolume",
                        "secretAsEnv", "configMapAsVolume", "configMapAsEnv", "imagePullSecret",
                        "fieldPathAsEnv", "activeDeadlineSeconds", "nodeAffinity", "podMetadata",
                        "genericEphemeralVolume", "enabledSharedMemory", "emptyDirMounts"})

RULES = {
    "2.5.0": Rules("2.5.0", _BASE_PLACEHOLDERS, fan_in=False, secret_env_optional=False, loop_retries=False,
                   platform_fields=_FIELDS_25),
    "2.17.0": Rules("2.17.0", _BASE_PLACEHOLDERS | {"{{$.pipeline_job_create_time_utc}}",
                                                    "{{$.pipeline_job_schedule_time_utc}}"},
                    fan_in=True, secret_env_optional=True, loop_retries=False,
                    platform_fields=_FIELDS_25 | {"podAffinity", "securityContext"}),
}


@dataclass(frozen=True)
class Issue:
    version: str
    where: str
    what: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"[KFP {self.version}] {self.where}: {self.what}"


@dataclass
class Compiled:
    spec: Any  # pipeline_spec_pb2.PipelineSpec
    platform: Any  # kubernetes_executor_config_pb2 per executor label: {label: KubernetesExecutorConfig}
    raw_platform: dict[str, dict]  # the same as JSON, with the fields a newer SDK wrote


def load(path: str | Path) -> Compiled:
    """A compiled pipeline YAML as kfp's protobuf messages (unknown fields are an error)."""
    import yaml
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2
    from kfp.pipeline_spec import pipeline_spec_pb2

    docs = list(yaml.safe_load_all(Path(path).read_text()))
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    raw = (docs[1] if len(docs) > 1 else {}).get("platforms", {}).get("kubernetes", {})
    raw = raw.get("deploymentSpec", {}).get("executors", {})
    platform = {label: json_format.ParseDict(cfg, k8s_pb2.KubernetesExecutorConfig())
                for label, cfg in raw.items()}
    return Compiled(spec, platform, raw)


@dataclass
class _Dag:
    """A DAG as its driver sees it: the parameters and artifacts its execution has."""

    name: str
    component: Any
    parameters: set[str]
    artifacts: set[str]
    in_loop: bool


def _dags(spec) -> Iterator[tuple[_Dag, Any]]:
    """Every DAG with the parameters its execution holds (the DAG driver's resolveInputs of the task that
    starts it; for a ParallelFor iteration, the loop task's inputs less the items plus the item)."""
    root = _Dag("root", spec.root, set(spec.root.input_definitions.parameters),
                set(spec.root.input_definitions.artifacts), False)
    todo = [root]
    while todo:
        dag = todo.pop()
        yield dag, dag.component.dag
        for name, task in dag.component.dag.tasks.items():
            comp = spec.components[task.component_ref.name]
            if not comp.HasField("dag"):
                continue
            params = set(task.inputs.parameters)
            loop = task.HasField("parameter_iterator")
            if loop:
                params.discard(task.parameter_iterator.items.input_parameter)
                params.add(task.parameter_iterator.item_input)
            todo.append(_Dag(f"{dag.name}/{name}", comp, params, set(task.inputs.artifacts),
                             dag.in_loop or loop))


def check(compiled: Compiled, rules: Rules) -> list[Issue]:
    """Every problem the backend of ``rules`` would have with the pipeline."""
    spec, issues = compiled.spec, []

    def issue(where: str, what: str, severity: str = "error") -> None:
        issues.append(Issue(rules.version, where, what, severity))

    for dag, body in _dags(spec):
        for name, task in body.tasks.items():
            where = f"{dag.name}/{name}"
            comp = spec.components[task.component_ref.name]
            for pname, pspec in task.inputs.parameters.items():
                _check_parameter(pspec, dag, body, spec, rules, f"{where} input {pname}", issue)
            for aname, aspec in task.inputs.artifacts.items():
                _check_artifact(aspec, dag, body, spec, rules, f"{where} input {aname}", issue)
            if task.HasField("parameter_iterator"):
                items = task.parameter_iterator.items.input_parameter
                if items and items not in task.inputs.parameters:
                    issue(where, f"the loop's items {items} are not among the loop task's inputs")
            if dag.in_loop and task.HasField("retry_policy") and not rules.loop_retries:
                issue(where, "retries of a task inside a ParallelFor are not applied", "degraded")
            if comp.executor_label:
                _check_platform(compiled, comp.executor_label, dag, body, spec, rules, where, issue)
                if task.caching_options.enable_cache:
                    _check_cache_key(task, where, issue)
    return issues


def _check_parameter(pspec, dag: _Dag, body, spec, rules: Rules, where: str, issue, *,
                     selector_ok: bool = True) -> None:
    """resolveInputParameter (2.5.0 driver.go, 2.17.0 resolve.go)."""
    kind = pspec.WhichOneof("kind")
    if kind == "component_input_parameter":
        if pspec.component_input_parameter not in dag.parameters:
            issue(where, f"parent DAG does not have input parameter {pspec.component_input_parameter}")
    elif kind == "task_output_parameter":
        out = pspec.task_output_parameter
        _check_producer(out.producer_task, out.output_parameter_key, "parameters", body, spec, rules, where,
                        issue)
    elif kind == "runtime_value":
        value = pspec.runtime_value.constant
        text = value.string_value if value.WhichOneof("kind") == "string_value" else ""
        for placeholder in PLACEHOLDER.findall(text):
            if text != placeholder or placeholder not in rules.placeholders:
                issue(where, f"{text!r} is not substituted by this backend: the component gets it as it is")
    if pspec.parameter_expression_selector and not selector_ok:
        issue(where, f"parameterExpressionSelector {pspec.parameter_expression_selector!r} is ignored here: "
                     "the platform field gets the whole value (resolveK8sJsonParameter)")


def _check_artifact(aspec, dag: _Dag, body, spec, rules: Rules, where: str, issue) -> None:
    """resolveInputArtifact (2.5.0 driver.go, 2.17.0 resolve.go)."""
    kind = aspec.WhichOneof("kind")
    if kind == "component_input_artifact" and aspec.component_input_artifact not in dag.artifacts:
        issue(where, f"parent DAG does not have input artifact {aspec.component_input_artifact}")
    elif kind == "task_output_artifact":
        out = aspec.task_output_artifact
        _check_producer(out.producer_task, out.output_artifact_key, "artifacts", body, spec, rules, where,
                        issue)


def _check_producer(producer: str, key: str, what: str, body, spec, rules: Rules, where: str, issue) -> None:
    """resolveUpstreamParameters / resolveUpstreamArtifacts: the producer is a task of the same DAG
    (getDAGTasks), and a ParallelFor's outputs need fan-in support."""
    if producer not in body.tasks:
        issue(where, f"producer task {producer} is not in this DAG")
        return
    task = body.tasks[producer]
    comp = spec.components[task.component_ref.name]
    outputs = getattr(comp.output_definitions, what)
    if key not in outputs:
        issue(where, f"{producer} has no output {what[:-1]} {key}")
    if task.HasField("parameter_iterator") and not rules.fan_in:
        issue(where, f"collects the outputs of the ParallelFor {producer} (dsl.Collected), which needs "
                     "KFP 2.14")


def _check_platform(compiled: Compiled, label: str, dag: _Dag, body, spec, rules: Rules, where: str,
                    issue) -> None:
    """extendPodSpecPatch (2.5.0 driver.go; 2.17.0 k8s.go): each platform input parameter goes through
    resolveInputParameter in the task's parent DAG, without a parameterExpressionSelector."""
    if label not in compiled.platform:
        return
    cfg, raw = compiled.platform[label], compiled.raw_platform[label]
    for fname in raw:
        if fname not in rules.platform_fields:
            issue(where, f"platform field {fname} is not read by this backend and is dropped")
    inputs = []
    if cfg.node_selector.HasField("node_selector_json"):
        inputs.append(("nodeSelectorJson", cfg.node_selector.node_selector_json))
    inputs += [("tolerationJson", t.toleration_json) for t in cfg.tolerations
               if t.HasField("toleration_json")]
    for env in cfg.secret_as_env:
        if env.HasField("secret_name_parameter"):
            inputs.append(("secretNameParameter", env.secret_name_parameter))
        if env.HasField("optional") and env.optional and not rules.secret_env_optional:
            issue(where, f"secretAsEnv.optional of Secret {env.secret_name} is dropped: a key missing "
                         "from the Secret stalls the pod in CreateContainerConfigError")
    for fname, pspec in inputs:
        _check_parameter(pspec, dag, body, spec, rules, f"{where} {fname}", issue, selector_ok=False)


def _check_cache_key(task, where: str, issue) -> None:
    """cacheutils GenerateCacheKey hashes every input parameter value: a per-run one means the task is
    never reused by another run."""
    for pname, pspec in task.inputs.parameters.items():
        if pspec.WhichOneof("kind") == "runtime_value":
            text = pspec.runtime_value.constant.string_value
            if any(p in text for p in PER_RUN):
                issue(where, f"input {pname} = {text!r} changes every run, so the cached task is never "
                             "reused")


def check_all(path: str | Path, versions=None) -> list[Issue]:
    compiled = load(path)
    return [i for v in (versions or RULES) for i in check(compiled, RULES[v])]
