"""Checkpoints: safetensors weights plus a JSON sidecar. Loading never unpickles.

A checkpoint is a folder::

    weights.safetensors     model weights
    optimizer.safetensors   optimizer buffers (only while a phase is in progress, for resuming)
    checkpoint.json         format, search space, phase, epoch, step, RNG state, sha256 of the files

Files are written to temporary names and renamed, the sidecar last, so a reader (or a resumed
phase after a kill) sees either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError
from .space import SearchSpace

FORMAT = "onceforall-checkpoint/1"
SIDECAR = "checkpoint.json"
WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"


@dataclass
class Checkpoint:
    folder: Path
    meta: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor] | None

    @property
    def space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.meta["space"], str(self.folder / SIDECAR))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> str:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    digest = sha256(tmp)
    os.replace(tmp, path)
    return digest


def rng_state() -> dict[str, str]:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def set_rng_state(state: dict[str, str]) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def save_checkpoint(folder: str | Path, weights: dict[str, torch.Tensor], meta: dict[str, Any], *,
                    optimizer: dict[str, torch.Tensor] | None = None) -> Path:
    """Write weights (and optimizer buffers), then the sidecar with their sha256; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {WEIGHTS: _atomic_save(weights, folder / WEIGHTS)}
    if optimizer is not None:
        files[OPTIMIZER] = _atomic_save(optimizer, folder / OPTIMIZER)
    sidecar = {"format": FORMAT, **meta, "files": files}
    tmp = folder / (SIDECAR + ".tmp")
    tmp.write_text(json.dumps(sidecar, indent=1, sort_keys=True))
    os.replace(tmp, folder / SIDECAR)
    if optimizer is None and (folder / OPTIMIZER).exists():
        (folder / OPTIMIZER).unlink()  # a finished phase needs no optimizer state
    return folder


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The sidecar alone (no tensors), validated."""
    folder = Path(folder)
    path = folder / SIDECAR
    if not path.is_file():
        raise UserError("no checkpoint here (checkpoint.json is missing)", source=str(folder),
                        fix="give the folder that a training phase wrote")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"not valid JSON ({exc})", source=str(path),
                        fix="the sidecar is damaged; re-run the phase that wrote it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise UserError(f"unknown checkpoint format {found!r}",
                        source=str(path), field="format",
                        fix=f"use a checkpoint written by this version ({FORMAT})")
    for key in ("space", "files", "phase"):
        if key not in meta:
            raise UserError("missing", source=str(path), field=key,
                            fix="the sidecar is incomplete; re-run the phase that wrote it")
    return meta


def load_checkpoint(folder: str | Path, *, space: SearchSpace | None = None,
                    with_optimizer: bool = False) -> Checkpoint:
    """Load and verify a checkpoint; ``space``, if given, must be the one it was trained with."""
    folder = Path(folder)
    meta = read_meta(folder)
    sidecar = str(folder / SIDECAR)
    if space is not None and meta["space"] != space.to_dict():
        theirs = meta["space"]
        diff = sorted(k for k in set(theirs) | set(space.to_dict())
                      if theirs.get(k) != space.to_dict().get(k))
        raise UserError(f"was trained for search space {theirs.get('name')!r}, not {space.name!r} "
                        f"(differs in {diff})", source=sidecar, field="space",
                        fix="pass the space the checkpoint was trained with, or retrain")

    def read(name: str) -> dict[str, torch.Tensor]:
        path = folder / name
        if not path.is_file():
            raise UserError(f"{name} is missing", source=str(folder), field=name,
                            fix="the checkpoint is incomplete; re-run the phase that wrote it")
        if sha256(path) != meta["files"].get(name):
            raise UserError("sha256 differs from the one in checkpoint.json (corrupted or replaced)",
                            source=str(path), field="sha256",
                            fix="restore the file or re-run the phase that wrote it")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"not a safetensors file ({exc})", source=str(path),
                            fix="re-run the phase that wrote it") from None

    weights = read(WEIGHTS)
    optimizer = read(OPTIMIZER) if with_optimizer and OPTIMIZER in meta["files"] else None
    return Checkpoint(folder, meta, weights, optimizer)


def load_weights(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """Copy checkpoint weights into ``model``; any missing or unexpected key is a clear error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ckpt.weights))
    extra = sorted(set(ckpt.weights) - set(expected))
    bad_shape = sorted(k for k in set(expected) & set(ckpt.weights)
                       if expected[k].shape != ckpt.weights[k].shape)
    if missing or extra or bad_shape:
        first = (missing or extra or bad_shape)[0]
        raise UserError(f"weights do not fit the model ({len(missing)} missing, {len(extra)} "
                        f"unexpected, {len(bad_shape)} of another shape)",
                        source=str(ckpt.folder / WEIGHTS), field=first,
                        fix="load it with the search space it was trained with")
    model.load_state_dict(ckpt.weights)
