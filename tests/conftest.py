import os

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


class S3Server:
    """A moto S3 server on loopback: its endpoint, and buckets made on demand."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self._made = 0

    def client(self):
        """A client with the fixture's own test credentials, whatever a test did to the environment."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh name unless given) and return its ``s3://name`` URI."""
        self._made += 1
        name = name or f"test-bucket-{self._made}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint (moto) on a free port, with the AWS variables of os.environ pointing
    at it for the whole session (so subprocesses inherit them); restored afterwards."""
    import logging

    from moto.server import ThreadedMotoServer

    from onceforall import store

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()  # the port the OS picked for port=0
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           # these would win over the ones above: keep the user's own settings out of the tests
           "AWS_ENDPOINT_URL_S3": None, "AWS_PROFILE": None, "AWS_SESSION_TOKEN": None}
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    store.client.cache_clear()
    try:
        yield S3Server(env["AWS_ENDPOINT_URL"])
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
