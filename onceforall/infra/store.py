"""Object storage: ``s3://bucket/prefix`` URIs through boto3, and plain local paths, behind one API.

Credentials, region and endpoint come from the standard AWS chain (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY or AWS_PROFILE, the shared config files, instance and pod roles;
AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 for MinIO, SeaweedFS or any other S3 server), so the same
code talks to AWS S3 and to a cluster's own store. Nothing is read at import time.

Writers never let a reader see half a result: local files are written to a temporary name in the
destination folder and renamed; a published folder's ``last`` file (its model card) is removed
first and written after everything else, so its presence means the rest is complete. Downloads are
written the same way and skip files already present with the same size, so a rerun is a cache hit.

Every boto/botocore failure comes out as a :class:`UserError` that names the URI and the fix.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator
from urllib.parse import urlparse

from ..errors import UserError

# Files larger than this go multipart, in parts of MULTIPART_CHUNKSIZE (S3 allows parts of 5 MiB
# to 5 GiB and at most 10,000 of them). Read when a transfer starts, so tests can lower them.
MULTIPART_THRESHOLD = 64 * 2**20
MULTIPART_CHUNKSIZE = 16 * 2**20

# Retries are botocore's "standard" mode: throttling, 5xx and connection errors are retried with
# jittered exponential backoff (50 ms base for non-throttling errors), 5 attempts in all, never
# forever. A refused connection (server down, wrong port) therefore fails in about a second; an
# endpoint that drops packets fails after at most 5 x CONNECT_TIMEOUT_S. READ_TIMEOUT_S bounds a
# stalled response, e.g. the reply to one 16 MiB part.
MAX_ATTEMPTS = 5
CONNECT_TIMEOUT_S = 3
READ_TIMEOUT_S = 60

_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{2,254}")
_CREDENTIALS_FIX = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"


def is_s3(uri: str | Path) -> bool:
    return isinstance(uri, str) and uri[:5].lower() == "s3://"


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; the key may be empty (a whole bucket)."""
    if not is_s3(uri):
        raise UserError("not an s3:// URI", source=str(uri), fix="write it as s3://bucket/prefix")
    bucket, _, key = uri[5:].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise UserError(f"bad bucket name {bucket!r}" if bucket else "no bucket name", source=uri,
                        fix="write it as s3://bucket/prefix (a bucket name is letters, digits, '.', '-')")
    return bucket, key


def _local(uri: str | Path) -> Path:
    text = str(uri)
    if "://" in text or text[:4].lower() == "s3:/":
        # Path("s3://b/k") silently becomes "s3:/b/k": catch it here rather than write a folder "s3:".
        raise UserError("not a local path or an s3:// URI", source=text,
                        fix="use s3://bucket/prefix (no Path() around it) or a local path")
    return Path(uri)


def join(uri: str | Path, *parts: str) -> str:
    """``uri`` + relative POSIX path parts, for either kind of location."""
    rel = "/".join(p.strip("/") for p in parts)
    if is_s3(uri):
        split_s3(str(uri))
        return f"{str(uri).rstrip('/')}/{rel}"
    return str(_local(uri) / rel)


def check_writable(uri: str | Path) -> None:
    """Fail now, with one clear line, if ``uri`` cannot take results (before hours of training)."""
    if not is_s3(uri):
        path = _local(uri)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the folder ({e.strerror})", source=str(path),
                            fix="choose a folder you can write to") from None
        if not os.access(path, os.W_OK):
            raise UserError("folder is not writable", source=str(path),
                            fix="choose a folder you can write to")
        return
    bucket, _ = split_s3(str(uri))
    with _s3_errors(str(uri), "checking the bucket"):
        client().head_bucket(Bucket=bucket)


# ---------------------------------------------------------------------------------------- client

def _is_aws(endpoint_url: str) -> bool:
    host = urlparse(endpoint_url).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def _config(custom_endpoint: bool):
    from botocore.config import Config

    extra = {}
    if custom_endpoint:
        # MinIO and SeaweedFS serve buckets as paths, not as DNS names. boto3 >= 1.36 also adds
        # CRC32 checksums to every upload as an aws-chunked trailer, which some of them store inside
        # the object (seaweedfs/seaweedfs#6548) or reject: only send checksums an operation requires.
        extra = dict(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                     response_checksum_validation="when_required")
    return Config(retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
                  connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S, **extra)


