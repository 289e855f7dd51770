"""Publishing a run (onceforall.infra.publish) against a real S3 server, with faults: the server killed in
the middle of an upload and restarted, a publish retried, an old run's retry after a newer run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from onceforall.infra import store
from onceforall.infra.publish import CARD, POINTER, REPORT_JSON, REPORT_MD, publish_run, release_name

TARGETS = ("edge", "phone")


def _run_output(root: Path, tag: str, model_bytes: int = 70_000) -> tuple[dict[str, Path], Path]:
    """What the report stage holds for one run: a folder per target and the report folder."""
    models = {}
    for name in TARGETS:
        folder = root / tag / name
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(os.urandom(model_bytes))
        (folder / "pareto.png").write_bytes(os.urandom(1000))
        (folder / CARD).write_text(json.dumps({"target": name, "run": tag}))
        models[name] = folder
    report = root / tag / "report"
    report.mkdir()
    (report / REPORT_MD).write_text(f"# {tag}\n")
    (report / REPORT_JSON).write_text(json.dumps({"run_id": tag}))
    return models, report


def _tree(uri: str) -> dict[str, bytes]:
    """Every file under a local folder or an s3 prefix, read back."""
    def read(rel: str) -> bytes:
        if not store.is_s3(uri):
            return Path(store.join(uri, rel)).read_bytes()
        bucket, key = store.split_s3(store.join(uri, rel))
        return store.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    return {rel: read(rel) for rel in store.files_under(uri)}


def _expect_current(pub: str, tag: str, models: dict[str, Path], report: Path) -> None:
    """current.json names ``tag``, and the fixed paths hold exactly that run's files."""
    assert json.loads(store.read_text(store.join(pub, POINTER)))["release"] == tag
    tree = _tree(pub)
    for name, folder in models.items():
        for f in folder.iterdir():
            assert tree[f"models/{name}/{f.name}"] == f.read_bytes(), (name, f.name)
            assert tree[f"releases/{tag}/models/{name}/{f.name}"] == f.read_bytes()
    for f in (REPORT_MD, REPORT_JSON):
        assert tree[f] == tree[f"releases/{tag}/{f}"] == (report / f).read_bytes()


@pytest.fixture(params=["local", "s3"])
def pub(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "published")
    return request.getfixturevalue("s3_server").bucket() + "/ofa"


def test_release_name():
    assert release_name("ofa-pipeline-2026 12/06") == "ofa-pipeline-2026-12-06"
    assert release_name("").startswith("local-") and release_name("") != release_name("")


def test_two_runs_publish_two_releases(pub, tmp_path):
    m1, r1 = _run_output(tmp_path, "run-1")
    m2, r2 = _run_output(tmp_path, "run-2")
    first = publish_run(pub, "run-1", m1, r1)
    assert first == {"release": store.join(pub, "releases", "run-1"), "current": True}
    _expect_current(pub, "run-1", m1, r1)
    assert publish_run(pub, "run-2", m2, r2)["current"]
    _expect_current(pub, "run-2", m2, r2)
    pointer = json.loads(store.read_text(store.join(pub, POINTER)))
    assert pointer["history"] == ["run-1"] and pointer["uri"] == store.join(pub, "releases", "run-2")
    # the earlier release is untouched
    assert _tree(store.join(pub, "releases", "run-1"))["models/edge/model.onnx"] == \
        (m1["edge"] / "model.onnx").read_bytes()


def test_retry_of_an_older_run_does_not_replace_a_newer_one(pub, tmp_path):
    m1, r1 = _run_output(tmp_path, "run-1")
    m2, r2 = _run_output(tmp_path, "run-2")
    publish_run(pub, "run-1", m1, r1)
    publish_run(pub, "run-2", m2, r2)
    again = publish_run(pub, "run-1", m1, r1)  # run-1's report task retried after run-2 published
    assert again == {"release": store.join(pub, "releases", "run-1"), "current": False,
                     "superseded_by": "run-2"}
    _expect_current(pub, "run-2", m2, r2)


def test_a_retry_of_the_same_run_uploads_nothing_again(pub, tmp_path):
    m1, r1 = _run_output(tmp_path, "run-1")
    publish_run(pub, "run-1", m1, r1)
    before = _tree(pub)
    (r1 / REPORT_JSON).write_text('{"run_id": "run-1", "rebuilt": true}')  # a retried stage's new report
    assert publish_run(pub, "run-1", m1, r1)["current"]
    assert _tree(pub) == before  # the sealed release stands; one copy, unchanged


def test_foreign_pointer_file_is_a_clear_error(tmp_path):
    from onceforall.errors import UserError

    m1, r1 = _run_output(tmp_path, "run-1")
    pub = tmp_path / "published"
    pub.mkdir()
    (pub / POINTER).write_text('{"version": 3}')
    with pytest.raises(UserError, match=f"{POINTER}: not a {POINTER} that ofa wrote.*another prefix"):
        publish_run(str(pub), "run-1", m1, r1)
    assert (pub / POINTER).read_text() == '{"version": 3}'


