"""A training stage on many nodes: a Kubeflow Trainer TrainJob (``trainer.kubeflow.org/v1alpha1``).

Platform code, imported only by launch.run when a stage has ``nodes`` > 1. The launching pod (the
pipeline task) stages the stage's input checkpoints under ``<checkpoint_uri>/trainjob/inputs``,
creates a TrainJob that runs the project's image on every node under torchrun (the Trainer's torch
runtime tells each node its place through ``PET_*`` variables), follows it, and copies rank 0's
output folder back from ``<checkpoint_uri>/trainjob/output``. Rank 0 pushes every mid-phase
checkpoint to ``checkpoint_uri`` (durable.py) as in one pod, so a retried task's TrainJob continues
from the last one. The job carries an owner reference to the launching pod (garbage-collected with
it) and is deleted when the stage ends, whichever way.

Kubernetes client, not the Kubeflow SDK: the SDK's TrainerClient (kubeflow 0.5) takes environment
variables as plain strings only (the S3 credentials must come from the Secret as ``secretKeyRef``),
sets no owner references, and does not report why pods stay Pending; it would also add pydantic and
two API packages to the image for five REST calls. The ``kubernetes`` client is already pinned for
kfp (pyproject.toml: kubernetes>=28,<31). The RBAC this needs is manifests/base/rbac.yaml's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..infra import store
from ..errors import UserError
from .launch import Launch, run_rank, torchrun_command

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
# The labels JobSet puts on a TrainJob's pods (the Kubeflow SDK finds them the same way); rank 0
# runs in the pod of the `node` replicated job with completion index 0.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
RJOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
# The launching pod, from the downward API (pipelines/ofa_pipeline.py sets these on a multi-node task).
POD_NAME_ENV, POD_UID_ENV, POD_NAMESPACE_ENV = "OFA_POD_NAME", "OFA_POD_UID", "OFA_POD_NAMESPACE"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
PASSED_ENV = ("OFA_RUN_ID",)  # copied from the launching pod into every node


class TrainJobError(RuntimeError):
    """The TrainJob failed, was deleted, stayed unscheduled or ran past its time: the stage fails."""


# -- what the nodes run ------------------------------------------------------------------------

def staging_uri(spec: dict[str, Any]) -> str:
    uri = spec.get("checkpoint_uri")
    if not uri:
        raise UserError("a multi-node stage needs durable storage for its inputs, outputs and checkpoints",
                        field="checkpoint_uri",
                        fix="run the pipeline with an s3:// or minio:// pipeline root, or use nodes=1")
    return store.join(uri, "trainjob")


def remote_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec the nodes run: input folders uploaded to object storage, output sent back there."""
    staging = staging_uri(spec)
    inputs = {}
    for key in ("init", "teacher"):
        if spec.get(key):
            inputs[key] = store.join(staging, "inputs", key)
            store.publish_dir(spec[key], inputs[key])
    remote = {"inputs": inputs, "output": store.join(staging, "output"),
              "energy": store.join(staging, "energy")}
    return {**spec, "out_dir": "", "progress": True, "remote": remote}


def run_remote_rank(spec: dict[str, Any], remote: dict[str, Any]) -> None:
    """One rank on a TrainJob node: fetch the inputs, train, and (rank 0) upload the output folder.
    Every rank meters its own process and GPU and sends the reading to ``remote["energy"]``: the
    launching pod adds them to the stage's figure (energy.combine)."""
    import torch

    from ..infra.energy import Meter

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    work = Path(tempfile.mkdtemp(prefix=f"ofa-rank{rank}-"))
    for key, uri in remote["inputs"].items():
        spec[key] = str(_fetch_dir(uri, work / key))
    spec["out_dir"] = str(work / "out")
    with Meter(gpu_ids=[local] if torch.cuda.is_available() else None) as meter:
        run_rank(spec)
    if rank == 0:
        store.publish_dir(work / "out", remote["output"])
    if remote.get("energy"):
        reading = {"rank": rank, "node": socket.gethostname(), **meter.reading.to_dict()}
        store.write_text(store.join(remote["energy"], f"rank-{rank}.json"), json.dumps(reading))


