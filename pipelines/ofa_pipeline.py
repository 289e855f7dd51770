"""The Once-for-All pipelines: train once, specialize for every target in parallel, report; and
specialize-only, from a supernet URI.

    dataset -> train-teacher -> shrink[kernel] -> ... -> shrink[width-2]    (the supernet)
    dataset -> train-scratch                  (one architecture alone: the savings baseline)
    supernet -> fit-accuracy-predictor
    for each target (dsl.ParallelFor):  placement -> profile-target -> search -> export -> stage-model
    after all targets -> report: reads the staged models by target name, publishes every model
                                 (card last), then the report

``build_pipeline(options)`` returns the pipeline function; everything that differs between a laptop
and a cluster (image, GPUs, S3 secret, resources, how many targets run at once) is an ``Options``
field, fixed at compile time, never read from the environment at import. The same function is
compiled to ``pipelines/onceforall.yaml`` (``ofa compile``) and run by ``ofa run`` through
``kfp.local``.

``build_specialize_pipeline(options)`` is the second entry (``pipelines/onceforall-specialize.yaml``,
``ofa compile --specialize``, ``ofa run --supernet URI``): open-supernet replaces the training
stages; everything from fit-accuracy-predictor on is the same code (``_specialize``). A second
compiled pipeline rather than a dsl.If branch of the first: one pipeline with optional training
would hand the later stages a supernet from one of two branches (dsl.OneOf, or an optional input
artifact), constructs that pipelines/fidelity.py does not check and the oldest backends of the
range predate; two pipelines from the same blocks use nothing the training pipeline does not
already use, and the training pipeline and its cache keys stay as they were.
"""

# No `from __future__ import annotations`: kfp reads the pipeline signature's types at runtime.

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from onceforall.infra.energy import DEFAULT_CARBON
from onceforall.training.launch import LAUNCH_ENV, Launch
from onceforall.stages import RUN_ID_ENV, SHRINK_PHASES
from onceforall.infra.store import SECRET_VARIABLES
from onceforall.specialization.targets import EXAMPLE_TARGETS, IMAGENET_TARGETS, load_targets, pipeline_items
from onceforall.training.trainjob import POD_NAME_ENV, POD_NAMESPACE_ENV, POD_UID_ENV

PIPELINE_NAME = "onceforall"
COMPILED = Path(__file__).with_name("onceforall.yaml")
SPECIALIZE_NAME = "onceforall-specialize"
COMPILED_SPECIALIZE = Path(__file__).with_name("onceforall-specialize.yaml")
# The Secret of manifests/base/s3-credentials.yaml; each key becomes the env var of the same name,
# which boto3's standard credential chain reads in every stage.
S3_SECRET_KEYS = SECRET_VARIABLES
# The pod label the KFP API server puts on every pod of a run (argo_template.go: SetPodMetadataLabels
# of util.LabelKeyWorkflowRunId, 2.5 to 2.17): the run's UUID.
RUN_ID_FIELD_PATH = "metadata.labels['pipeline/runid']"
# Tasks that only move a few files (placement, stage-model).
SMALL_CPU, SMALL_MEMORY = "500m", "1Gi"