def test_write_if_is_compare_and_swap(pub):
    uri = store.join(pub, "pointer.json")
    assert store.read_versioned(uri) is None
    assert store.write_if(uri, "a", None)
    assert not store.write_if(uri, "b", None)  # create-only: it exists now
    text, v_a = store.read_versioned(uri)
    assert text == "a"
    assert store.write_if(uri, "c", v_a)
    assert not store.write_if(uri, "d", v_a)  # a stale version: another writer came first
    assert store.read_text(uri) == "c"


# ------------------------------------------------------------------ faults against the real server

@pytest.fixture
def s3_pub(s3_server, monkeypatch):
    """An s3 publish URI; models of 11 MiB go multipart in 5 MiB parts (3 parts each)."""
    monkeypatch.setattr(store, "MULTIPART_THRESHOLD", 5 * 2**20)
    monkeypatch.setattr(store, "MULTIPART_CHUNKSIZE", 5 * 2**20)
    yield s3_server.bucket() + "/ofa"
    s3_server.ensure_running()  # a fault test that failed halfway must not take the server from the rest


def _kill_server_on(s3_server, event: str, when):
    """Kill -9 the server from the client's own event hook the first time ``when(params)`` holds:
    the fault happens at a chosen request of a real upload (an observer, nothing is mocked)."""
    fired = []

    def hook(params, **kwargs):
        if not fired and when(params):
            fired.append(params.get("Key"))
            s3_server.stop(hard=True)

    store.client().meta.events.register(event, hook)
    return lambda: (store.client().meta.events.unregister(event, hook), fired)[1]


def _no_partial_objects(s3_server, pub: str) -> None:
    """A multipart upload that never completed leaves no object, and no object of a partial size."""
    bucket, key = store.split_s3(pub)
    for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", []):
        if o["Key"].endswith("model.onnx"):
            assert o["Size"] == 11 * 2**20, o


def test_server_killed_mid_upload_then_restarted(s3_server, s3_pub, tmp_path):
    from onceforall.errors import UserError

    m1, r1 = _run_output(tmp_path, "run-1", model_bytes=11 * 2**20)
    m2, r2 = _run_output(tmp_path, "run-2", model_bytes=11 * 2**20)
    publish_run(s3_pub, "run-1", m1, r1)
    # run-2 dies in the middle of its second model's upload, after some of its parts went in
    done = _kill_server_on(s3_server, "before-parameter-build.s3.UploadPart",
                           lambda p: "/phone/" in p["Key"] and p["PartNumber"] == 2)
    try:
        with pytest.raises(UserError, match="cannot reach the object store"):
            publish_run(s3_pub, "run-2", m2, r2)
    finally:
        fired = done()
    assert fired, "the fault was never injected"
    s3_server.start()  # same ports, same data folder
    # nothing of run-2 is visible as published; run-1 survived the crash and the restart, whole
    _expect_current(s3_pub, "run-1", m1, r1)
    assert not store.exists(store.join(s3_pub, "releases", "run-2", REPORT_JSON))
    assert not store.exists(store.join(s3_pub, "releases", "run-2", "models", "phone", CARD))
    _no_partial_objects(s3_server, s3_pub)
    # the stage's retry publishes run-2 completely, once
    assert publish_run(s3_pub, "run-2", m2, r2)["current"]
    _expect_current(s3_pub, "run-2", m2, r2)
    assert sorted(store.files_under(store.join(s3_pub, "releases"))) == sorted(
        f"{run}/{rel}" for run in ("run-1", "run-2")
        for rel in [REPORT_MD, REPORT_JSON] + [f"models/{t}/{f}" for t in TARGETS
                                                for f in ("model.onnx", "pareto.png", CARD)])


def test_server_killed_while_the_fixed_paths_are_refreshed(s3_server, s3_pub, tmp_path):
    from onceforall.errors import UserError

    m1, r1 = _run_output(tmp_path, "run-1")
    m2, r2 = _run_output(tmp_path, "run-2")
    publish_run(s3_pub, "run-1", m1, r1)
    # run-2's release is complete and current; the copy to models/phone/ dies before its model
    done = _kill_server_on(s3_server, "before-parameter-build.s3.CopyObject",
                           lambda p: p["Key"].endswith("models/phone/model.onnx"))
    try:
        with pytest.raises(UserError, match="cannot reach the object store"):
            publish_run(s3_pub, "run-2", m2, r2)
    finally:
        assert done()
    s3_server.start()
    assert json.loads(store.read_text(store.join(s3_pub, POINTER)))["release"] == "run-2"
    tree = _tree(s3_pub)
    assert f"models/phone/{CARD}" not in tree  # removed before its model changed: no card of another model
    assert tree[f"models/edge/{CARD}"] == (m2["edge"] / CARD).read_bytes()  # edge was done already
    # both releases are whole
    assert _tree(store.join(s3_pub, "releases", "run-1"))["models/phone/model.onnx"] == \
        (m1["phone"] / "model.onnx").read_bytes()
    assert publish_run(s3_pub, "run-2", m2, r2)["current"]  # the retry finishes the copy
    _expect_current(s3_pub, "run-2", m2, r2)
