"""onceforall.infra.store against a real S3 server (SeaweedFS on loopback, see conftest.py) and local
folders."""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from onceforall.infra import store
from onceforall.errors import UserError

CARD = "model_card.json"


def _make_tree(root: Path, tag: str = "v1") -> dict[str, bytes]:
    files = {"weights.bin": os.urandom(70_000), "sub/deep/table.json": json.dumps({"tag": tag}).encode(),
             "sub/empty.txt": b"", "notes.md": f"# {tag}\n".encode(),
             CARD: json.dumps({"card": tag}).encode()}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _keys(server, uri: str) -> set[str]:
    bucket, prefix = store.split_s3(uri)
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", [])}


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


@contextmanager
def _env(**env: str | None):
    """Set (or, with None, unset) environment variables and rebuild the store's client; undo after."""
    def apply(values: dict[str, str | None]) -> None:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        store.client.cache_clear()

    saved = {k: os.environ.get(k) for k in env}
    try:
        apply(env)
        yield
    finally:
        apply(saved)


# ------------------------------------------------------------------------------------------ URIs

def test_uri_parsing():
    assert store.is_s3("s3://bkt/a") and not store.is_s3("/tmp/a") and not store.is_s3(Path("s3://bkt"))
    assert store.split_s3("s3://bkt/a/b.json") == ("bkt", "a/b.json")
    assert store.split_s3("s3://bkt") == ("bkt", "")
    assert store.split_s3("s3://bkt/") == ("bkt", "")


@pytest.mark.parametrize("uri", ["s3://", "s3:///x", "s3://a/x", "s3://bad bucket/x", "/local/file"])
def test_malformed_s3_uri(uri):
    with pytest.raises(UserError, match="s3://bucket/prefix") as e:
        store.split_s3(uri)
    assert uri in str(e.value)


@pytest.mark.parametrize("uri", ["gs://bkt/x.json", Path("s3://bkt/x.json"), "s3:/bkt/x.json"])
def test_foreign_or_mangled_uri_is_not_a_local_path(uri, tmp_path):
    with pytest.raises(UserError, match="not a local path"):
        store.read_text(uri)
    with pytest.raises(UserError, match="not a local path"):
        store.publish_dir(tmp_path, uri)


# ---------------------------------------------------------------------------------------- s3 data

def test_publish_and_download_round_trip(s3_server, tmp_path):
    src = tmp_path / "src"
    files = _make_tree(src)
    dest = s3_server.bucket() + "/runs/r1/model"
    written = store.publish_dir(src, dest, last=CARD)
    assert written[-1] == f"{dest}/{CARD}" and len(written) == len(files)
    assert _keys(s3_server, dest) == set(files)

    out = store.download(dest, tmp_path / "dl")
    assert out == tmp_path / "dl"
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == set(files)
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data
    assert _tmp_files(out) == []

    # one object: lands as local_dir/<name>; a trailing slash or a sibling prefix does not confuse it
    one = store.download(f"{dest}/sub/deep/table.json", tmp_path / "one")
    assert one == tmp_path / "one" / "table.json" and one.read_bytes() == files["sub/deep/table.json"]
    slash = store.download(dest + "/", tmp_path / "slash")
    assert (slash / "weights.bin").read_bytes() == files["weights.bin"]
    with pytest.raises(UserError, match=r"no objects under s3://.*/runs/r1/mod/") as e:
        store.download(dest[:-2], tmp_path / "none")  # ".../mod" is a string prefix of ".../model" only
    assert dest[:-2] in str(e.value)


def test_text_and_exists(s3_server):
    uri = s3_server.bucket() + "/cards/card.json"
    assert not store.exists(uri)
    assert store.write_text(uri, '{"acc": 0.9}\n') == uri
    assert store.exists(uri) and store.read_text(uri) == '{"acc": 0.9}\n'
    assert store.exists(uri.rsplit("/", 1)[0] + "/") and not store.exists(uri.rsplit("/", 1)[0] + "x/")


def test_upload_file_into_a_prefix(s3_server, tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"onnx")
    bucket = s3_server.bucket()
    assert store.upload_file(f, bucket + "/exports/") == bucket + "/exports/model.onnx"
    assert store.read_text(bucket + "/exports/model.onnx") == "onnx"
    with pytest.raises(UserError, match="no such file"):
        store.upload_file(tmp_path / "missing.onnx", bucket + "/exports/")


def test_download_is_a_cache(s3_server, tmp_path):
    src = tmp_path / "src"
    files = _make_tree(src)
    dest = s3_server.bucket() + "/data"
    store.publish_dir(src, dest)
    gets = []

    def count(params, **kwargs):  # an observer on the client's own event hooks, not a mock
        gets.append(params["Key"])

    events = store.client().meta.events
    events.register("before-parameter-build.s3.GetObject", count)
    try:
        out = store.download(dest, tmp_path / "dl")
        assert len(gets) == len(files)
        inodes = {rel: (out / rel).stat().st_ino for rel in files}
        gets.clear()
        store.download(dest, tmp_path / "dl")
        assert gets == []  # nothing fetched again
        assert {rel: (out / rel).stat().st_ino for rel in files} == inodes  # nor rewritten

        (out / "weights.bin").write_bytes(b"truncated")  # a different size: fetched again
        store.download(dest, tmp_path / "dl")
        assert len(gets) == 1 and (out / "weights.bin").read_bytes() == files["weights.bin"]
    finally:
        events.unregister("before-parameter-build.s3.GetObject", count)


