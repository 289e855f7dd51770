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
