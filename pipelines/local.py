"""``ofa run``: the cluster's pipeline function, run on this machine by kfp's SubprocessRunner.

Every stage runs as its own process, exactly the component code a pod runs, in this Python
environment (``use_venv=False``: nothing is installed at run time). Inputs are checked before
anything starts, so a typo costs seconds, not a training. kfp's own log (executor inputs, output
listings) goes to a log file; the terminal shows which stage runs and its progress lines.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from onceforall.infra import store
from onceforall.errors import UserError
from onceforall.stages import RUN_ID_ENV

RUNNERS = ("subprocess", "container")
# The image `make image` builds (scripts/build_image.sh); kept here so that the default runner never
# imports the container code.
LOCAL_IMAGE = "localhost/onceforall-kfp:dev-cpu"

# What reaches the terminal from kfp's log: task starts, ends and cache hits, our progress lines, errors.
SHOW = re.compile(r"Executing task|finished with status|cache hit|^\s*\[[\w .:/-]+\] |Error|Traceback")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Filter(io.TextIOBase):
    """Writes everything to ``log``; echoes the lines that matter to ``term``."""

    def __init__(self, log: TextIO, term: TextIO):
        self.log, self.term, self.buf = log, term, ""
        self.recent: collections.deque[str] = collections.deque(maxlen=60)  # shown when a stage fails

    def write(self, text: str) -> int:
        self.log.write(text)
        self.buf += text
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            plain = ANSI.sub("", line)
            self.recent.append(plain)
            if SHOW.search(plain):
                self.term.write(_tidy(plain) + "\n")
                self.term.flush()
        return len(text)

    def flush(self) -> None:
        self.log.flush()


def _tidy(line: str) -> str:
    line = line.strip()
    m = re.match(r"^\d\d:\d\d:\d\d\.\d+ - \w+ - (.*)$", line)
    return time.strftime("%H:%M:%S ") + (m.group(1) if m else "  " + line)


@dataclass
class LocalRun:
    out: str
    pipeline_root: str
    log: Path
    wall_s: float
    report: dict[str, Any]


def check_inputs(space: str, schedule: str, data: str, targets: str | None, supernet: str = "") -> list:
    """Every run input resolved once, here, before kfp starts anything. With ``supernet`` (a
    specialize-only run) the space is the checkpoint's and ``space`` is not used."""
    from onceforall.supernet.efficiency import subnet_macs, subnet_params
    from onceforall.errors import UserError
    from onceforall.training.schedule import get_schedule
    from onceforall.stages import check_data, open_data, setup, supernet_space
    from onceforall.specialization.targets import EXAMPLE_TARGETS, IMAGENET_TARGETS, load_targets

    if supernet:
        sp = supernet_space(supernet)
        get_schedule(schedule)
        check_data(sp, open_data(data, image_size=max(sp.resolutions)))
    else:
        sp, _, _ = setup(space, schedule, data)
    targets = targets or str(IMAGENET_TARGETS if supernet else EXAMPLE_TARGETS)
    parsed = load_targets(targets)
    # Budgets in MACs or params are checked now; latency budgets need the target's own table.
    smallest = {"macs": subnet_macs(sp, sp.min_config()), "params": subnet_params(sp, sp.min_config())}
    for t in parsed:
        low = smallest.get(t.constraint.kind)
        if low is not None and t.constraint.budget < low:
            raise UserError(f"the {t.constraint.kind} budget {t.constraint.budget:g} of target {t.name!r} "
                            f"is below the smallest subnet of space {sp.name!r}, {low:g}",
                            source=targets, field="constraint.budget",
                            fix=f"give a budget of at least {low:g}")
    return parsed