@dataclass(frozen=True)
class Options:
    """Compile-time options. The defaults compile the committed YAML, which runs on every backend of
    ``backends.SUPPORTED`` (docs/deploy.md says which backend gets what)."""

    image: str = ""  # "" means components.DEFAULT_IMAGE
    # GPUs per training stage (teacher, shrink, scratch) and node, and of fit-accuracy-predictor
    # (which measures its subnets on all of them, one process each); 0: CPU only
    gpus: int = 0
    # GPUs of each target's search and export (their validation passes, BN recalibration and torch
    # test accuracy; latency is still the target's CPU's). Their pods run on the target's nodes
    # (placement), which must then have GPUs, so this is not implied by `gpus`.
    target_gpus: int = 0
    # Nodes per training stage: > 1 runs each as a Kubeflow Trainer TrainJob of this many nodes with
    # `gpus` GPUs each (onceforall/training/trainjob.py; the cluster needs the Trainer and manifests/base
    # RBAC)
    nodes: int = 1
    gpu_resource: str = "nvidia.com/gpu"
    # The S3 settings as environment variables from this Secret; every key of S3_SECRET_KEYS must
    # exist in it (an empty value counts as unset: onceforall.infra.store). Not `optional`: backends before
    # 2.15 drop that field, and a missing key then stalls the pod. "": no Secret (IRSA and the like).
    s3_secret: str = "ofa-s3-credentials"
    target_parallelism: int = 0  # targets in flight at once; 0: all
    train_cpu: str = "2"
    train_memory: str = "6Gi"
    # Profile, search and export measure latency: CPU limit = request in whole cores, so the pod is
    # in the Guaranteed QoS class and (with the kubelet's static CPU manager) gets cores of its own.
    stage_cpu: str = "2"
    stage_memory: str = "4Gi"
    retries: int = 2
    retry_backoff: str = "60s"
    # Every stage gets OFA_PUSHGATEWAY=this (the Service of manifests/base, same namespace); the
    # pipeline parameter `pushgateway`, when not empty, wins. "" sets no variable.
    pushgateway: str = "ofa-pushgateway:9091"
    # On a cluster every pod reads its run id from its `pipeline/runid` label (a field-path
    # environment variable, OFA_RUN_ID); kfp's local runner has no pods, so `ofa run` sets
    # OFA_RUN_ID in its own environment instead (False).
    run_id_from_pod: bool = True

    def with_(self, **changes) -> "Options":
        return dataclasses.replace(self, **changes)


def default_targets(path: Path = EXAMPLE_TARGETS) -> list[dict]:
    return pipeline_items(load_targets(path))


def _blocks(options: Options):
    """What both pipelines are built from: the components on the image, ``configure`` (name, cache,
    retries, resources, environment of a task) and ``place`` (a task on its target's nodes)."""
    from kfp import kubernetes as k8s

    from onceforall_components import DEFAULT_IMAGE, build

    c = build(options.image or DEFAULT_IMAGE)

    def configure(task, name: str, *, train: bool = False, measures: bool = False, small: bool = False,
                  cache: bool = True, gpus: int = 0):
        task.set_display_name(name)
        task.set_caching_options(cache)
        if options.retries:
            task.set_retry(num_retries=options.retries, backoff_duration=options.retry_backoff,
                           backoff_factor=2.0, backoff_max_duration="1800s")
        cpu, memory = ((options.train_cpu, options.train_memory) if train else
                       (SMALL_CPU, SMALL_MEMORY) if small else (options.stage_cpu, options.stage_memory))
        task.set_cpu_request(cpu)
        if measures:
            task.set_cpu_limit(cpu)
        task.set_memory_request(memory)
        task.set_memory_limit(memory)
        if train and options.nodes == 1:  # with nodes > 1 the TrainJob's pods hold them
            gpus = options.gpus
        if gpus:
            task.set_accelerator_type(options.gpu_resource)
            task.set_accelerator_limit(gpus)
        if train:
            launch_training(task)
        if options.pushgateway:
            task.set_env_variable("OFA_PUSHGATEWAY", options.pushgateway)
        if options.run_id_from_pod:
            k8s.use_field_path_as_env(task, env_name=RUN_ID_ENV, field_path=RUN_ID_FIELD_PATH)
        if options.s3_secret:
            k8s.use_secret_as_env(task, secret_name=options.s3_secret,
                                  secret_key_to_env={k: k for k in S3_SECRET_KEYS})
        return task

    def launch_training(task):
        # One rank per GPU (torchrun), or a TrainJob of `nodes` nodes that this pod launches and
        # follows (it then holds no GPU itself). Nothing is set for one process: the default YAML
        # stays as it was.
        if options.gpus <= 1 and options.nodes == 1:
            return
        launch = Launch(procs_per_node=max(options.gpus, 1), nodes=options.nodes,
                        gpus_per_node=options.gpus, image=options.image or DEFAULT_IMAGE,
                        gpu_resource=options.gpu_resource, cpu=options.train_cpu,
                        memory=options.train_memory, s3_secret=options.s3_secret)
        task.set_env_variable(LAUNCH_ENV, launch.to_json())
        if options.nodes > 1:  # the launching pod: the TrainJob's owner and namespace
            for env, field in ((POD_NAME_ENV, "metadata.name"), (POD_UID_ENV, "metadata.uid"),
                               (POD_NAMESPACE_ENV, "metadata.namespace")):
                k8s.use_field_path_as_env(task, env_name=env, field_path=field)

    def place(task, placement):
        # Latency is only true on the target's own hardware: its pods go to the target's nodes.
        k8s.add_node_selector_json(task, placement.outputs["node_selector"])
        k8s.add_toleration_json(task, placement.outputs["tolerations"])
        return task

    return c, configure, place


