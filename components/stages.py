"""One KFP component per stage. Each body imports the library and calls one stage function.

These are plain functions; ``build(image)`` turns them into lightweight ``@dsl.component``s on the
project's image (the image is a compile-time option, so the decorator is applied there). Bodies
must be self-contained: KFP ships each function's source into its container on its own.
Directories are fine as artifact outputs: the launcher uploads them recursively.
"""


from typing import NamedTuple

from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def train_teacher(data: str, space: str, schedule: str, seed: int, carbon: str,
                  pushgateway: str, teacher: Output[Model], metrics: Output[Metrics]):
    """Train the full network (the teacher)."""
    from onceforall import stages

    run = stages.RunContext.from_env(carbon, pushgateway)
    # mid-phase checkpoints next to the output, which a retried pod of this task gets again
    # the processes and nodes it trains on: compiled in (ofa compile --gpus/--nodes), one by default
    record = stages.train_teacher(teacher.path, data=data, space=space, schedule=schedule, seed=seed,
                                  run=run, checkpoint_uri=stages.checkpoint_uri_for(teacher.uri),
                                  launch=stages.Launch.from_env())
    stages.log_metrics(record, metrics)


def train_scratch(data: str, space: str, schedule: str, seed: int, carbon: str,
                  pushgateway: str, model: Output[Model], metrics: Output[Metrics]):
    """Train one architecture alone from scratch: the cost OFA is compared with in the report."""
    from onceforall import stages

    run = stages.RunContext.from_env(carbon, pushgateway)
    record = stages.train_scratch(model.path, data=data, space=space, schedule=schedule, seed=seed,
                                  run=run, checkpoint_uri=stages.checkpoint_uri_for(model.uri),
                                  launch=stages.Launch.from_env())
    stages.log_metrics(record, metrics)


def shrink(phase: str, data: str, space: str, schedule: str, seed: int, carbon: str,
           pushgateway: str, init: Input[Model], teacher: Input[Model], supernet: Output[Model],
           metrics: Output[Metrics]):
    """One progressive-shrinking phase (kernel, depth-1, depth-2, width-1 or width-2)."""
    from onceforall import stages

    run = stages.RunContext.from_env(carbon, pushgateway)
    record = stages.shrink(phase, supernet.path, init_dir=init.path, teacher_dir=teacher.path,
                           data=data, space=space, schedule=schedule, seed=seed, run=run,
                           checkpoint_uri=stages.checkpoint_uri_for(supernet.uri),
                           launch=stages.Launch.from_env())
    stages.log_metrics(record, metrics)


def open_supernet(uri: str, carbon: str, pushgateway: str, supernet: Output[Model],
                  metrics: Output[Metrics]):
    """A supernet checkpoint folder from a URI (a folder or s3://), copied and verified."""
    from onceforall import stages

    run = stages.RunContext.from_env(carbon, pushgateway)
    record = stages.open_supernet(uri, supernet.path, run=run)
    stages.log_metrics(record, metrics)


def supernet_space(supernet: Input[Model]) -> str:
    """The supernet's search space as ``json:{...}``, the ``space`` of the stages that need one."""
    from onceforall import stages

    return stages.supernet_space(supernet.path).to_spec()


def fit_accuracy_predictor(data: str, schedule: str, seed: int, subnets: int, carbon: str,
                           pushgateway: str, supernet: Input[Model], predictor: Output[Model],
                           accuracy_data: Output[Dataset], metrics: Output[Metrics]):
    """Measure subnets on the validation split, then fit and judge the accuracy predictor."""
    import shutil

    from onceforall import stages

    run = stages.RunContext.from_env(carbon, pushgateway)
    record = stages.fit_accuracy_predictor(supernet.path, predictor.path, data=data, schedule=schedule,
                                           n=subnets, seed=seed, run=run)
    shutil.copyfile(f"{predictor.path}/accuracy.jsonl", accuracy_data.path)
    stages.log_metrics(record, metrics)


def profile_target(target: dict, space: str, seed: int, carbon: str, pushgateway: str,
                   latency: Output[Dataset], metrics: Output[Metrics], schedule: str = "quick"):
    """Measure the target's latency table on the node this pod runs on, as thoroughly as the
    schedule says."""
    from onceforall import stages

    run = stages.RunContext.from_env(carbon, pushgateway)
    record = stages.profile(target, latency.path, space=space, schedule=schedule, seed=seed, run=run)
    stages.log_metrics(record, metrics)