def run_local(*, space: str = "fashion-mnist", schedule: str = "quick", data: str = "fashion-mnist",
              targets: str | None = None, out: str = "runs/published", pipeline_root: str | None = None,
              seed: int = 0, predictor_subnets: int = 0, cache: bool = False, carbon: str | None = None,
              pushgateway: str = "", runner: str = "subprocess", image: str = "", supernet: str = "",
              term: TextIO | None = None) -> LocalRun:
    """Run the whole pipeline here; models, cards and the report are published to ``out``.

    ``supernet``: a checkpoint folder (a folder or s3://) to specialize instead of training one: the
    specialize-only pipeline (ofa_pipeline.build_specialize_pipeline); ``space`` is then the
    checkpoint's.

    ``runner``: ``subprocess`` (every stage a process of this environment) or ``container`` (every
    stage in ``image``, default the one ``make image`` builds, through podman: ``containers.py``)."""
    from kfp import local

    from onceforall.specialization.targets import pipeline_items

    from .ofa_pipeline import Options, build_pipeline, build_specialize_pipeline

    term = term or sys.stderr
    from onceforall.infra.energy import Carbon

    if runner not in RUNNERS:
        raise UserError(f"unknown runner {runner!r}", field="--runner",
                        fix=f"use one of {', '.join(RUNNERS)}")
    parsed = check_inputs(space, schedule, data, targets, supernet)
    if runner == "container":
        # a container's working directory is the image's, so local paths are passed absolute
        out = out if store.is_s3(out) else str(Path(out).absolute())
        data = _absolute(data)
        supernet = str(Path(supernet).absolute()) if supernet and Path(supernet).is_dir() else supernet
    if store.is_s3(out):
        store.check_writable(out)
    remote_root = pipeline_root if pipeline_root and store.is_s3(pipeline_root) else None
    if remote_root:
        store.check_writable(remote_root)
    root = Path(tempfile.mkdtemp(prefix="ofa-pipeline-root-") if remote_root
                else pipeline_root or "runs/pipeline-root").absolute()
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / f"ofa-run-{time.strftime('%Y%m%d-%H%M%S')}.log"

    # One target at a time: two latency measurements sharing this machine's cores would both be wrong.
    # No retries: here a failure is not a lost node, and it should show at once.
    image = image or (LOCAL_IMAGE if runner == "container" else "")
    build = build_specialize_pipeline if supernet else build_pipeline
    pipeline = build(Options(image=image, target_parallelism=1, s3_secret="", retries=0,
                             pushgateway="", run_id_from_pod=False))
    # The run id reaches the stages through the environment, as on a cluster (never a task parameter,
    # so a second run reuses the cached stages), and names this run's folder of the pipeline root,
    # where the targets' branches stage their models for the report (stages.run_root).
    run_id = f"ofa-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    (root / run_id).mkdir()  # before a container run hands the root's folders to the image's user
    t0 = time.monotonic()
    term.write(f"ofa run: {'specialize ' + supernet + ', ' if supernet else ''}"
               f"{len(parsed)} targets, schedule {schedule}, data {data}, "
               f"{'in containers of ' + image if runner == 'container' else 'as subprocesses'}; "
               f"full log: {log_path}\n")
    with open(log_path, "w") as log, warnings.catch_warnings(), contextlib.ExitStack() as stack:
        # The SubprocessRunner warns when an image name lacks "python"; here no image is used.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        sink = _Filter(log, term)
        # set before the container runner copies the environment it passes into the containers
        stack.enter_context(_env(RUN_ID_ENV, run_id))
        kfp_runner = (_container_runner(stack, image, root, out, [data, supernet]) if runner == "container"
                      else local.SubprocessRunner(use_venv=False))
        local.init(runner=kfp_runner, pipeline_root=str(root / run_id), raise_on_error=True,
                   enable_caching=cache, cache_root=str(root / ".kfp_cache"))
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                common = dict(data=data, schedule=schedule, targets=pipeline_items(parsed), publish_uri=out,
                              seed=seed, predictor_subnets=predictor_subnets,
                              carbon=Carbon.parse(carbon).spec, pushgateway=pushgateway)
                pipeline(**common, **({"supernet": supernet} if supernet else {"space": space}))
        except RuntimeError as exc:
            sink.flush()
            tail = "\n".join("    " + line for line in list(sink.recent)[-25:])
            term.write(f"{tail}\n")
            raise StageFailed(f"{exc}; the lines above are the end of its log, all of it is in "
                              f"{log_path}") from None
    wall = time.monotonic() - t0
    if remote_root:
        store.publish_dir(root, remote_root)
        shutil.rmtree(root, ignore_errors=True)
    from onceforall.stages import REPORT_JSON

    report = json.loads(store.read_text(store.join(out, REPORT_JSON)))
    return LocalRun(out, remote_root or str(root), log_path, round(wall, 2), report)


@contextlib.contextmanager
def _env(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _absolute(data: str) -> str:
    """``data`` with a local folder made absolute (also after an imagefolder: prefix)."""
    prefix = "imagefolder:" if data.startswith("imagefolder:") else ""
    path = data[len(prefix):]
    return prefix + str(Path(path).absolute()) if Path(path).is_dir() else data


def _container_runner(stack: contextlib.ExitStack, image: str, root: Path, out: str, inputs: list[str]):
    """kfp's DockerRunner on podman, for as long as ``stack`` lives: the API served, the folders that
    stages write handed to the image's user, the local folders of the run mounted."""
    from . import containers

    stack.enter_context(containers.docker_api())
    uid, gid = containers.image_user(image)
    if not store.is_s3(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    writes, mounts = container_mounts(root, out, inputs)
    stack.enter_context(containers.owned_by(writes, uid, gid))
    label = root.name + "-" + str(os.getpid())
    stack.callback(containers.stop_labelled, label)  # on the way out, before ownership goes back
    stack.enter_context(containers.stop_on_signal(label))
    return containers.runner(image, mounts, label)


def container_mounts(root: Path, out: str, inputs: list[str]) -> tuple[list[Path], list[tuple[Path, bool]]]:
    """What a container run binds: (the folders its stages write, handed to the image's user;
    the (folder, read_only) mounts). The pipeline root and a local ``out`` are written; the local
    folders among ``inputs`` (the data, ``imagefolder:`` or not, and the supernet: absolute paths,
    or s3:// URIs, which are not mounted) are read only, each once. kfp mounts the run's own
    pipeline root (root/<run id>); the whole root goes in too, since a cached task's outputs lie
    in an earlier run's folder; a folder under it needs no mount of its own."""
    writes, mounts = [root], [(root, False)]
    if not store.is_s3(out):
        writes.append(Path(out))
        mounts.append((Path(out), False))
    for uri in inputs:
        path = Path(uri.removeprefix("imagefolder:")) if uri and not store.is_s3(uri) else None
        if path is not None and path.is_dir() and all(path != p for p, _ in mounts):
            mounts.append((path, True))
    return writes, [mounts[0], *((p, ro) for p, ro in mounts[1:] if not p.is_relative_to(root))]


class StageFailed(Exception):
    """A stage of a local run failed (not a user error: its log says why)."""