def test_large_file_goes_multipart(s3_server, tmp_path, monkeypatch):
    # S3's smallest part is 5 MiB: an 11 MiB file in 5 MiB parts makes 3 parts, in about a second
    monkeypatch.setattr(store, "MULTIPART_THRESHOLD", 5 * 2**20)
    monkeypatch.setattr(store, "MULTIPART_CHUNKSIZE", 5 * 2**20)
    big = tmp_path / "big.bin"
    data = os.urandom(11 * 2**20)
    big.write_bytes(data)
    bucket = s3_server.bucket()
    uri = store.upload_file(big, bucket + "/ckpt/big.bin")
    etag = s3_server.client().head_object(Bucket=bucket[5:], Key="ckpt/big.bin")["ETag"]
    assert etag.strip('"').endswith("-3"), etag  # a multipart ETag is md5-of-md5s + "-<parts>"
    assert store.download(uri, tmp_path / "dl").read_bytes() == data  # ranged GETs back


def test_failed_publish_leaves_no_card(s3_server, tmp_path):
    """The server refuses one file in the middle: what came before is there, the card is not."""
    bucket = s3_server.bucket()
    dest = bucket + "/pub"
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    _make_tree(v1, "v1")
    _make_tree(v2, "v2")
    store.publish_dir(v1, dest, last=CARD)
    assert store.exists(f"{dest}/{CARD}")

    # sorted order: notes.md, sub/deep/table.json, sub/empty.txt, weights.bin, then the card. The
    # server's IAM takes Allow statements only: this user may write every file of the folder but one.
    name = bucket[5:]
    writable = [f"arn:aws:s3:::{name}/pub/{rel}"
                for rel in ("notes.md", "sub/empty.txt", "weights.bin", CARD)]
    with s3_server.user([{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                          "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"]},
                         {"Effect": "Allow", "Action": ["s3:PutObject", "s3:DeleteObject"],
                          "Resource": writable}]) as (key, secret):
        with _env(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret):
            with pytest.raises(UserError, match="AccessDenied") as e:
                store.publish_dir(v2, dest, last=CARD)
    assert f"{dest}/sub/deep/table.json" in str(e.value)
    assert not store.exists(f"{dest}/{CARD}")  # removed first, never rewritten
    assert store.read_text(f"{dest}/notes.md") == "# v2\n"  # before the failure: new
    assert json.loads(store.read_text(f"{dest}/sub/deep/table.json")) == {"tag": "v1"}  # refused: old


# ------------------------------------------------------------------------------------------ errors

def test_missing_bucket(s3_server, tmp_path):
    (tmp_path / "f.txt").write_text("x")
    uri = "s3://no-such-bucket-here/a/f.txt"
    for call in (lambda: store.read_text(uri), lambda: store.exists(uri), lambda: store.write_text(uri, "x"),
                 lambda: store.download(uri, tmp_path / "dl"),
                 lambda: store.upload_file(tmp_path / "f.txt", uri),
                 lambda: store.publish_dir(tmp_path, "s3://no-such-bucket-here/a")):
        with pytest.raises(UserError, match="'no-such-bucket-here' does not exist") as e:
            call()
        assert "s3://no-such-bucket-here/a" in str(e.value) and "create the bucket" in str(e.value)
    with pytest.raises(UserError, match="no such object"):
        store.read_text(s3_server.bucket() + "/missing.json")


def test_wrong_credentials(s3_server):
    uri = s3_server.bucket() + "/x.json"
    store.write_text(uri, "{}")
    with _env(AWS_ACCESS_KEY_ID="no-such-key"):
        with pytest.raises(UserError, match=r"InvalidAccessKeyId.*AWS_ACCESS_KEY_ID") as e:
            store.read_text(uri)
        assert uri in str(e.value)
    with _env(AWS_SECRET_ACCESS_KEY="wrong"):
        with pytest.raises(UserError, match="SignatureDoesNotMatch.*bucket policy"):
            store.read_text(uri)
        with pytest.raises(UserError, match="SignatureDoesNotMatch"):
            store.write_text(uri, "overwritten?")
    assert store.read_text(uri) == "{}"  # the refused write changed nothing


