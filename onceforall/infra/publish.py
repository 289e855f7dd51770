"""Publishing a run's models and report to a local folder or an s3 prefix, safely.

Layout under ``publish_uri``::

    releases/<release>/models/<target>/model.onnx, model_card.json, ...   one copy per run, never
    releases/<release>/report.md, report.json                              changed once complete
    current.json                     {"release": ..., "uri": ..., "history": [older releases]}
    models/<target>/..., report.md, report.json     the current release, at fixed paths

Why three parts: an upload can die at any byte (the server stops, the pod is preempted). Each object
write is atomic on S3, but a folder of them is not; so a run first uploads its own release, where a
partial upload harms nobody, and marks it complete by writing its ``report.json`` last (create-only:
once there, no later attempt replaces it). Only then does ``current.json`` move to it, by
compare-and-swap (S3 If-Match on the ETag read before), so two publishers never lose each other's
entry in its history and a retried older run never moves it back over a newer one. Last, the
release is copied to the fixed paths that readers and the README use, each card removed first and
written last: if that copy dies halfway, a folder there lacks its card (never a card without its
model) and ``current.json`` still names a complete release. Every earlier release stays as it was.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

from . import store
from ..errors import UserError

CARD, REPORT_JSON, REPORT_MD = "model_card.json", "report.json", "report.md"
POINTER = "current.json"
HISTORY = 100  # releases remembered in current.json: enough to tell a retried old run from a new one
CLAIM_ATTEMPTS = 5  # compare-and-swap rounds against other publishers before giving up


def release_name(run_id: str) -> str:
    """A run's release folder name: its run id made path-safe. A run without one gets a time and a
    random part: two such runs in one second must not find each other's release sealed."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-.")
    return name or time.strftime("local-%Y%m%dT%H%M%SZ-", time.gmtime()) + secrets.token_hex(4)


def publish_run(publish_uri: str, release: str, models: dict[str, str | Path],
                report_dir: str | Path) -> dict[str, Any]:
    """Publish every target's model folder (``models``: target name -> folder) and the report
    folder's report.md/report.json as ``release``; see the module docstring. Returns where it went
    and whether it is the current release (False when a newer release was claimed meanwhile)."""
    release_uri = store.join(publish_uri, "releases", release)
    _upload_release(release_uri, models, Path(report_dir))
    newer = _claim(publish_uri, release, release_uri)
    if newer is None:
        newer = _refresh_fixed_paths(publish_uri, release, release_uri, sorted(models))
    return {"release": release_uri, "current": newer is None,
            **({"superseded_by": newer} if newer else {})}


def _upload_release(release_uri: str, models: dict[str, str | Path], report_dir: Path) -> None:
    seal = store.join(release_uri, REPORT_JSON)
    if store.exists(seal):
        return  # an earlier attempt of this run completed it: a retry uploads nothing again
    for name, folder in models.items():
        store.publish_dir(folder, store.join(release_uri, "models", name), last=CARD)
    store.upload_file(report_dir / REPORT_MD, store.join(release_uri, REPORT_MD))
    # create-only: if another attempt of this run (a pod thought lost) sealed it first, its copy stands
    store.write_if(seal, (report_dir / REPORT_JSON).read_text(encoding="utf-8"), None)


def _claim(publish_uri: str, release: str, release_uri: str) -> str | None:
    """Point current.json at ``release``; None on success, else the newer release that holds it."""
    pointer = store.join(publish_uri, POINTER)
    for _ in range(CLAIM_ATTEMPTS):
        seen = store.read_versioned(pointer)
        doc = _pointer_doc(seen[0], pointer) if seen else {"release": None, "history": []}
        if doc["release"] == release:
            return None  # claimed by an earlier attempt of this run
        if release in doc["history"]:
            return doc["release"]  # this release was current once and a newer one replaced it
        history = ([doc["release"]] if doc["release"] else []) + doc["history"]
        new = {"release": release, "uri": release_uri, "history": history[:HISTORY]}
        if store.write_if(pointer, json.dumps(new, indent=1) + "\n", seen[1] if seen else None):
            return None
    raise UserError(f"{CLAIM_ATTEMPTS} other publishers updated {POINTER} while this run tried to",
                    source=pointer, fix="rerun the report stage; its release is complete at " + release_uri)


def _refresh_fixed_paths(publish_uri: str, release: str, release_uri: str, targets: list[str]) -> str | None:
    """Copy the release to the fixed paths; stop (returning the newer release) if one was claimed."""
    for name in targets:
        newer = _newer_release(publish_uri, release)
        if newer:
            return newer
        store.copy_dir(store.join(release_uri, "models", name), store.join(publish_uri, "models", name),
                       last=CARD)
    store.remove(store.join(publish_uri, REPORT_JSON))  # as with a card: gone while report.md changes
    store.copy_file(store.join(release_uri, REPORT_MD), store.join(publish_uri, REPORT_MD))
    store.copy_file(store.join(release_uri, REPORT_JSON), store.join(publish_uri, REPORT_JSON))
    return None


def _newer_release(publish_uri: str, release: str) -> str | None:
    pointer = store.join(publish_uri, POINTER)
    seen = store.read_versioned(pointer)
    current = _pointer_doc(seen[0], pointer)["release"] if seen else None
    return None if current == release else current


def _pointer_doc(text: str, pointer: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
        if isinstance(doc["release"], str) and isinstance(doc["history"], list):
            return doc
    except (ValueError, KeyError, TypeError):
        pass
    raise UserError(f"not a {POINTER} that ofa wrote", source=pointer,
                    fix="publish to another prefix, or remove the file if nothing reads it")
