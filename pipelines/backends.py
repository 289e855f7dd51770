"""The KFP backends the compiled pipeline supports, and how a backend's version string is read.

One range, used by ``ofa submit``/``ofa schedule`` (refuse a backend outside it before uploading) and by
the fidelity test of the compiled YAML (hold it to the driver rules of every version in it). The low end
is Kubeflow 1.10's KFP 2.5.0; the high end is the newest KFP 2.x release the pipeline was checked
against, every patch release of that minor version included.

The version comes from ``GET /apis/v2beta1/healthz``: the API server answers ``{"commit_sha",
"tag_name", "multi_user"}`` (2.17 adds "pipeline_store"; backend/src/apiserver/main.go at tags 2.5.0
and 2.17.0, ``TAG_NAME`` of its image, "unknown" when the image was built without it); through
ml-pipeline-ui the frontend answers for it with ``apiServerTagName``
(frontend/server/handlers/healthz.ts, the same at both tags).
"""

from __future__ import annotations

import re

#: Lowest supported backend (inclusive): KFP 2.5.0, shipped by Kubeflow 1.10.
MIN_BACKEND = (2, 5, 0)
#: Highest supported backend as (major, minor): every 2.17.x patch release.
MAX_BACKEND = (2, 17)
SUPPORTED_BACKENDS = "KFP backend 2.5.0 to 2.17.x (Kubeflow 1.10 and later)"

# "2.5.0", "v2.5.0", "2.14.3-rc.1", "2.5.0+build.7", "2.5" (patch 0). Pre-release and build suffixes
# are ignored: an rc of 2.5.0 counts as 2.5.0 (the rules that matter are those of its release line).
_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?(?:[-+][0-9A-Za-z.+-]*)?$")


def parse_backend_version(tag: str | None) -> tuple[int, int, int] | None:
    """``(major, minor, patch)`` of a KFP tag name, or None when it is not a version ("unknown", "")."""
    match = _VERSION.match((tag or "").strip())
    if not match:
        return None
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def is_supported(version: tuple[int, int, int]) -> bool:
    return MIN_BACKEND <= tuple(version) and tuple(version[:2]) <= MAX_BACKEND


def format_version(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))
