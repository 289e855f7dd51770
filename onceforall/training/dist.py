"""Data-parallel training under torchrun: rank/world from the environment, gradient all-reduce.

Elastic subnets leave different parameters unused at every step, so gradients are averaged with one
explicit all-reduce after the step's subnets have all been back-propagated (what DDP with
``find_unused_parameters`` would do, without its per-step graph search). Every rank samples the same
subnet because sampling is seeded by the step, not by the rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(device: torch.device) -> tuple[torch.device, DistInfo]:
    """Join the process group (if any) and pick this rank's device: on GPUs, the one of its local
    rank (torchrun starts one process per GPU of the node)."""
    info = init_from_env(device)
    if device.type == "cuda" and info.world > 1:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device, info


def eval_devices(spec: str = "auto") -> list[str]:
    """The devices a measuring stage (predictor data) spreads its subnets over, one process each:
    ``auto`` every GPU this process sees (``--gpus N`` at compile time: the pod's N), else the CPU;
    ``cuda`` every GPU; or a comma-separated list (``cuda:0,cuda:1``; ``cpu,cpu`` runs two CPU
    processes, which is how the tests reach the multi-process path)."""
    from ..errors import UserError

    spec = spec.strip()
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if spec in ("auto", "cuda"):
        if spec == "cuda" and not gpus:
            raise UserError("device cuda: this process sees no GPU", field="device",
                            fix="use device auto or cpu, or run where a GPU is (ofa compile --gpus N)")
        return gpus or ["cpu"]
    out = [d.strip() for d in spec.split(",") if d.strip()]
    for d in out:
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise UserError(f"device {d!r} is not a device", field="device",
                            fix="use auto, cpu, cuda, cuda:N, or a comma-separated list of them") from None
        if dev.type == "cuda" and (dev.index or 0) >= len(gpus):
            raise UserError(f"device {d!r}: this process sees {len(gpus)} GPU(s)", field="device",
                            fix="name a GPU it sees, or use device auto")
    return out or ["cpu"]


def broadcast_parameters(module: torch.nn.Module, info: DistInfo) -> None:
    if info.world > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


def broadcast_rng(info: DistInfo, device: torch.device) -> None:
    """Give every rank rank 0's torch generator states (CPU, and the GPU's): after rank 0 alone has
    evaluated (which draws from them), the ranks' dropout draws would differ from then on."""
    if info.world <= 1:
        return
    cuda = device.type == "cuda"
    states = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if cuda else [])
    synced = []
    for state in states:
        t = state.to(device) if cuda else state.clone()  # NCCL broadcasts device tensors only
        dist.broadcast(t, 0)
        synced.append(t.cpu())
    torch.set_rng_state(synced[0])
    if cuda:
        torch.cuda.set_rng_state(synced[1], device)


def allreduce_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Average gradients over ranks in one flat buffer; parameters no subnet used count as zero."""
    if info.world <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def rank_checksums(module: torch.nn.Module, info: DistInfo) -> list[float]:
    """Every rank's parameter checksum; ranks that drifted apart are a bug, so this raises."""
    mine = torch.tensor([sum(float(p.detach().double().sum()) for p in module.parameters())],
                        dtype=torch.float64)
    if info.world <= 1:
        return [float(mine)]
    gathered = [torch.zeros_like(mine) for _ in range(info.world)]
    dist.all_gather(gathered, mine)
    values = [float(g) for g in gathered]
    if len(set(values)) != 1:
        raise RuntimeError(f"data-parallel ranks diverged: parameter checksums {values}")
    return values


def barrier(info: DistInfo) -> None:
    """Wait until every rank gets here (e.g. until rank 0 has restored a checkpoint)."""
    if info.world > 1:
        dist.barrier()