def rank_energy(remote: dict[str, Any]) -> list[dict[str, Any]]:
    """The readings the job's ranks sent, in rank order."""
    uri = remote["energy"]
    got = [json.loads(store.read_text(store.join(uri, rel))) for rel in store.files_under(uri)]
    return sorted(got, key=lambda r: r["rank"])


def _clear_energy(remote: dict[str, Any]) -> None:
    """Readings an earlier job of this stage left (ranks write theirs when they finish, so nothing of
    the job about to be followed is lost)."""
    for rel in store.files_under(remote["energy"]):
        store.remove(store.join(remote["energy"], rel))


def _fetch_dir(uri: str, dest: Path) -> Path:
    """A copy of the folder at ``uri`` in ``dest`` (store.download leaves a local path where it is)."""
    got = store.download(uri, dest)
    if got.resolve() != dest.resolve():
        shutil.copytree(got, dest, dirs_exist_ok=True)
    return dest


def job_name(spec: dict[str, Any]) -> str:
    """One name per stage of a run (from its checkpoint URI): a retried task finds its own job."""
    digest = hashlib.sha1(spec["checkpoint_uri"].encode()).hexdigest()[:10]
    return f"ofa-{spec.get('phase', spec['stage'])}-{digest}"


def trainjob_body(name: str, spec: dict[str, Any], launch: Launch, owner: dict[str, str] | None) -> dict:
    """The TrainJob resource for ``spec`` (remote_spec's), its fields from the Trainer's CRD
    (trainer.kubeflow.org_trainjobs.yaml, v1alpha1)."""
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    env += [{"name": k, "value": os.environ[k]} for k in PASSED_ENV if os.environ.get(k)]
    if launch.s3_secret:
        env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": launch.s3_secret, "key": k}}}
                for k in store.SECRET_VARIABLES]
    requests = {k: v for k, v in (("cpu", launch.cpu), ("memory", launch.memory)) if v}
    limits = {"memory": launch.memory} if launch.memory else {}
    if launch.gpus_per_node:
        limits[launch.gpu_resource] = str(launch.gpus_per_node)
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/part-of": "onceforall-kfp"}}
    if owner:
        # not blockOwnerDeletion: that would need update on pods/finalizers
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": owner["name"],
                                        "uid": owner["uid"], "controller": False,
                                        "blockOwnerDeletion": False}]
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata,
        "spec": {
            "runtimeRef": {"name": launch.runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
            "trainer": {"image": launch.image, "command": worker_command(spec),
                        "env": env, "numNodes": launch.nodes, "numProcPerNode": launch.procs_per_node,
                        "resourcesPerNode": {"requests": requests, "limits": limits}},
        },
    }


def worker_command(spec: dict[str, Any], python: str = "python") -> list[str]:
    """Every node's command: torchrun, its place in the job from the Trainer's PET_* variables
    (``python``: the image's interpreter)."""
    return torchrun_command(spec, [], python=python)


# -- following the job -------------------------------------------------------------------------

def launching_pod() -> tuple[str, dict[str, str] | None]:
    """The namespace to create the job in, and the launching pod (None outside a pod)."""
    namespace = os.environ.get(POD_NAMESPACE_ENV, "")
    if not namespace and os.path.isfile(SA_NAMESPACE_FILE):
        namespace = Path(SA_NAMESPACE_FILE).read_text().strip()
    if not namespace:
        raise UserError("no namespace to create the TrainJob in", field=POD_NAMESPACE_ENV,
                        fix="run the stage in a pod, or set OFA_POD_NAMESPACE")
    name, uid = os.environ.get(POD_NAME_ENV, ""), os.environ.get(POD_UID_ENV, "")
    return namespace, ({"name": name, "uid": uid} if name and uid else None)


