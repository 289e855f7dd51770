"""Start a training stage on as many processes as it was given: here, on N local ranks, or on many nodes.

A training stage (teacher, a shrinking phase, the from-scratch baseline) is described by a JSON-able
*spec* (``phase_spec``, ``scratch_spec``); ``run`` executes it

* in this process when it has one rank (what every stage did before),
* under ``torchrun --standalone --nproc-per-node N`` on this machine when ``procs_per_node`` > 1
  (one rank per GPU; gloo ranks on a CPU-only machine, which is how tests/test_ddp.py runs it),
* as a Kubeflow Trainer TrainJob when ``nodes`` > 1 (trainjob.py, imported only then): the same
  spec under torchrun on every node, its output copied back here.

Every rank runs ``python -m onceforall.training.launch '<spec>'`` (``main``): it joins the process group
torchrun describes in the environment (dist.py), trains its share of every global batch, and rank 0
alone writes. The launcher then reads the stage's result from the output folder rank 0 wrote.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

#: The compile-time launch settings of a training task (pipelines/ofa_pipeline.py sets it as JSON
#: only when a stage runs on more than one process, so the default pipeline is unchanged).
LAUNCH_ENV = "OFA_LAUNCH"
ENTRY = ("-m", "onceforall.training.launch")  # what every rank runs, after the python interpreter or torchrun


@dataclass(frozen=True)
class Launch:
    """How many processes a training stage runs on, and (nodes > 1) what its TrainJob asks for."""

    procs_per_node: int = 1  # ranks per node: one per GPU
    nodes: int = 1
    gpus_per_node: int = 0  # what a TrainJob's node asks for (0: CPU nodes)
    image: str = ""  # the TrainJob's container image: the project's image, as the launching task's
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str = ""  # per node; "" asks for none
    memory: str = ""
    s3_secret: str = ""  # the Secret whose keys become the TrainJob pods' S3 environment
    runtime: str = "torch-distributed"  # the ClusterTrainingRuntime the Trainer installs for torch
    pending_timeout_s: float = 900.0  # a TrainJob whose pods are not all scheduled by then fails
    timeout_s: float = 14 * 24 * 3600.0  # a TrainJob still running then is deleted, the stage fails

    def __post_init__(self):
        for name in ("procs_per_node", "nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"must be a whole number >= 1, got {value!r}", field=name,
                                fix="use 1 (the default) or more")
        if self.nodes > 1 and not self.image:
            raise UserError("a multi-node stage needs the container image its nodes run", field="image",
                            fix="compile with --image (ofa compile sets it for you)")

    @property
    def world(self) -> int:
        return self.procs_per_node * self.nodes

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_env(cls) -> "Launch":
        """The launch the pipeline compiled into this task; one process when it set none."""
        text = os.environ.get(LAUNCH_ENV, "")
        if not text:
            return cls()
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"${LAUNCH_ENV} is not JSON ({e})", field=LAUNCH_ENV,
                            fix="recompile the pipeline with ofa compile") from None
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"${LAUNCH_ENV} has unknown fields {sorted(unknown)}", field=LAUNCH_ENV,
                            fix="recompile the pipeline with this version's ofa compile")
        return cls(**raw)


# -- specs ---------------------------------------------------------------------------------------

def phase_spec(phase: str, out_dir: str | Path, *, init: str | Path | None, teacher: str | Path | None,
               data: str, space: str, schedule: str, seed: int, device: str, progress: bool,
               checkpoint_uri: str | None, micro_batches: int = 1) -> dict[str, Any]:
    """A training phase (the teacher or a shrinking phase) as train.run_phase takes it."""
    return {"stage": "phase", "phase": phase, "out_dir": str(out_dir),
            "init": None if init is None else str(init), "teacher": None if teacher is None else str(teacher),
            "data": data, "space": space, "schedule": schedule, "seed": seed, "device": device,
            "progress": progress, "checkpoint_uri": checkpoint_uri, "micro_batches": micro_batches}


def scratch_spec(out_dir: str | Path, *, data: str, space: str, schedule: str, seed: int, device: str,
                 progress: bool, checkpoint_uri: str | None) -> dict[str, Any]:
    """The from-scratch baseline as train.train_static takes it."""
    return {"stage": "scratch", "out_dir": str(out_dir), "data": data, "space": space,
            "schedule": schedule, "seed": seed, "device": device, "progress": progress,
            "checkpoint_uri": checkpoint_uri}


def run_rank(spec: dict[str, Any]) -> dict[str, Any]:
    """What one rank does: train the spec's stage (joining torchrun's process group, if any)."""
    from ..stages import scratch_config, setup
    from .train import run_phase, train_static

    sp, sch, ds = setup(spec["space"], spec["schedule"], spec["data"], seed=spec["seed"])
    common = dict(seed=spec["seed"], device=spec["device"], progress=spec["progress"],
                  checkpoint_uri=spec["checkpoint_uri"])
    if spec["stage"] == "scratch":
        return train_static(sp, sch, scratch_config(sp), ds, spec["out_dir"], **common)
    result = run_phase(sp, sch, spec["phase"], ds, spec["out_dir"], init=spec["init"],
                       teacher=spec["teacher"], micro_batches=spec.get("micro_batches", 1), **common)
    return _without_folder(result.to_dict())


def _without_folder(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "folder"}


def written_result(spec: dict[str, Any]) -> dict[str, Any]:
    """The result rank 0 wrote into the spec's output folder (as run_rank returns it)."""
    from ..supernet import checkpoint as ckpt

    out = Path(spec["out_dir"])
    if spec["stage"] == "scratch":
        path = out / "result.json"
        if not path.is_file():
            raise RuntimeError(f"the ranks finished but rank 0 wrote no {path}")
        return json.loads(path.read_text())
    meta = ckpt.read_meta(out)
    if not meta.get("completed"):
        raise RuntimeError(f"the ranks finished but the checkpoint in {out} is not a completed phase")
    return meta["result"]