def _specialize(blocks, options: Options, *, targets, space, data, schedule, seed, predictor_subnets,
                supernet, run: dict):
    """The shared part after a supernet: fit-accuracy-predictor, then every target's branch
    (placement -> profile-target -> search -> export -> stage-model) in a dsl.ParallelFor.
    Returns the loop's last task, which the report runs after.

    ``space`` None: the supernet's own, read from its artifact by a small task inside the loop.
    Not a task output passed into the loop: kfp.local 2.17 hands a loop body the loop's item for
    an upstream task's output parameter (an artifact, or a parameter made inside the loop, comes
    through right)."""
    from kfp import dsl

    c, configure, place = blocks
    fit = configure(c.fit_accuracy_predictor(data=data, schedule=schedule, seed=seed,
                                             subnets=predictor_subnets, supernet=supernet, **run),
                    "fit-accuracy-predictor", gpus=options.gpus)
    with dsl.ParallelFor(targets, parallelism=options.target_parallelism) as target:
        placement = configure(c.placement(node_selector=target.node_selector,
                                          tolerations=target.tolerations), "placement", small=True)
        if space is None:
            space = configure(c.supernet_space(supernet=supernet), "supernet-space", small=True).output
        prof = place(configure(c.profile_target(target=target.spec, space=space, schedule=schedule,
                                                seed=seed, **run), "profile-target", measures=True),
                     placement)
        # A latency search measures its pick on the target's hardware before it settles.
        found = place(configure(c.search(target=target.spec, space=space, data=data, schedule=schedule,
                                         seed=seed, predictor=fit.outputs["predictor"],
                                         latency=prof.outputs["latency"], supernet=supernet, **run),
                                "search", measures=True, gpus=options.target_gpus), placement)
        # The card's measured latency is taken on the target's hardware too.
        exp = place(configure(c.export(target=target.spec, data=data, seed=seed, supernet=supernet,
                                       search=found.outputs["result"], **run), "export", measures=True,
                              gpus=options.target_gpus),
                    placement)
        # Never cached: it puts this run's copy of the (possibly cached) model where the report
        # reads it.
        staged = configure(c.stage_model(target=target.spec, model=exp.outputs["model"]), "stage-model",
                           small=True, cache=False)
    return staged