def test_read_only_user_cannot_write(s3_server):
    """Keys that are valid but lack a permission: the server's own policy check refuses, per action."""
    bucket = s3_server.bucket()
    uri = bucket + "/x.json"
    store.write_text(uri, "{}")
    read_only = [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                  "Resource": [f"arn:aws:s3:::{bucket[5:]}", f"arn:aws:s3:::{bucket[5:]}/*"]}]
    with s3_server.user(read_only) as (key, secret), \
            _env(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret):
        assert store.read_text(uri) == "{}"
        with pytest.raises(UserError, match="AccessDenied.*bucket policy") as e:
            store.write_text(uri, "[]")
        assert uri in str(e.value)
    assert store.read_text(uri) == "{}"


def test_no_credentials(s3_server, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("")
    uri = s3_server.bucket() + "/x.json"
    with _env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_SESSION_TOKEN=None, AWS_PROFILE=None,
              AWS_SHARED_CREDENTIALS_FILE=str(empty), AWS_CONFIG_FILE=str(empty),
              AWS_WEB_IDENTITY_TOKEN_FILE=None, AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=None,
              AWS_CONTAINER_CREDENTIALS_FULL_URI=None,
              AWS_EC2_METADATA_DISABLED="true"):  # else a second is spent asking 169.254.169.254
        with pytest.raises(UserError, match="no AWS credentials.*AWS_ACCESS_KEY_ID") as e:
            store.read_text(uri)
    assert uri in str(e.value)
    with _env(AWS_PROFILE="no-such-profile"):
        with pytest.raises(UserError, match="no-such-profile.*AWS_PROFILE"):
            store.read_text(uri)


def test_unreachable_endpoint_fails_fast(s3_server):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with _env(AWS_ENDPOINT_URL=endpoint):
        start = time.monotonic()
        with pytest.raises(UserError, match="cannot reach") as e:
            store.read_text("s3://some-bucket/x.json")
        assert time.monotonic() - start < 5  # retried (5 attempts, 50 ms backoff base), not for minutes
    assert endpoint in str(e.value) and "s3://some-bucket/x.json" in str(e.value)
    assert "AWS_ENDPOINT_URL" in str(e.value)


def test_full_store_names_the_server_log(s3_server, tmp_path):
    from conftest import S3Server

    (tmp_path / "full").mkdir()
    full = S3Server(tmp_path / "full", volumes=2)  # its probe bucket takes one volume, a bucket the other
    full.start()
    try:
        first, second = full.bucket(), full.bucket()
        with _env(AWS_ENDPOINT_URL=full.endpoint):
            store.write_text(f"{first}/a.txt", "fits")
            with pytest.raises(UserError, match=r"object store failed \(InternalError") as e:
                store.write_text(f"{second}/a.txt", "no room")
            assert store.read_text(f"{first}/a.txt") == "fits"  # what was stored is still there
    finally:
        full.stop(hard=True)  # a full weed mini takes 30 s to honour SIGTERM
    assert f"{second}/a.txt" in str(e.value) and "server's log" in str(e.value)
    assert "no free volumes left" in full.log.read_text()


# ------------------------------------------------------------------------------------ local paths

def test_local_publish_is_atomic(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "published"
    files = _make_tree(src, "v1")
    assert store.publish_dir(src, dest, last=CARD)[-1] == str(dest / CARD)
    os.link(dest / "weights.bin", tmp_path / "reader_holds_v1")  # what a reader opened before
    new = _make_tree(src, "v2")
    store.publish_dir(src, dest, last=CARD)
    for rel, data in new.items():
        assert (dest / rel).read_bytes() == data
    # the file was replaced by a rename, not rewritten in place: the old inode still holds v1
    assert (tmp_path / "reader_holds_v1").read_bytes() == files["weights.bin"]
    assert _tmp_files(dest) == [] and _tmp_files(src) == []


def test_local_publish_failure_leaves_no_card(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "published"
    _make_tree(src, "v2")
    dest.mkdir()
    (dest / CARD).write_text("old card")
    (dest / "sub").write_text("a file where the publish needs a folder")
    with pytest.raises(OSError):
        store.publish_dir(src, dest, last=CARD)
    assert not (dest / CARD).exists()
    assert (dest / "notes.md").read_text() == "# v2\n"  # written before the failing file
    assert _tmp_files(dest) == []


def test_local_text_download_and_upload(tmp_path):
    path = tmp_path / "a" / "card.json"
    assert not store.exists(path)
    store.write_text(path, "{}")
    assert store.exists(path) and store.read_text(str(path)) == "{}"
    assert store.download(path, tmp_path / "unused") == path and not (tmp_path / "unused").exists()
    assert store.upload_file(path, tmp_path / "b") == str(tmp_path / "b")  # a new file named b
    (tmp_path / "dir").mkdir()
    assert store.upload_file(path, tmp_path / "dir") == str(tmp_path / "dir" / "card.json")
    assert _tmp_files(tmp_path) == []
    with pytest.raises(UserError, match="no such file"):
        store.read_text(tmp_path / "missing.json")
    with pytest.raises(UserError, match="no such file or folder"):
        store.download(tmp_path / "missing", tmp_path / "dl")
    with pytest.raises(UserError, match="no CARD|no model_card.json"):
        store.publish_dir(tmp_path / "dir", tmp_path / "out", last=CARD)