#: The variables of the pipeline's S3 Secret (pipelines/ofa_pipeline.py S3_SECRET_KEYS).
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")


def _drop_empty_aws_variables() -> None:
    """An empty AWS_* variable means unset. Pods take every key of the S3 Secret as a variable, and
    a deployment without static keys or an endpoint (IRSA on AWS) leaves those keys empty: a
    missing key would stall the pod on backends that drop `optional` (before KFP 2.15), and an
    empty endpoint or key would make boto3 fail instead of using the regional endpoint and role."""
    for name in SECRET_VARIABLES:
        if os.environ.get(name) == "":
            del os.environ[name]


@functools.lru_cache(maxsize=None)
def client(endpoint_url: str | None = None):
    """A boto3 S3 client from the standard AWS chain, cached per ``endpoint_url``.

    Without ``endpoint_url`` the endpoint is boto3's own choice (AWS_ENDPOINT_URL_S3,
    AWS_ENDPOINT_URL, the shared config file, else AWS). The cache keeps the credentials and
    endpoint seen at the first call: after changing them in the environment, call
    ``client.cache_clear()``.
    """
    import boto3

    _drop_empty_aws_variables()
    session = boto3.session.Session()  # one per client: the default session is not thread-safe
    s3 = session.client("s3", endpoint_url=endpoint_url, config=_config(endpoint_url is not None))
    if endpoint_url is None and not _is_aws(s3.meta.endpoint_url):
        # the environment or config file set a non-AWS endpoint: rebuild with its settings
        s3 = session.client("s3", config=_config(True))
    return s3


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    # "classic": the CRT client (chosen by "auto" on some instance types) raises other exceptions
    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE,
                          preferred_transfer_client="classic")


# ---------------------------------------------------------------------------------------- errors

def _root_cause(exc: BaseException) -> BaseException:
    """boto3's transfer errors wrap the botocore error that explains them: find that one."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        if isinstance(e, (BotoCoreError, ClientError)):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return exc


def _status(e) -> int | None:
    return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _user_error(exc: BaseException, uri: str, doing: str) -> UserError:
    from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError,
                                     NoCredentialsError, PartialCredentialsError, ProfileNotFound,
                                     ReadTimeoutError)

    e = _root_cause(exc)
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return UserError(f"no AWS credentials found while {doing}", source=uri, fix=_CREDENTIALS_FIX)
    if isinstance(e, ProfileNotFound):
        return UserError(f"{e} while {doing}", source=uri,
                         fix="set AWS_PROFILE to a profile of ~/.aws/config, or unset it")
    if isinstance(e, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
        endpoint = client().meta.endpoint_url  # built already: the request got as far as the network
        if isinstance(e, ReadTimeoutError):
            return UserError(f"the object store at {endpoint} stopped answering while {doing}", source=uri,
                             fix="check that the server is healthy, then retry")
        return UserError(f"cannot reach the object store at {endpoint} while {doing}", source=uri,
                         fix="check AWS_ENDPOINT_URL and that the server is up")
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = _status(e)
        if code == "NoSuchBucket":
            bucket = split_s3(uri)[0] if is_s3(uri) else "?"
            return UserError(f"bucket {bucket!r} does not exist (while {doing})", source=uri,
                             fix="create the bucket or correct the URI")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return UserError(f"no such object (while {doing})", source=uri, fix="correct the URI")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403") \
                or status == 403:
            return UserError(f"access denied ({code}) while {doing}", source=uri,
                             fix="check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                                 "AWS_PROFILE) and the bucket policy")
        detail = f"{code or status}: {err.get('Message', e)}"
        if isinstance(status, int) and status >= 500:
            return UserError(f"the object store failed ({detail}) while {doing}, after boto3's retries",
                             source=uri,
                             fix="the server's log says why; a full store is the usual cause (SeaweedFS "
                                 "logs 'no free volumes left': give its volume server a larger -volume.max)")
        return UserError(f"{detail} while {doing}", source=uri)
    return UserError(f"{e} while {doing}", source=uri)


@contextmanager
def _s3_errors(uri: str, doing: str) -> Iterator[None]:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError, Boto3Error) as e:
        raise _user_error(e, uri, doing) from e


# ------------------------------------------------------------------------------------ local files

@contextmanager
def _atomic_path(dest: Path) -> Iterator[Path]:
    """A temporary path next to ``dest``, renamed onto it if the block succeeds, removed if not."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_local(src: Path, dest: Path) -> None:
    import shutil

    with _atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def _source_file(local_path: str | Path) -> Path:
    src = _local(local_path)
    if not src.is_file():
        raise UserError("no such file", source=str(src), fix="check the path")
    return src


