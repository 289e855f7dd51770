"""A stand-in for the Kubernetes API server with Kubeflow Trainer installed, for tests/test_trainjob.py.

It serves the paths and shapes the real one does for what onceforall/training/trainjob.py calls: TrainJobs
(``/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs[/{name}]``: create, get, delete,
409 on a name taken, 404 ``Status`` on one missing), the job's pods (``/api/v1/namespaces/{ns}/pods``
by the JobSet label selector) and a pod's log (``.../pods/{name}/log?follow=true``, streamed until
the container ends). Its ``mode`` says what the "controller" does with a created job:

* ``run``: what the Trainer's torch runtime does, on loopback: one process per node running the
  job's ``trainer.command`` with the ``PET_*`` variables torchrun reads (PET_NNODES, PET_NODE_RANK,
  PET_NPROC_PER_NODE, PET_MASTER_ADDR=127.0.0.1, PET_MASTER_PORT) plus the job's ``env``; pods Running
  while they run, the job Complete when all exit 0, Failed when one does not.
* ``fail``: the job Failed with the JobSet's reason; ``pending``: pods Pending, unschedulable;
  ``vanish``: the job is deleted (by someone else) after the launcher has seen it once.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

JOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
UNSCHEDULABLE = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandIn:
    def __init__(self, mode: str, workdir: Path, python: str):
        self.mode, self.workdir, self.python = mode, workdir, python
        self.jobs: dict[str, dict] = {}
        self.created: list[dict] = []  # every body POSTed, as received
        self.deleted: list[str] = []
        self.requests: set[tuple[str, str, str]] = set()  # (API group, resource, RBAC verb) served
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        for job in self.jobs.values():
            self._kill(job)

    # -- the "controller" ------------------------------------------------------------------------
    def _start(self, job: dict) -> None:
        trainer = job["body"]["spec"]["trainer"]
        port, nodes = free_port(), trainer["numNodes"]
        job["procs"], job["logs"] = [], []
        for node in range(nodes):
            env = {**os.environ, **{e["name"]: e["value"] for e in trainer.get("env", []) if "value" in e},
                   "PET_NNODES": str(nodes), "PET_NODE_RANK": str(node),
                   "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                   "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
            log = self.workdir / f"{job['body']['metadata']['name']}-node-{node}.log"
            cmd = [self.python if c == "python" else c for c in trainer["command"]]
            with open(log, "wb") as out:
                job["procs"].append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
            job["logs"].append(log)

    def _kill(self, job: dict) -> None:
        for p in job.get("procs", []):
            if p.poll() is None:
                p.kill()
                p.wait()

    def _status(self, job: dict) -> dict:
        if self.mode == "fail":
            return {"conditions": [{"type": "Failed", "status": "True", "reason": "FailedJobs",
                                    "message": "jobset failed: job node-0 failed: BackoffLimitExceeded"}]}
        if self.mode != "run":
            return {}
        codes = [p.poll() for p in job["procs"]]
        if any(c not in (None, 0) for c in codes):
            return {"conditions": [{"type": "Failed", "status": "True", "reason": "FailedJobs",
                                    "message": f"node exit codes {codes}"}]}
        if all(c == 0 for c in codes):
            return {"conditions": [{"type": "Complete", "status": "True", "reason": "JobsCompleted",
                                    "message": "jobset completed successfully"}]}
        return {}

    def _pods(self, job: dict) -> list[dict]:
        name, pods = job["body"]["metadata"]["name"], []
        for node in range(job["body"]["spec"]["trainer"]["numNodes"]):
            status: dict = {"phase": "Running"}
            if self.mode == "pending":
                status = {"phase": "Pending", "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": UNSCHEDULABLE}]}
            elif self.mode == "run":
                code = job["procs"][node].poll()
                status = {"phase": "Running" if code is None else "Succeeded" if code == 0 else "Failed"}
            pods.append({"metadata": {"name": f"{name}-node-0-{node}-x7k2p", "namespace": "ofa",
                                      "labels": {"jobset.sigs.k8s.io/jobset-name": name,
                                                 "jobset.sigs.k8s.io/replicatedjob-name": "node",
                                                 "batch.kubernetes.io/job-completion-index": str(node)}},
                         "status": status})
        return pods

    # -- HTTP --------------------------------------------------------------------------------
    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _not_found(self, what: str) -> None:
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                 "message": f"{what} not found", "reason": "NotFound", "code": 404})

            def do_POST(self):
                standin.requests.add(("trainer.kubeflow.org", "trainjobs", "create"))
                m = JOBS.match(urlparse(self.path).path)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not m or m.group(2):
                    return self._not_found(self.path)
                name = body["metadata"]["name"]
                with standin.lock:
                    standin.created.append(body)
                    if name in standin.jobs:
                        message = f'trainjobs.trainer.kubeflow.org "{name}" already exists'
                        return self._send(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                "reason": "AlreadyExists", "code": 409, "message": message})
                    body["metadata"].update(uid=str(uuid.uuid4()), namespace=m.group(1),
                                            creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ"))
                    job = standin.jobs[name] = {"body": body, "gets": 0}
                    if standin.mode == "run":
                        standin._start(job)
                self._send(201, {**body, "status": {}})

            def do_GET(self):
                url = urlparse(self.path)
                if m := JOBS.match(url.path):
                    verb = "get" if m.group(2) else "list"
                    standin.requests.add(("trainer.kubeflow.org", "trainjobs", verb))
                    job = standin.jobs.get(m.group(2) or "")
                    if job is None:
                        return self._not_found(f'trainjobs.trainer.kubeflow.org "{m.group(2)}"')
                    job["gets"] += 1
                    if standin.mode == "vanish" and job["gets"] > 1:
                        standin.jobs.pop(m.group(2))
                        return self._not_found(f'trainjobs.trainer.kubeflow.org "{m.group(2)}"')
                    return self._send(200, {**job["body"], "status": standin._status(job)})
                if m := PODS.match(url.path):
                    standin.requests.add(("", "pods", "list"))
                    selector = parse_qs(url.query).get("labelSelector", [""])[0]
                    name = selector.split("jobset.sigs.k8s.io/jobset-name=")[-1]
                    job = standin.jobs.get(name)
                    items = standin._pods(job) if job else []
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {},
                                            "items": items})
                if m := LOG.match(url.path):
                    standin.requests.add(("", "pods/log", "get"))
                    return self._log(m.group(2))
                self._not_found(url.path)

            def _log(self, pod: str) -> None:
                job = next((j for n, j in standin.jobs.items() if pod.startswith(n)), None)
                if job is None or "logs" not in job:
                    return self._not_found(f'pods "{pod}"')
                node = int(pod.rsplit("-", 2)[-2])
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()  # no length: HTTP/1.0, the stream ends when the connection closes
                with open(job["logs"][node], "rb") as f:
                    while True:
                        chunk = f.read(4096)
                        if chunk:
                            self.wfile.write(chunk)
                            continue
                        if job["procs"][node].poll() is not None:
                            break
                        time.sleep(0.1)

            def do_DELETE(self):
                standin.requests.add(("trainer.kubeflow.org", "trainjobs", "delete"))
                m = JOBS.match(urlparse(self.path).path)
                job = standin.jobs.pop(m.group(2), None) if m and m.group(2) else None
                if job is None:
                    return self._not_found(self.path)
                standin._kill(job)
                standin.deleted.append(m.group(2))
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success",
                                 "details": {"name": m.group(2), "group": "trainer.kubeflow.org",
                                             "kind": "trainjobs", "uid": job["body"]["metadata"]["uid"]}})

        return Handler