def search(target: dict, space: str, data: str, schedule: str, seed: int, carbon: str,
           pushgateway: str,
           predictor: Input[Model], latency: Input[Dataset], supernet: Input[Model],
           result: Output[Dataset], pareto: Output[HTML], metrics: Output[Metrics]):
    """Evolutionary search for the target's best subnet, with validation feedback from the
    supernet; the Pareto front as HTML for the UI."""
    import shutil

    from onceforall import stages

    run = stages.RunContext.from_env(carbon, pushgateway)
    record = stages.search(target, predictor.path, latency.path, result.path, space=space, seed=seed,
                           supernet_dir=supernet.path, data=data, schedule=schedule, run=run)
    shutil.copyfile(f"{result.path}/pareto.html", pareto.path)
    stages.log_metrics(record, metrics)


def export(target: dict, data: str, seed: int, carbon: str, pushgateway: str,
           supernet: Input[Model], search: Input[Dataset], model: Output[Model], card: Output[Markdown],
           metrics: Output[Metrics]):
    """Extract, recalibrate, verify and export the searched subnet: model.onnx + model card."""
    import json

    from onceforall import stages

    run = stages.RunContext.from_env(carbon, pushgateway)
    record = stages.export(target, supernet.path, search.path, model.path, data=data, seed=seed, run=run)
    text = open(f"{model.path}/model_card.json").read()
    with open(card.path, "w") as f:
        f.write(f"# Model card: {json.loads(text)['target']['name']}\n\n```json\n{text}\n```\n")
    stages.log_metrics(record, metrics)


def placement(node_selector: dict, tolerations: list) -> NamedTuple("Placement", node_selector=dict,
                                                                     tolerations=list):
    """A target's node selector and tolerations as task outputs: the per-target pods' placement.

    KFP's driver resolves a pod's nodeSelectorJson / tolerationJson from the parent DAG's inputs or
    an upstream task's output, never from a field of a ParallelFor item, so the loop's tasks take
    their placement from this task (pipelines/ofa_pipeline.py)."""
    from collections import namedtuple

    from onceforall.specialization.targets import check_placement

    node_selector, tolerations = check_placement(node_selector, tolerations)
    return namedtuple("Placement", ["node_selector", "tolerations"])(node_selector, tolerations)


def stage_model(target: dict, model: Input[Model], receipt: Output[Artifact]):
    """Stage the target's exported model under this run's folder of the pipeline root, where the
    report finds it by the target's name (no fan-in: backends before 2.14 have none)."""
    from onceforall import stages

    run = stages.RunContext.from_env()
    dest = stages.stage_model(target["name"], model.path, stages.run_root(receipt.uri, run.run_id))
    with open(receipt.path, "w") as f:
        f.write(dest + "\n")


def report(carbon: str, pushgateway: str, publish_uri: str, targets: list, scratch: Input[Model],
           report: Output[Markdown], summary: Output[Dataset], metrics: Output[Metrics]):
    """Every target's card and every stage's figures in one report; publishes models, then report."""
    import shutil

    from onceforall import stages

    run = stages.RunContext.from_env(carbon, pushgateway)
    record = stages.report_staged([t["name"] for t in targets], stages.run_root(summary.uri, run.run_id),
                                  summary.path, scratch_dir=scratch.path, publish_uri=publish_uri, run=run)
    shutil.copyfile(f"{summary.path}/{stages.REPORT_MD}", report.path)
    stages.log_metrics(record, metrics)


def report_specialized(carbon: str, pushgateway: str, publish_uri: str, targets: list,
                       report: Output[Markdown], summary: Output[Dataset], metrics: Output[Metrics]):
    """The report of a specialize-only run: as ``report``, without a from-scratch baseline (no
    training ran; the report says so)."""
    import shutil

    from onceforall import stages

    run = stages.RunContext.from_env(carbon, pushgateway)
    record = stages.report_staged([t["name"] for t in targets], stages.run_root(summary.uri, run.run_id),
                                  summary.path, publish_uri=publish_uri, run=run)
    shutil.copyfile(f"{summary.path}/{stages.REPORT_MD}", report.path)
    stages.log_metrics(record, metrics)


FUNCTIONS = (train_teacher, train_scratch, shrink, open_supernet, supernet_space, fit_accuracy_predictor,
             placement, profile_target, search, export, stage_model, report, report_specialized)
