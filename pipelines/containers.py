"""``ofa run --runner container``: every stage in the project's image, through podman.

kfp's ``DockerRunner`` starts one container per task through the Docker API; here podman serves
that API (``podman system service``) on a socket of its own, with the settings and the image storage
that ``scripts/build_image.sh`` (``make image``) wrote. Each stage runs as the image's own non-root
user, on the host network only, with the pipeline root (kfp mounts it at the same path) and the
local folders the run names (published output, a data folder) mounted at their own paths.

Platform code: only ``pipelines.local`` imports it, and only for this runner.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from onceforall.errors import UserError

# Where scripts/build_image.sh keeps podman's settings and image storage.
PODMAN_DIR = "/var/tmp/onceforall-podman"
# What a stage reads from the environment (S3 settings, the project's own variables, threads): the
# subprocess runner inherits all of it, a container only what is passed.
PASS_ENV_PREFIXES = ("AWS_", "OFA_")
PASS_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
READY_S = 30


def podman_dir() -> Path:
    return Path(os.environ.get("OFA_PODMAN_DIR", PODMAN_DIR))


@contextlib.contextmanager
def docker_api() -> Iterator[str]:
    """A Docker API endpoint for kfp: ``DOCKER_HOST`` if set, else podman's, started here and
    stopped on the way out. Yields the endpoint, set as ``DOCKER_HOST`` meanwhile (kfp's
    DockerRunner calls ``docker.from_env()`` for every task)."""
    if os.environ.get("DOCKER_HOST"):
        yield os.environ["DOCKER_HOST"]
        return
    conf = podman_dir()
    if shutil.which("podman") is None or not (conf / "containers.conf").is_file():
        raise UserError(f"no podman set up in {conf}", field="--runner container",
                        fix="run `make image` (scripts/build_image.sh) first, or set DOCKER_HOST to a "
                            "Docker API that has the image")
    sock_dir = Path(tempfile.mkdtemp(prefix="ofa-podman-"))
    endpoint = f"unix://{sock_dir}/podman.sock"
    env = {**os.environ, "CONTAINERS_CONF": str(conf / "containers.conf"),
           "CONTAINERS_STORAGE_CONF": str(conf / "storage.conf")}
    log = open(sock_dir / "podman.log", "w")
    service = subprocess.Popen(["podman", "system", "service", "--time=0", endpoint], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(endpoint, service, sock_dir / "podman.log")
        os.environ["DOCKER_HOST"] = endpoint
        yield endpoint
    finally:
        os.environ.pop("DOCKER_HOST", None)
        service.terminate()
        try:
            service.wait(timeout=20)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        log.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def _wait_ready(endpoint: str, service: subprocess.Popen, log: Path) -> None:
    import docker

    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise RuntimeError(f"podman system service exited ({service.returncode}): "
                               f"{log.read_text()[-2000:]}")
        with contextlib.suppress(docker.errors.DockerException, OSError):  # not listening yet
            with contextlib.closing(docker.DockerClient(base_url=endpoint)) as client:
                if client.ping():
                    return
        time.sleep(0.2)
    raise RuntimeError(f"podman's Docker API at {endpoint} did not answer within {READY_S} s")


def image_user(image: str) -> tuple[int, int]:
    """The numeric uid and gid the image runs as (its USER must be numeric and not root)."""
    import docker

    with contextlib.closing(docker.from_env()) as client:
        try:
            user = client.images.get(image).attrs["Config"].get("User") or "0"
        except docker.errors.ImageNotFound:
            raise UserError(f"no image {image} in {os.environ['DOCKER_HOST']}", field="--image",
                            fix="build it with `make image`, or name one that is there") from None
    uid, _, gid = user.partition(":")
    if not (uid.isdigit() and (gid or uid).isdigit()) or uid == "0":
        raise UserError(f"image {image} runs as user {user!r}", field="--image",
                        fix="use the project's image (USER 10001:10001), built by `make image`")
    return int(uid), int(gid or uid)


def runner(image: str, mounts: list[tuple[Path, bool]], label: str):
    """kfp's DockerRunner for ``image``: host network, the image's own user, ``mounts`` as
    (path, read_only) bound at their own paths, the stage-relevant environment passed through, every
    container labelled ``label`` (``stop_labelled`` ends what a failed or interrupted run left)."""
    import docker
    from kfp import local

    env = {k: v for k, v in os.environ.items() if k.startswith(PASS_ENV_PREFIXES) or k in PASS_ENV}
    binds = [docker.types.Mount(str(p), str(p), type="bind", read_only=ro) for p, ro in mounts]
    return local.DockerRunner(network_mode="host", environment=env, mounts=binds, labels={LABEL: label})


LABEL = "org.onceforall.run"


@contextlib.contextmanager
def stop_on_signal(label: str) -> Iterator[None]:
    """SIGINT or SIGTERM stops this run's containers, then interrupts the run. Without it kfp's
    worker thread keeps reading the running stage's log, so an interrupted run would end only when
    that stage did (and a terminated one would leave it running)."""
    def handler(signum, frame):
        stop_labelled(label)
        raise KeyboardInterrupt(f"signal {signum}: stopped the run's containers")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_labelled(label: str) -> None:
    """Stop the containers of this run that still run (kfp leaves a stage's container running when
    the run is interrupted)."""
    import docker

    with contextlib.closing(docker.from_env()) as client:
        for c in client.containers.list(filters={"label": f"{LABEL}={label}"}):
            c.stop(timeout=5)


@contextlib.contextmanager
def owned_by(paths: list[Path], uid: int, gid: int) -> Iterator[None]:
    """Hand ``paths`` (the folders stages write) to the image's user for the run, and everything in
    them back to their owner afterwards, whatever happened. Needs root: a rootful podman runs the
    image's uid as that uid on the host, so only ownership lets it write there."""
    if os.geteuid() != 0:
        raise UserError("the image's user must own the folders its stages write, which needs root",
                        field="--runner container", fix="run as root (sudo), or use --runner subprocess")
    owners = {p: (p.stat().st_uid, p.stat().st_gid) for p in paths}
    for p in paths:
        _chown_tree(p, uid, gid)
    try:
        yield
    finally:
        for p, (u, g) in owners.items():
            _chown_tree(p, u, g)


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    os.chown(top, uid, gid)
    for folder, dirs, files in os.walk(top):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)