# ----------------------------------------------------------------------------------------- the API

def exists(uri: str | Path) -> bool:
    """Whether a file or folder (local), an object, or any object under a prefix ending in '/' (s3)
    exists. A missing bucket is an error, not False."""
    if not is_s3(uri):
        return _local(uri).exists()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        with _s3_errors(uri, "listing"):
            return client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("KeyCount", 0) > 0
    with _s3_errors(uri, "checking that it exists"):
        try:
            client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if _status(e) != 404:
                raise
        try:  # the 404 of a HEAD has no error code: tell a missing bucket apart
            client().head_bucket(Bucket=bucket)
        except ClientError as e:
            if _status(e) == 404:
                raise UserError(f"bucket {bucket!r} does not exist", source=str(uri),
                                fix="create the bucket or correct the URI") from e
            raise
    return False


def read_range(uri: str | Path, offset: int, length: int) -> bytes:
    """``length`` bytes of one file from ``offset`` (a member of a tar shard), local or s3."""
    if not is_s3(uri):
        path = _local(uri)
        if not path.is_file():
            raise UserError("no such file", source=str(path), fix="check the path")
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)
    bucket, key = split_s3(uri)
    with _s3_errors(uri, "reading"):
        return client().get_object(Bucket=bucket, Key=key,
                                   Range=f"bytes={offset}-{offset + length - 1}")["Body"].read()


@contextmanager
def open_stream(uri: str | Path) -> Iterator:
    """One file of any size, local (seekable) or s3 (read front to back), as a binary file object."""
    if not is_s3(uri):
        path = _local(uri)
        if not path.is_file():
            raise UserError("no such file", source=str(path), fix="check the path")
        with open(path, "rb") as f:
            yield f
        return
    bucket, key = split_s3(uri)
    with _s3_errors(uri, "reading"):
        body = client().get_object(Bucket=bucket, Key=key)["Body"]
    try:
        yield body
    finally:
        body.close()


def read_text(uri: str | Path) -> str:
    """The whole of a small text file (JSON, Markdown), local or s3, decoded as UTF-8."""
    if not is_s3(uri):
        path = _local(uri)
        if not path.is_file():
            raise UserError("no such file", source=str(path), fix="check the path")
        return path.read_text(encoding="utf-8")
    bucket, key = split_s3(uri)
    with _s3_errors(uri, "reading"):
        return client().get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")


def read_bytes(uri: str | Path) -> bytes:
    """The whole of one file, local or s3 (an image of a streamed dataset)."""
    if not is_s3(uri):
        path = _local(uri)
        if not path.is_file():
            raise UserError("no such file", source=str(path), fix="check the path")
        return path.read_bytes()
    bucket, key = split_s3(uri)
    with _s3_errors(uri, "reading"):
        return client().get_object(Bucket=bucket, Key=key)["Body"].read()


def write_text(uri: str | Path, text: str) -> str:
    """Write a small text file (UTF-8): one PUT on s3, temp file + rename locally. Returns ``uri``."""
    if not is_s3(uri):
        with _atomic_path(_local(uri)) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return str(uri)
    bucket, key = split_s3(uri)
    with _s3_errors(uri, "writing"):
        client().put_object(Bucket=bucket, Key=key, Body=text.encode("utf-8"))
    return uri


