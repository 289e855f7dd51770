"""The Once-for-All pipeline: train once, specialize for every target in parallel, report.

    dataset -> train-teacher -> shrink[kernel] -> ... -> shrink[width-2]    (the supernet)
    dataset -> train-scratch                  (one architecture alone: the savings baseline)
    supernet -> fit-accuracy-predictor
    for each target (dsl.ParallelFor):  profile-target -> search -> export (published)
    all targets (dsl.Collected) -> report: publishes every model (card last), then the report

``build_pipeline(options)`` returns the pipeline function; everything that differs between a laptop
and a cluster (image, GPUs, S3 secret, resources, how many targets run at once) is an ``Options``
field, fixed at compile time, never read from the environment at import. The same function is
compiled to ``pipelines/onceforall.yaml`` (``ofa compile``) and run by ``ofa run`` through
``kfp.local``.
"""

# No `from __future__ import annotations`: kfp reads the pipeline signature's types at runtime.

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from onceforall.energy import DEFAULT_CARBON
from onceforall.stages import SHRINK_PHASES
from onceforall.targets import EXAMPLE_TARGETS, load_targets, pipeline_items

PIPELINE_NAME = "onceforall"
COMPILED = Path(__file__).with_name("onceforall.yaml")
# The Secret of manifests/base/s3-credentials.yaml; each key becomes the env var of the same name,
# which boto3's standard credential chain reads in every stage.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")


@dataclass(frozen=True)
class Options:
    """Compile-time options. The defaults compile the committed YAML."""

    image: str = ""  # "" means components.DEFAULT_IMAGE
    gpus: int = 0  # GPUs per training stage (teacher, shrink); 0: CPU only
    gpu_resource: str = "nvidia.com/gpu"
    s3_secret: str = "ofa-s3-credentials"  # "" to run without (e.g. IRSA / workload identity)
    target_parallelism: int = 0  # targets in flight at once; 0: all
    train_cpu: str = "2"
    train_memory: str = "6Gi"
    stage_cpu: str = "2"
    stage_memory: str = "4Gi"
    retries: int = 2
    retry_backoff: str = "60s"
    # Every stage gets OFA_PUSHGATEWAY=this (the Service of manifests/base, same namespace); the
    # pipeline parameter `pushgateway`, when not empty, wins. "" sets no variable.
    pushgateway: str = "ofa-pushgateway:9091"
    # The run_id label of every metric: the run's UUID on a cluster, the value the `pipeline/runid`
    # pod label carries (docs/energy.md joins Kepler's pod energy on it). kfp's local runner draws a
    # fresh UUID per task, so local runs use the run name instead ("name").
    run_id: str = "uuid"

    def with_(self, **changes) -> "Options":
        return dataclasses.replace(self, **changes)


def default_targets() -> list[dict]:
    return pipeline_items(load_targets(EXAMPLE_TARGETS))


def build_pipeline(options: Options = Options()):
    """The pipeline function for ``options``: compile it, or call it under ``kfp.local``."""
    from kfp import dsl
    from kfp import kubernetes as k8s

    from onceforall_components import DEFAULT_IMAGE, build

    c = build(options.image or DEFAULT_IMAGE)

    def configure(task, name: str, *, train: bool = False):
        task.set_display_name(name)
        task.set_caching_options(True)
        if options.retries:
            task.set_retry(num_retries=options.retries, backoff_duration=options.retry_backoff,
                           backoff_factor=2.0, backoff_max_duration="1800s")
        task.set_cpu_request(options.train_cpu if train else options.stage_cpu)
        task.set_memory_request(options.train_memory if train else options.stage_memory)
        task.set_memory_limit(options.train_memory if train else options.stage_memory)
        if train and options.gpus:
            task.set_accelerator_type(options.gpu_resource)
            task.set_accelerator_limit(options.gpus)
        if options.pushgateway:
            task.set_env_variable("OFA_PUSHGATEWAY", options.pushgateway)
        if options.s3_secret:
            k8s.use_secret_as_env(task, secret_name=options.s3_secret,
                                  secret_key_to_env={k: k for k in S3_SECRET_KEYS}, optional=True)
        return task

    @dsl.pipeline(name=PIPELINE_NAME, description=(
        "Once-for-All: train one elastic supernet with progressive shrinking, then search, export "
        "and publish a specialized subnet for every hardware target."))
    def onceforall(data: str = "fashion-mnist", space: str = "fashion-mnist", schedule: str = "quick",
                   targets: list = default_targets(), publish_uri: str = "", seed: int = 0,
                   predictor_subnets: int = 0, carbon: str = DEFAULT_CARBON, pushgateway: str = ""):
        # every stage: the run id (metric labels), carbon intensity and Pushgateway
        run = dict(run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER if options.run_id == "uuid"
                   else dsl.PIPELINE_JOB_NAME_PLACEHOLDER, carbon=carbon, pushgateway=pushgateway)
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
        fit = configure(c.fit_accuracy_predictor(data=data, schedule=schedule, seed=seed,
                                                 subnets=predictor_subnets, supernet=supernet, **run),
                        "fit-accuracy-predictor")

        with dsl.ParallelFor(targets, parallelism=options.target_parallelism) as target:
            prof = configure(c.profile_target(target=target.spec, space=space, schedule=schedule, seed=seed,
                                              **run),
                             "profile-target")
            # Latency tables are only true on the target's own hardware: place the pod there.
            k8s.add_node_selector_json(prof, target.node_selector)
            k8s.add_toleration_json(prof, target.tolerations)
            found = configure(c.search(target=target.spec, space=space, data=data, schedule=schedule,
                                       seed=seed,
                                       predictor=fit.outputs["predictor"],
                                       latency=prof.outputs["latency"], supernet=supernet, **run),
                              "search")
            # A latency search measures its pick on the target's hardware before it settles.
            k8s.add_node_selector_json(found, target.node_selector)
            k8s.add_toleration_json(found, target.tolerations)
            exp = configure(c.export(target=target.spec, data=data, seed=seed, supernet=supernet,
                                     search=found.outputs["result"], **run), "export")
            # The card's measured latency is taken on the target's hardware too.
            k8s.add_node_selector_json(exp, target.node_selector)
            k8s.add_toleration_json(exp, target.tolerations)

        configure(c.report(publish_uri=publish_uri, models=dsl.Collected(exp.outputs["model"]),
                           scratch=scratch.outputs["model"], **run), "report")

    return onceforall


def compile_pipeline(path: str | Path = COMPILED, options: Options = Options()) -> Path:
    from kfp import compiler

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(options), str(path))
    # The header comment lists parameter defaults; kfp prints dict-valued ones in protobuf's map order,
    # which changes from process to process. Point to the spec instead, so the file is reproducible.
    text = re.sub(r"^(#\s+\w+: (?:list|dict)) \[Default: .*\]$",
                  r"\1 [Default: see root.inputDefinitions]", path.read_text(), flags=re.M)
    path.write_text(text)
    return path
