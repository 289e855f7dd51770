"""Durable progress: a training phase's checkpoints copied to object storage (or any folder) as it runs.

A phase writes its checkpoints into its output folder, which a pipeline uploads only when the pod
succeeds; a retried, preempted or rescheduled pod starts with an empty one. With a checkpoint URI,
every checkpoint the phase writes is also copied there, and a phase that starts without a local
checkpoint continues from the copy (same step, same random stream).

Layout under the URI: two slots and a pointer::

    slot-0/ weights.safetensors optimizer.safetensors log.jsonl checkpoint.json
    slot-1/ ...
    latest.json     {"slot": "slot-1", "files": [...], "phase": ..., "global_step": ..., "completed": ...}

A checkpoint goes into the slot the pointer does not name, its sidecar last, and only then is the
pointer rewritten (one PUT, or a rename locally). A kill at any moment leaves the pointer naming a
complete checkpoint: the previous one, or the new one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from ..supernet import checkpoint as ckpt
from ..infra import store
from ..errors import UserError

log = logging.getLogger(__name__)

POINTER = "latest.json"
SLOTS = ("slot-0", "slot-1")
LOG = "log.jsonl"  # train.LOG: the per-epoch records travel with the checkpoint
FIELD = "checkpoint_uri"


def check_writable(uri: str) -> None:
    """Write and delete a small probe object under ``uri``: a missing bucket, refused credentials or a
    file where a folder should be fails now, with one line, instead of after the first interval."""
    probe = store.join(uri, f".write-probe-{uuid.uuid4().hex[:12]}")
    try:
        store.write_text(probe, "probe\n")
        store.remove(probe)
    except UserError as e:
        raise UserError(f"not writable: {e.what}", source=uri, field=FIELD,
                        fix=e.fix or "give a writable s3://bucket/prefix or folder") from None
    except OSError as e:  # local: a file in the way, a read-only mount
        raise UserError(f"not writable ({e.strerror or e})", source=uri, field=FIELD,
                        fix="give a folder you can write to, or an s3://bucket/prefix") from None


def latest(uri: str, phase: str) -> dict[str, Any] | None:
    """The pointer to the newest complete checkpoint of ``phase`` under ``uri``; None if there is none."""
    pointer = store.join(uri, POINTER)
    if not store.exists(pointer):
        return None
    try:
        doc = json.loads(store.read_text(pointer))
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON ({e})", source=pointer, field=FIELD,
                        fix="remove the damaged checkpoint location or give another one") from None
    if not isinstance(doc, dict) or doc.get("slot") not in SLOTS or not isinstance(doc.get("files"), list):
        raise UserError("names no checkpoint slot", source=pointer, field=FIELD,
                        fix="remove the damaged checkpoint location or give another one")
    if doc.get("phase") != phase:
        raise UserError(f"holds checkpoints of phase {doc.get('phase')!r}, not {phase!r}",
                        source=uri, field=FIELD, fix="give each phase its own checkpoint URI")
    return doc


def push(folder: Path, uri: str, current: dict[str, Any] | None) -> dict[str, Any]:
    """Copy the checkpoint in ``folder`` to the slot ``current`` (the pointer) does not name, then
    point at it. Returns the new pointer (pass it to the next push: one read of the store less)."""
    meta = ckpt.read_meta(folder)
    slot = SLOTS[1] if current and current["slot"] == SLOTS[0] else SLOTS[0]
    names = [n for n in (*meta["files"], LOG) if (folder / n).is_file()]
    for name in [*names, ckpt.SIDECAR]:  # the sidecar last: it is what makes the slot a checkpoint
        store.upload_file(folder / name, store.join(uri, slot, name))
    pointer = {"slot": slot, "files": [*names, ckpt.SIDECAR], "phase": meta["phase"],
               "global_step": meta.get("global_step"), "completed": bool(meta.get("completed"))}
    store.write_text(store.join(uri, POINTER), json.dumps(pointer))
    if pointer["completed"]:
        _prune(uri, pointer)
    return pointer


def _prune(uri: str, pointer: dict[str, Any]) -> None:
    """A finished phase keeps one copy, without optimizer state: remove the rest."""
    every = (ckpt.WEIGHTS, ckpt.OPTIMIZER, LOG, ckpt.SIDECAR)
    for slot in SLOTS:
        for name in every:
            if slot != pointer["slot"] or name not in pointer["files"]:
                store.remove(store.join(uri, slot, name))


def pull(uri: str, pointer: dict[str, Any], folder: Path) -> None:
    """Copy the checkpoint ``pointer`` names into ``folder``, verified, over any older one there: its
    sidecar goes first and the new one comes last, so a kill during the copy leaves no local sidecar
    (the next start pulls again), never one that does not match its files."""
    folder.mkdir(parents=True, exist_ok=True)
    slot = store.join(uri, pointer["slot"])
    names = [n for n in pointer["files"] if n != ckpt.SIDECAR] + [ckpt.SIDECAR]
    with tempfile.TemporaryDirectory(dir=folder, prefix=".restore-") as tmp:
        for name in names:
            _fetch(store.join(slot, name), Path(tmp) / name)
        try:  # every file's sha256 against the sidecar, before the copy counts
            ckpt.load_checkpoint(tmp, with_optimizer=True)
        except UserError as e:
            raise UserError(f"the checkpoint in {pointer['slot']} is damaged: {e.what}", source=uri,
                            field=FIELD, fix="remove the damaged checkpoint location or give another one") \
                from None
        (folder / ckpt.SIDECAR).unlink(missing_ok=True)
        for name in names:
            os.replace(Path(tmp) / name, folder / name)
    log.info("restored the checkpoint of step %s from %s", pointer.get("global_step"), slot)


def _fetch(uri: str, dest: Path) -> None:
    """A copy of one object or file at ``dest`` (store.download hands a local path back as it is)."""
    if store.is_s3(uri):
        store.download(uri, dest.parent)
    elif not Path(uri).is_file():
        raise UserError(f"{Path(uri).name} is missing", source=uri, field=FIELD,
                        fix="the durable checkpoint is incomplete; remove it or give another location")
    else:
        shutil.copyfile(uri, dest)