def remove(uri: str | Path) -> None:
    """Delete one file or object; one that is not there is no error."""
    if not is_s3(uri):
        _local(uri).unlink(missing_ok=True)
        return
    bucket, key = split_s3(str(uri))
    with _s3_errors(str(uri), "removing"):
        client().delete_object(Bucket=bucket, Key=key)


def upload_file(local_path: str | Path, uri: str | Path) -> str:
    """Copy one file to an object or local path (a ``uri`` ending in '/' is a folder to put it in).

    Files over MULTIPART_THRESHOLD go multipart, in parallel parts. Returns the destination.
    """
    src = _source_file(local_path)
    dest = str(uri)
    if dest.endswith("/") or (not is_s3(dest) and _local(dest).is_dir()):
        dest = join(dest, src.name)
    _put_file(src, dest)
    return dest


def _put_file(src: Path, dest: str) -> None:
    if not is_s3(dest):
        _copy_local(src, _local(dest))
        return
    bucket, key = split_s3(dest)
    if not key:
        raise UserError("no object key", source=dest, fix="write it as s3://bucket/key")
    with _s3_errors(dest, f"uploading {src}"):
        client().upload_file(str(src), bucket, key, Config=_transfer_config())


def _list_objects(uri: str, bucket: str, prefix: str) -> list[tuple[str, int]]:
    out = []
    with _s3_errors(uri, "listing"):
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [(o["Key"], o["Size"]) for o in page.get("Contents", [])
                    if not o["Key"].endswith("/")]  # "folder" marker objects of some consoles
    return out


def download(uri: str | Path, local_dir: str | Path) -> Path:
    """Make an s3 object or prefix available locally; returns the local file or folder.

    A prefix is copied recursively under ``local_dir`` (keys relative to the prefix), a single
    object to ``local_dir/<its name>``. Files already there with the object's size are kept (so a
    rerun downloads nothing; the check is by size only, which is enough for immutable run
    artifacts). A local ``uri`` is returned as it is, without copying.
    """
    if not is_s3(uri):
        path = _local(uri)
        if not path.exists():
            raise UserError("no such file or folder", source=str(path), fix="check the path")
        return path
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    local_dir = Path(local_dir)
    if key and not key.endswith("/"):
        # one object? A HEAD answers that without ListBucket permission; on 404/403 it may be a
        # prefix (or a missing bucket, or bad credentials): the listing below says which.
        with _s3_errors(uri, "looking it up"):
            try:
                size = client().head_object(Bucket=bucket, Key=key)["ContentLength"]
                target = local_dir / PurePosixPath(key).name
                _download_object(uri, bucket, key, size, target)
                return target
            except ClientError as e:
                if _status(e) not in (403, 404):
                    raise
    prefix = key.rstrip("/") + "/" if key else ""
    objects = _list_objects(uri, bucket, prefix)
    if not objects:
        raise UserError(f"no objects under s3://{bucket}/{prefix}", source=str(uri),
                        fix="correct the URI, or upload the data first")
    root = local_dir.resolve()
    for obj_key, size in objects:
        rel = PurePosixPath(obj_key[len(prefix):])
        target = (local_dir / rel).resolve()
        if ".." in rel.parts or not target.is_relative_to(root):
            raise UserError(f"object key {obj_key!r} would be written outside {local_dir}", source=str(uri),
                            fix="rename the object")
        _download_object(f"s3://{bucket}/{obj_key}", bucket, obj_key, size, local_dir / rel)
    return local_dir


def _download_object(uri: str, bucket: str, key: str, size: int, target: Path) -> None:
    if target.is_file() and target.stat().st_size == size:
        return
    with _s3_errors(uri, "downloading"), _atomic_path(target) as tmp:
        client().download_file(bucket, key, str(tmp), Config=_transfer_config())


