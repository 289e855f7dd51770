"""Two processes with the gloo backend on CPU, as torchrun would start them."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from onceforall.supernet import checkpoint as ckpt
from onceforall.data import load_dataset
from onceforall.training.schedule import smoke
from onceforall.supernet.space import get_space
from onceforall.training.train import run_phase

SPACE = get_space("fashion-mnist")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    data = load_dataset("synthetic:600", val_size=120)
    # The kernel phase samples a random subnet per step: ranks must agree on it at every step.
    run_phase(SPACE, smoke(), "kernel", data, f"{root}/kernel", init=f"{root}/teacher",
              teacher=f"{root}/teacher", progress=False)
    dist.destroy_process_group()


def test_two_ranks_stay_in_sync(tmp_path, tiny_data):
    run_phase(SPACE, smoke(), "teacher", tiny_data, tmp_path / "teacher", progress=False)
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    meta = ckpt.read_meta(tmp_path / "kernel")
    assert meta["completed"] and meta["world_size"] == 2
    # Each rank's live parameters, gathered at the end (the run raises if they differ).
    a, b = meta["rank_checksums"]
    assert a == b
    # Only rank 0 writes: one log line per epoch, not one per rank.
    lines = (tmp_path / "kernel" / "log.jsonl").read_text().splitlines()
    assert len(lines) == smoke().phase("kernel").epochs


def test_a_stage_with_two_processes_runs_two_ranks_under_torchrun(tmp_path):
    """What a training task compiled with --gpus 2 does (one rank per GPU); gloo ranks here."""
    from onceforall import stages
    from onceforall.training.launch import Launch

    two = Launch(procs_per_node=2)
    common = dict(data="synthetic:600", space="fashion-mnist", schedule="smoke", device="cpu",
                  progress=False)
    record = stages.train_teacher(tmp_path / "teacher", launch=two, **common)
    meta = ckpt.read_meta(tmp_path / "teacher")
    assert meta["completed"] and meta["world_size"] == 2 and record["metrics"]["ranks"] == 2
    a, b = meta["rank_checksums"]
    assert a == b
    assert record["metrics"]["steps"] == meta["total_steps"] and record["metrics"]["val_acc_max"] > 0
    assert len((tmp_path / "teacher" / "log.jsonl").read_text().splitlines()) == smoke().teacher.epochs

    record = stages.train_scratch(tmp_path / "scratch", launch=two, **common)
    result = json.loads((tmp_path / "scratch" / "result.json").read_text())
    assert result["world_size"] == 2 and len(set(result["rank_checksums"])) == 1
    assert record["metrics"]["val_acc_scratch"] == result["val_acc"]


def test_a_failing_rank_fails_the_stage(tmp_path):
    from onceforall import stages
    from onceforall.training.launch import Launch

    with pytest.raises(RuntimeError, match="2 training ranks under torchrun failed"):
        stages.train_teacher(tmp_path / "t", data=str(tmp_path / "missing"), space="fashion-mnist",
                             schedule="smoke", device="cpu", progress=False,
                             launch=Launch(procs_per_node=2))


def test_two_ranks_resume_from_the_durable_checkpoint(tmp_path):
    """A retried two-rank stage in a fresh pod continues the run its first try checkpointed."""
    from onceforall import stages
    from onceforall.training.launch import Launch
    from onceforall.stages import setup

    sp, sch, data = setup("fashion-mnist", "smoke", "synthetic:600")
    durable_uri = str(tmp_path / "teacher.checkpoints")
    first = run_phase(sp, sch, "teacher", data, tmp_path / "first", progress=False, device="cpu",
                      stop_after_steps=3, checkpoint_uri=durable_uri)
    assert first.steps == 3
    stages.train_teacher(tmp_path / "retry", data="synthetic:600", space="fashion-mnist", schedule="smoke",
                         device="cpu", progress=False, checkpoint_uri=durable_uri,
                         launch=Launch(procs_per_node=2))
    meta = ckpt.read_meta(tmp_path / "retry")
    assert meta["completed"] and meta["world_size"] == 2
    assert meta["result"]["resumed_from_step"] == 3 and meta["result"]["resumed_from"] == durable_uri
