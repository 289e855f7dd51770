"""One KFP component per stage. Each body imports the library and calls one stage function.

These are plain functions; ``build(image)`` turns them into lightweight ``@dsl.component``s on the
project's image (the image is a compile-time option, so the decorator is applied there). Bodies
must be self-contained: KFP ships each function's source into its container on its own.
Directories are fine as artifact outputs: the launcher uploads them recursively.
"""


from typing import List

from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output


def train_teacher(data: str, space: str, schedule: str, seed: int,
                  teacher: Output[Model], metrics: Output[Metrics]):
    """Train the full network (the teacher)."""
    from onceforall import stages

    record = stages.train_teacher(teacher.path, data=data, space=space, schedule=schedule, seed=seed)
    stages.log_metrics(record, metrics)


def shrink(phase: str, data: str, space: str, schedule: str, seed: int, init: Input[Model],
           teacher: Input[Model], supernet: Output[Model], metrics: Output[Metrics]):
    """One progressive-shrinking phase (kernel, depth-1, depth-2, width-1 or width-2)."""
    from onceforall import stages

    record = stages.shrink(phase, supernet.path, init_dir=init.path, teacher_dir=teacher.path,
                           data=data, space=space, schedule=schedule, seed=seed)
    stages.log_metrics(record, metrics)


def fit_accuracy_predictor(data: str, schedule: str, seed: int, subnets: int, supernet: Input[Model],
                           predictor: Output[Model], accuracy_data: Output[Dataset],
                           metrics: Output[Metrics]):
    """Measure subnets on the validation split, then fit and judge the accuracy predictor."""
    import shutil

    from onceforall import stages

    record = stages.fit_accuracy_predictor(supernet.path, predictor.path, data=data, schedule=schedule,
                                           n=subnets, seed=seed)
    shutil.copyfile(f"{predictor.path}/accuracy.jsonl", accuracy_data.path)
    stages.log_metrics(record, metrics)


def profile_target(target: dict, space: str, seed: int, latency: Output[Dataset],
                   metrics: Output[Metrics]):
    """Measure the target's latency table on the node this pod runs on."""
    from onceforall import stages

    record = stages.profile(target, latency.path, space=space, seed=seed)
    stages.log_metrics(record, metrics)


def search(target: dict, space: str, seed: int, predictor: Input[Model], latency: Input[Dataset],
           result: Output[Dataset], pareto: Output[HTML], metrics: Output[Metrics]):
    """Evolutionary search for the target's best subnet; the Pareto front as HTML for the UI."""
    import shutil

    from onceforall import stages

    record = stages.search(target, predictor.path, latency.path, result.path, space=space, seed=seed)
    shutil.copyfile(f"{result.path}/pareto.html", pareto.path)
    stages.log_metrics(record, metrics)


def export(target: dict, data: str, seed: int, supernet: Input[Model], search: Input[Dataset],
           model: Output[Model], card: Output[Markdown], metrics: Output[Metrics]):
    """Extract, recalibrate, verify and export the searched subnet: model.onnx + model card."""
    import json

    from onceforall import stages

    record = stages.export(target, supernet.path, search.path, model.path, data=data, seed=seed)
    text = open(f"{model.path}/model_card.json").read()
    with open(card.path, "w") as f:
        f.write(f"# Model card: {json.loads(text)['target']['name']}\n\n```json\n{text}\n```\n")
    stages.log_metrics(record, metrics)


def report(run_id: str, publish_uri: str, models: Input[List[Model]], report: Output[Markdown],
           summary: Output[Dataset], metrics: Output[Metrics]):
    """Every target's card and every stage's figures in one report; publishes models, then report."""
    import shutil

    from onceforall import stages

    record = stages.report([m.path for m in models], summary.path, publish_uri=publish_uri,
                           run_id=run_id)
    shutil.copyfile(f"{summary.path}/{stages.REPORT_MD}", report.path)
    stages.log_metrics(record, metrics)


FUNCTIONS = (train_teacher, shrink, fit_accuracy_predictor, profile_target, search, export, report)