def kube_client():
    """An API client from the pod's service account, or from ~/.kube/config outside a cluster."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


@dataclass
class Follow:
    """Polling settings (the tests shorten them)."""

    poll_s: float = 5.0
    log_join_s: float = 10.0


def run(spec: dict[str, Any], launch: Launch, *, api_client=None, namespace: str | None = None,
        owner: dict[str, str] | None = None, follow: Follow = Follow()) -> list[dict[str, Any]]:
    """Run the stage as a TrainJob and copy rank 0's output folder to ``spec['out_dir']``; the
    ranks' energy readings (:func:`rank_energy`)."""
    from kubernetes import client

    if namespace is None:
        namespace, owner = launching_pod()
    if owner is None:
        log.warning("not in a pod (no %s/%s): the TrainJob gets no owner reference",
                    POD_NAME_ENV, POD_UID_ENV)
    remote = remote_spec(spec)
    api = api_client or kube_client()
    jobs, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    name = job_name(spec)
    _clear_energy(remote["remote"])
    submit(jobs, namespace, trainjob_body(name, remote, launch, owner))
    try:
        wait(jobs, core, namespace, name, launch, follow)
    finally:
        delete(jobs, namespace, name)
    _fetch_dir(remote["remote"]["output"], Path(spec["out_dir"]))
    return rank_energy(remote["remote"])


def submit(jobs, namespace: str, body: dict) -> None:
    """Create the job. A job of the same name left by an earlier try of this task is followed if it
    still runs (it continues the same checkpoints), and replaced if it has finished."""
    from kubernetes.client.exceptions import ApiException

    name = body["metadata"]["name"]
    try:
        jobs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        print(f"[trainjob] created TrainJob {namespace}/{name}: {body['spec']['trainer']['numNodes']} "
              f"nodes x {body['spec']['trainer']['numProcPerNode']} processes", flush=True)
        return
    except ApiException as e:
        if e.status != 409:
            raise _api_error(e, f"creating TrainJob {name}") from None
    old = jobs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    if _finished(old) is None:
        print(f"[trainjob] following TrainJob {namespace}/{name}, left running by an earlier try", flush=True)
        return
    delete(jobs, namespace, name)
    _wait_gone(jobs, namespace, name)
    jobs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    print(f"[trainjob] replaced the finished TrainJob {namespace}/{name} of an earlier try", flush=True)


def _api_error(e, doing: str) -> Exception:
    if e.status == 403:
        return UserError(f"the pipeline's service account may not do this ({doing}): {e.reason}",
                         field="service_account",
                         fix="apply manifests/base/rbac.yaml and run the pipeline as ofa-pipeline-runner")
    if e.status == 404:
        return UserError(f"the cluster has no TrainJob API ({doing}): {e.reason}", field="nodes",
                         fix="install Kubeflow Trainer (docs/deploy.md), or compile with --nodes 1")
    return TrainJobError(f"{doing}: HTTP {e.status} {e.reason}")


def _finished(job: dict) -> tuple[str, dict] | None:
    """("Complete" | "Failed", the condition) once the job has finished; None while it runs."""
    for cond in job.get("status", {}).get("conditions", []) or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond["type"], cond
    return None