# -- launching -----------------------------------------------------------------------------------

def run(spec: dict[str, Any], launch: Launch = Launch()) -> dict[str, Any]:
    """Run the stage ``spec`` describes on ``launch``'s processes; its result (run_rank's)."""
    if launch.nodes > 1:
        from . import trainjob  # platform code: only a multi-node stage talks to Kubernetes

        # the launching pod's meter sees only itself: the ranks' readings go with the result
        # (stages._stage adds them to the stage's energy)
        rank_energy = trainjob.run(spec, launch)
        return {**written_result(spec), "rank_energy": rank_energy}
    if launch.procs_per_node > 1:
        run_local(spec, launch.procs_per_node)
        return written_result(spec)
    return run_rank(spec)


def torchrun_command(spec: dict[str, Any], torchrun_args: list[str],
                     python: str = sys.executable) -> list[str]:
    """``python -m torch.distributed.run [args] -m onceforall.training.launch '<spec>'``: torchrun reads what
    it is not told from ``PET_*`` variables (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, ...), which
    is how a Trainer TrainJob tells each node its place."""
    return [python, "-m", "torch.distributed.run", *torchrun_args, *ENTRY, json.dumps(spec)]


def run_local(spec: dict[str, Any], nproc: int) -> None:
    """``nproc`` ranks on this machine under torchrun (c10d rendezvous on a free local port; the
    ranks' output goes to this process's); fails when a rank fails, after torchrun's summary."""
    cmd = torchrun_command(spec, ["--standalone", "--nnodes=1", f"--nproc-per-node={nproc}"])
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise RuntimeError(f"{nproc} training ranks under torchrun failed (exit {done.returncode}); "
                           "the failing rank's error is in the log above")


def main(argv: list[str] | None = None) -> int:
    """One rank: ``python -m onceforall.training.launch '<spec JSON>'`` (under torchrun, or alone)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m onceforall.training.launch '<stage spec JSON>'", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    remote = spec.pop("remote", None)
    if remote is not None:  # a TrainJob's node: fetch the inputs, send the output back
        from . import trainjob

        record(trainjob.run_remote_rank)(spec, remote)
    else:
        record(run_rank)(spec)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