def publish_dir(local_dir: str | Path, dest_uri: str | Path, *, last: str | None = None) -> list[str]:
    """Copy every file under ``local_dir`` (recursively) to a local folder or an s3 prefix.

    ``last`` (a path relative to ``local_dir``, e.g. "model_card.json") is removed from the
    destination first and written after every other file, so a reader that finds it finds a
    complete result; a publish that fails halfway leaves no ``last``. Returns the destinations
    written, in order.
    """
    src = _local(local_dir)
    join(dest_uri, "")  # a malformed destination fails before any work
    if not src.is_dir():
        raise UserError("no such folder", source=str(src), fix="check the path")
    rels = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if not p.is_dir())
    if not rels:
        raise UserError("nothing to publish: the folder is empty", source=str(src))
    if last is not None:
        if last not in rels:
            raise UserError(f"no {last} in the folder to publish", source=str(src),
                            fix=f"write {last} before publishing")
        rels = [r for r in rels if r != last] + [last]
        remove(join(dest_uri, last))
    written = []
    for rel in rels:
        written.append(join(dest_uri, rel))
        _put_file(src / rel, written[-1])
    return written


# ------------------------------------------------------------------------ conditional writes
# S3 conditional writes (If-None-Match: * creates only; If-Match: <ETag> replaces only that version)
# let publishers that never see each other agree on one small pointer object without a lock server.
# Local paths get the same semantics under an flock of the folder.

def read_versioned(uri: str | Path) -> tuple[str, str] | None:
    """A small text file and its version (S3: the ETag; local: sha256 of the bytes), or None if absent."""
    if not is_s3(uri):
        path = _local(uri)
        if not path.is_file():
            return None
        data = path.read_bytes()
        return data.decode("utf-8"), hashlib.sha256(data).hexdigest()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    with _s3_errors(str(uri), "reading"):
        try:
            obj = client().get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "NoSuchKey":
                raise
            return None
        return obj["Body"].read().decode("utf-8"), obj["ETag"]


def write_if(uri: str | Path, text: str, version: str | None) -> bool:
    """Compare-and-swap: write ``text`` only if the file is still at ``version`` (from
    :func:`read_versioned`; None: only if it does not exist). False if another writer came first."""
    if not is_s3(uri):
        return _write_if_local(_local(uri), text, version)
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
    with _s3_errors(str(uri), "writing"):
        try:
            client().put_object(Bucket=bucket, Key=key, Body=text.encode("utf-8"), **condition)
        except ClientError as e:
            # 412: the condition failed; 409: AWS's answer to two conditional writes racing
            if _status(e) in (409, 412):
                return False
            raise
    return True


def _write_if_local(path: Path, text: str, version: str | None) -> bool:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)  # a lock on the folder: no lock file left behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        now = read_versioned(path)
        if (now[1] if now else None) != version:
            return False
        with _atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return True
    finally:
        os.close(fd)  # releases the lock


def files_under(uri: str) -> list[str]:
    """Relative POSIX paths of every file under a local folder or an s3 prefix, sorted."""
    if not is_s3(uri):
        root = _local(uri)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/"
    return sorted(k[len(prefix):] for k, _ in _list_objects(uri, bucket, prefix))


def copy_dir(src_uri: str, dest_uri: str, *, last: str | None = None) -> list[str]:
    """Copy every file under ``src_uri`` to ``dest_uri``, both local or both s3 (server-side copies,
    nothing passes through this machine); ``last`` as in :func:`publish_dir`. Returns the destinations."""
    if is_s3(src_uri) != is_s3(dest_uri):
        raise UserError("cannot copy between a local folder and s3", source=f"{src_uri} -> {dest_uri}")
    rels = files_under(src_uri)
    if not rels:
        raise UserError("nothing to copy: no files there", source=src_uri)
    if last is not None:
        if last not in rels:
            raise UserError(f"no {last} to copy", source=src_uri, fix=f"write {last} first")
        rels = [r for r in rels if r != last] + [last]
        remove(join(dest_uri, last))
    written = []
    for rel in rels:
        written.append(join(dest_uri, rel))
        copy_file(join(src_uri, rel), written[-1])
    return written


def copy_file(src: str, dest: str) -> None:
    """Copy one file: local to local, or s3 to s3 server-side (multipart for large objects)."""
    if not is_s3(src):
        _copy_local(_local(src), _local(dest))
        return
    (sb, sk), (db, dk) = split_s3(src), split_s3(dest)
    with _s3_errors(dest, f"copying {src}"):
        client().copy({"Bucket": sb, "Key": sk}, db, dk, Config=_transfer_config())