def build_pipeline(options: Options = Options()):
    """The pipeline function for ``options``: compile it, or call it under ``kfp.local``."""
    from kfp import dsl

    blocks = _blocks(options)
    c, configure, _ = blocks

    @dsl.pipeline(name=PIPELINE_NAME, description=(
        "Once-for-All: train one elastic supernet with progressive shrinking, then search, export "
        "and publish a specialized subnet for every hardware target."))
    def onceforall(data: str = "fashion-mnist", space: str = "fashion-mnist", schedule: str = "quick",
                   targets: list = default_targets(), publish_uri: str = "", seed: int = 0,
                   predictor_subnets: int = 0, carbon: str = DEFAULT_CARBON, pushgateway: str = ""):
        # every stage: carbon intensity and Pushgateway (the run id comes from the pod: Options)
        run = dict(carbon=carbon, pushgateway=pushgateway)
        teacher = configure(c.train_teacher(data=data, space=space, schedule=schedule, seed=seed, **run),
                            "train-teacher", train=True)
        supernet = teacher.outputs["teacher"]
        for phase in SHRINK_PHASES:
            task = configure(c.shrink(phase=phase, data=data, space=space, schedule=schedule, seed=seed,
                                      init=supernet, teacher=teacher.outputs["teacher"], **run),
                             f"shrink-{phase}", train=True)
            supernet = task.outputs["supernet"]
        # the baseline of the report's savings: one architecture trained alone, metered the same way
        scratch = configure(c.train_scratch(data=data, space=space, schedule=schedule, seed=seed, **run),
                            "train-scratch", train=True)
        staged = _specialize(blocks, options, targets=targets, space=space, data=data, schedule=schedule,
                             seed=seed, predictor_subnets=predictor_subnets, supernet=supernet, run=run)
        report = configure(c.report(publish_uri=publish_uri, targets=targets,
                                    scratch=scratch.outputs["model"], **run), "report", cache=False)
        report.after(staged)

    return onceforall


def build_specialize_pipeline(options: Options = Options()):
    """The specialize-only pipeline: a supernet checkpoint folder (a URI, e.g. MIT's published
    supernet after ``ofa import-official``) instead of training, then the same stages as
    :func:`build_pipeline` after its supernet, and a report without a from-scratch baseline."""
    from kfp import dsl

    blocks = _blocks(options)
    c, configure, _ = blocks

    @dsl.pipeline(name=SPECIALIZE_NAME, description=(
        "Once-for-All, specialize only: take a trained supernet from a URI, then search, export and "
        "publish a specialized subnet for every hardware target."))
    def onceforall_specialize(supernet: str, data: str, schedule: str = "quick",
                              targets: list = default_targets(IMAGENET_TARGETS), publish_uri: str = "",
                              seed: int = 0, predictor_subnets: int = 0, carbon: str = DEFAULT_CARBON,
                              pushgateway: str = ""):
        run = dict(carbon=carbon, pushgateway=pushgateway)
        # the URI is its cache key: publish a changed supernet under a new URI
        opened = configure(c.open_supernet(uri=supernet, **run), "open-supernet")
        staged = _specialize(blocks, options, targets=targets, space=None, data=data,
                             schedule=schedule, seed=seed, predictor_subnets=predictor_subnets,
                             supernet=opened.outputs["supernet"], run=run)
        report = configure(c.report_specialized(publish_uri=publish_uri, targets=targets, **run), "report",
                           cache=False)
        report.after(staged)

    return onceforall_specialize


def compile_pipeline(path: str | Path = COMPILED, options: Options = Options(), *,
                     specialize: bool = False) -> Path:
    """Compile the training pipeline (or with ``specialize`` the specialize-only one) to ``path``,
    and check it against every supported backend's rules."""
    from kfp import compiler

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    build = build_specialize_pipeline if specialize else build_pipeline
    compiler.Compiler().compile(build(options), str(path))
    # The header comment lists parameter defaults; kfp prints dict-valued ones in protobuf's map order,
    # which changes from process to process. Point to the spec instead, so the file is reproducible.
    text = re.sub(r"^(#\s+\w+: (?:list|dict)) \[Default: .*\]$",
                  r"\1 [Default: see root.inputDefinitions]", path.read_text(), flags=re.M)
    path.write_text(text)
    from .fidelity import RULES, check, load

    problems = [str(i) for v in RULES for i in check(load(path), RULES[v]) if i.severity == "error"]
    if problems:
        raise ValueError("the compiled pipeline would not run on every supported KFP backend:\n  "
                         + "\n  ".join(problems))
    return path