def wait(jobs, core, namespace: str, name: str, launch: Launch, follow: Follow) -> None:
    """Until the job completes; raises TrainJobError when it fails, is deleted, stays unscheduled
    past ``launch.pending_timeout_s`` or runs past ``launch.timeout_s``. Rank 0's log is copied to
    this process's output meanwhile."""
    from kubernetes.client.exceptions import ApiException

    t0, streamer = time.monotonic(), None
    pending_since: float | None = t0
    try:
        while True:
            try:
                job = jobs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            except ApiException as e:
                if e.status == 404:
                    raise TrainJobError(f"TrainJob {namespace}/{name} was deleted while the stage "
                                        "waited for it") from None
                raise _api_error(e, f"reading TrainJob {name}") from None
            done = _finished(job)
            if done is not None:
                if done[0] == "Failed":
                    raise TrainJobError(f"TrainJob {namespace}/{name} failed: {done[1].get('reason', '')}: "
                                        f"{done[1].get('message', '')}")
                print(f"[trainjob] TrainJob {namespace}/{name} completed", flush=True)
                return
            try:
                pods = core.list_namespaced_pod(namespace, label_selector=f"{JOBSET_NAME_LABEL}={name}").items
            except ApiException as e:
                raise _api_error(e, f"listing the pods of TrainJob {name}") from None
            unscheduled = _unscheduled(job, pods, launch.nodes)
            now = time.monotonic()
            if unscheduled is None:
                pending_since = None
            elif pending_since is None:
                pending_since = now
            elif now - pending_since > launch.pending_timeout_s:
                raise TrainJobError(f"TrainJob {namespace}/{name} stayed unscheduled for "
                                    f"{launch.pending_timeout_s:g} s: {unscheduled}")
            streamer = _follow_rank0(core, namespace, pods, streamer)
            if now - t0 > launch.timeout_s:
                raise TrainJobError(f"TrainJob {namespace}/{name} ran past {launch.timeout_s:.0f} s")
            time.sleep(follow.poll_s)
    finally:
        if streamer is not None:
            streamer.join(follow.log_join_s)


def _unscheduled(job: dict, pods: list, nodes: int) -> str | None:
    """Why the job's pods are not all placed (the scheduler's reason), or None once they are."""
    if len(pods) < nodes:
        conditions = "; ".join(f"{c.get('type')}={c.get('status')} {c.get('reason', '')}: "
                               f"{c.get('message', '')}"
                               for c in job.get("status", {}).get("conditions", []) or [])
        return f"{len(pods)} of {nodes} node pods created (TrainJob conditions: {conditions or 'none'})"
    for pod in pods:
        if pod.status.phase != "Pending":
            continue
        for cond in pod.status.conditions or []:
            if cond.type == "PodScheduled" and cond.status == "False":
                return f"pod {pod.metadata.name}: {cond.reason}: {cond.message}"
    return None


def _rank0(pods: list):
    for pod in pods:
        labels = pod.metadata.labels or {}
        if labels.get(RJOB_LABEL) == "node" and labels.get(INDEX_LABEL) == "0":
            return pod
    return None


def _follow_rank0(core, namespace: str, pods: list, streamer: threading.Thread | None):
    """Start copying rank 0's log once its pod runs (again, for a new pod after a restart)."""
    pod = _rank0(pods)
    if pod is None or pod.status.phase not in ("Running", "Succeeded", "Failed"):
        return streamer
    if streamer is not None and (streamer.is_alive() or streamer.name == pod.metadata.name):
        return streamer
    thread = threading.Thread(target=_copy_log, args=(core, namespace, pod.metadata.name),
                              name=pod.metadata.name, daemon=True)
    thread.start()
    return thread


def _copy_log(core, namespace: str, pod: str) -> None:
    try:
        resp = core.read_namespaced_pod_log(pod, namespace, follow=True, _preload_content=False)
        for chunk in resp.stream(4096):
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
    except Exception as e:  # noqa: BLE001 - the log is a convenience; the job's status decides
        print(f"[trainjob] stopped following {pod}'s log: {e}", flush=True)


def delete(jobs, namespace: str, name: str) -> None:
    """Delete the job and its pods (background propagation); a job already gone is fine."""
    from kubernetes.client.exceptions import ApiException

    try:
        jobs.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                             body={"propagationPolicy": "Background"})
        print(f"[trainjob] deleted TrainJob {namespace}/{name}", flush=True)
    except ApiException as e:
        if e.status != 404:
            log.warning("could not delete TrainJob %s/%s: HTTP %s %s", namespace, name, e.status, e.reason)


def _wait_gone(jobs, namespace: str, name: str, timeout_s: float = 120.0) -> None:
    from kubernetes.client.exceptions import ApiException

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            jobs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return
            raise
        time.sleep(1.0)
    raise TrainJobError(f"the earlier try's TrainJob {namespace}/{name} was not gone after {timeout_s:.0f} s")

