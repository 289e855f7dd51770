"""Submitting to Kubeflow Pipelines, against a stand-in KFP v2beta1 REST server (the project's only mock).

The stand-in implements just what kfp.Client 2.17.3 calls for submit/schedule, keeps its state in memory
and records every request, so the tests assert the real HTTP calls and payloads kfp sends.
No `from __future__ import annotations` here: kfp's @dsl.component reads the annotations as types.
"""

import email.parser
import email.policy
import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import pytest

from onceforall.errors import UserError
from onceforall_pipelines import cluster

API = "/apis/v2beta1"


# ------------------------------------------------------------------------------------- stand-in server

@dataclass
class Req:
    method: str
    path: str
    query: dict
    json: object = None
    files: dict = field(default_factory=dict)  # form field -> (filename, bytes)
    headers: dict = field(default_factory=dict)


class StandInKFP(ThreadingHTTPServer):
    """In-memory KFP v2beta1 API: healthz, experiments, pipelines (+upload, versions), runs, recurringruns."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[Req] = []
        self.experiments: list[dict] = []
        self.pipelines: list[dict] = []
        self.versions: list[dict] = []
        self.runs: dict[str, dict] = {}
        self.recurring: list[dict] = []
        self.multi_user = False
        self.tag_name = "2.5.0"  # the API server's TAG_NAME (Kubeflow 1.10's KFP)
        self.via_ui = False  # answer healthz as ml-pipeline-ui does (apiServerTagName), not the API server
        self.run_states = ["RUNNING", "SUCCEEDED"]  # what GET /runs/{id} answers, one per poll, last repeats
        self.faults: list[tuple] = []  # (path prefix, status, body bytes, headers)
        self.delays: dict[str, float] = {}  # path -> seconds to wait before answering
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fail(self, status: int, prefix: str = API, body: bytes = b"", headers: dict | None = None):
        self.faults.append((prefix, status, body, headers or {}))

    def calls(self, method: str, path: str) -> list[Req]:
        return [r for r in self.requests if r.method == method and r.path == path]

    def new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}"

    def handle_error(self, request, client_address):  # a client that timed out and left: not an error
        pass


def _matches(item: dict, filter_json: str | None) -> bool:
    if not filter_json:
        return True
    for p in json.loads(filter_json).get("predicates", []):
        assert p.get("operation") in (1, "EQUALS"), p
        if item.get(p["key"]) != p.get("stringValue", p.get("string_value")):
            return False
    return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stalls
    server: StandInKFP

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, obj=None, raw: bytes | None = None, headers: dict | None = None,
              ctype: str = "application/json"):
        data = raw if raw is not None else json.dumps(obj if obj is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> Req:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        req = Req(self.command, url.path, dict(parse_qsl(url.query, keep_blank_values=True)),
                  headers={k.lower(): v for k, v in self.headers.items()})
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("multipart/form-data"):
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
            for part in msg.iter_parts():
                req.files[part.get_param("name", header="content-disposition")] = (
                    part.get_filename(), part.get_payload(decode=True))
        elif body:
            req.json = json.loads(body)
        with self.server._lock:
            self.server.requests.append(req)
        return req

    def do_GET(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def _handle(self):
        req = self._record()
        s = self.server
        time.sleep(s.delays.get(req.path, 0))
        for prefix, status, body, headers in s.faults:
            if req.path.startswith(prefix):
                return self._send(status, raw=body or json.dumps({"error": "nope", "code": 16,
                                                                   "message": "nope"}).encode(),
                                  headers=headers)
        with s._lock:
            self._route(req, s)

    def _route(self, req: Req, s: StandInKFP):
        m, path, q = req.method, req.path, req.query
        if (m, path) == ("GET", f"{API}/healthz"):  # the shapes of apiserver/main.go and the UI's healthz.ts
            if s.via_ui:
                return self._send(200, {"apiServerCommitHash": "abc", "apiServerTagName": s.tag_name,
                                        "apiServerMultiUser": s.multi_user, "multi_user": s.multi_user,
                                        "apiServerReady": True, "frontendTagName": s.tag_name})
            return self._send(200, {"commit_sha": "abc", "tag_name": s.tag_name, "multi_user": s.multi_user,
                                    "pipeline_store": "database"})  # pipeline_store: 2.17 and newer
        if (m, path) == ("GET", f"{API}/experiments"):
            found = [e for e in s.experiments if _matches(e, q.get("filter"))
                     and (not q.get("namespace") or e.get("namespace") == q["namespace"])]
            return self._send(200, {"experiments": found, "total_size": len(found)} if found else {})
        if (m, path) == ("POST", f"{API}/experiments"):
            exp = {**req.json, "experiment_id": s.new_id("exp"), "storage_state": "AVAILABLE"}
            s.experiments.append(exp)
            return self._send(200, exp)
        if (m, path) == ("GET", f"{API}/pipelines"):
            found = [p for p in s.pipelines if _matches(p, q.get("filter"))]
            return self._send(200, {"pipelines": found, "total_size": len(found)} if found else {})
        if (m, path) == ("POST", f"{API}/pipelines/upload"):
            name = q.get("display_name") or q["name"]
            pipe = {"pipeline_id": s.new_id("pipe"), "name": q["name"], "display_name": name}
            if q.get("namespace"):
                pipe["namespace"] = q["namespace"]
            s.pipelines.append(pipe)
            s.versions.append({"pipeline_id": pipe["pipeline_id"], "pipeline_version_id": s.new_id("ver"),
                               "name": q["name"], "display_name": name})  # KFP names version 1 after it
            return self._send(200, pipe)
        if (m, path) == ("POST", f"{API}/pipelines/upload_version"):
            if not any(p["pipeline_id"] == q.get("pipelineid") for p in s.pipelines):
                return self._send(404, {"error": "pipeline not found", "code": 5, "message": "not found"})
            ver = {"pipeline_id": q["pipelineid"], "pipeline_version_id": s.new_id("ver"),
                   "name": q["name"], "display_name": q.get("display_name") or q["name"]}
            s.versions.append(ver)
            return self._send(200, ver)
        if m == "GET" and path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
            pid = path.split("/")[4]
            found = [v for v in s.versions if v["pipeline_id"] == pid and _matches(v, q.get("filter"))]
            if q.get("sort_by") == "created_at desc":
                found = found[::-1]
            found = found[:int(q.get("page_size") or 10)]
            return self._send(200, {"pipeline_versions": found, "total_size": len(found)} if found else {})
        if (m, path) == ("POST", f"{API}/runs"):
            run = {**req.json, "run_id": s.new_id("run"), "state": "PENDING", "_polls": 0}
            s.runs[run["run_id"]] = run
            return self._send(200, {k: v for k, v in run.items() if not k.startswith("_")})
        if m == "GET" and path.startswith(f"{API}/runs/"):
            run = s.runs.get(path.rsplit("/", 1)[1])
            if run is None:
                return self._send(404, {"error": "run not found", "code": 5, "message": "run not found"})
            run["state"] = s.run_states[min(run["_polls"], len(s.run_states) - 1)]
            run["_polls"] += 1
            if run["state"] == "FAILED":
                run["error"] = {"code": 2, "message": "task train-teacher failed"}
            return self._send(200, {k: v for k, v in run.items() if not k.startswith("_")})
        if (m, path) == ("POST", f"{API}/recurringruns"):
            job = {**req.json, "recurring_run_id": s.new_id("job"), "status": "ENABLED"}
            s.recurring.append(job)
            return self._send(200, job)
        return self._send(404, {"error": "Not Found", "code": 5, "message": f"no route {m} {path}"})


@pytest.fixture
def kfp_server(tmp_path, monkeypatch):
    import kfp

    # hermetic: no ~/.config/kfp/context.json (kfp reads a namespace from it), no token from the env
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH", raising=False)
    monkeypatch.setattr(cluster, "DEFAULT_TOKEN_PATH", str(tmp_path / "no-token"))
    server = StandInKFP()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A tiny compiled pipeline: a (required int), b (float, default), label (str, default)."""
    from kfp import compiler, dsl

    @dsl.component(install_kfp_package=False, base_image="python:3.11")
    def add(a: int, b: float) -> float:
        return a + b

    @dsl.pipeline(name="tiny")
    def tiny(a: int, b: float = 1.5, label: str = "x"):
        add(a=a, b=b)

    path = tmp_path_factory.mktemp("pkg") / "tiny.yaml"
    compiler.Compiler().compile(tiny, str(path))
    return path


def _nolog(line: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------ submit

def test_first_submit_creates_experiment_pipeline_and_run(kfp_server, package, capsys):
    lines = []
    out = cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 3, "label": "hi"},
                         service_account="ofa-pipeline-runner", log=lines.append)
    assert capsys.readouterr().out == ""  # kfp's own "... details:" prints are muted; only `log` speaks
    s = kfp_server
    assert s.calls("GET", f"{API}/healthz")  # one health check, no retry loop
    assert len(s.calls("POST", f"{API}/experiments")) == 1
    assert s.calls("POST", f"{API}/experiments")[0].json["display_name"] == "onceforall"
    (up,) = s.calls("POST", f"{API}/pipelines/upload")
    assert up.query["name"] == "ofa"
    assert up.files["uploadfile"] == ("tiny.yaml", package.read_bytes())
    assert not s.calls("POST", f"{API}/pipelines/upload_version")
    (run,) = s.calls("POST", f"{API}/runs")
    body = run.json
    assert body["experiment_id"] == out["experiment_id"] == s.experiments[0]["experiment_id"]
    assert body["pipeline_version_reference"] == {"pipeline_id": out["pipeline_id"],
                                                  "pipeline_version_id": out["version_id"]}
    assert out["version_id"] == s.versions[0]["pipeline_version_id"]
    assert body["runtime_config"]["parameters"] == {"a": 3, "label": "hi"}
    assert body["service_account"] == "ofa-pipeline-runner"  # the least-privilege SA of manifests/
    assert "pipeline_spec" not in body  # the run refers to the uploaded version, not an inline spec
    assert body["display_name"].startswith("ofa ")
    assert out["run_id"] in s.runs and not s.calls("GET", f"{API}/runs/{out['run_id']}")  # no wait
    url = f"{s.url}/#/runs/details/{out['run_id']}"
    assert out["run_url"] == url and any(url in line for line in lines)
    assert "state" not in out
    assert "authorization" not in run.headers


def test_second_submit_reuses_experiment_and_uploads_new_version(kfp_server, package):
    s = kfp_server
    first = cluster.submit(s.url, package, pipeline_name="ofa", params={"a": 1}, log=_nolog)
    second = cluster.submit(s.url, package, pipeline_name="ofa", params={"a": 2}, run_name="again",
                            log=_nolog)
    assert len(s.calls("POST", f"{API}/experiments")) == 1
    assert second["experiment_id"] == first["experiment_id"]
    assert len(s.calls("POST", f"{API}/pipelines/upload")) == 1
    (upv,) = s.calls("POST", f"{API}/pipelines/upload_version")
    assert upv.query["pipelineid"] == first["pipeline_id"]
    assert upv.files["uploadfile"][1] == package.read_bytes()
    import hashlib

    sha = hashlib.sha256(package.read_bytes()).hexdigest()
    assert upv.query["name"].startswith(sha[:12] + "-") and upv.query["name"] == second["version_name"]
    assert second["pipeline_id"] == first["pipeline_id"] and second["version_id"] != first["version_id"]
    run2 = s.calls("POST", f"{API}/runs")[1].json
    assert run2["display_name"] == "again"
    assert run2["pipeline_version_reference"]["pipeline_version_id"] == second["version_id"]
    assert run2["runtime_config"]["parameters"] == {"a": 2}


def test_named_version_is_reused_not_uploaded_twice(kfp_server, package):
    s = kfp_server
    cluster.submit(s.url, package, pipeline_name="ofa", params={"a": 1}, log=_nolog)
    v1 = cluster.submit(s.url, package, pipeline_name="ofa", params={"a": 1}, version="v1", log=_nolog)
    again = cluster.submit(s.url, package, pipeline_name="ofa", params={"a": 1}, version="v1",
                           log=_nolog)
    assert len(s.calls("POST", f"{API}/pipelines/upload_version")) == 1
    assert again["version_id"] == v1["version_id"] and again["version_name"] == "v1"
    assert s.calls("GET", f"{API}/pipelines/{v1['pipeline_id']}/versions")[-1].query["filter"]
    assert len(s.calls("POST", f"{API}/runs")) == 3


def test_wait_polls_until_terminal_state(kfp_server, package):
    lines = []
    out = cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, wait=True,
                         poll_s=0.05, log=lines.append)
    assert out["state"] == "SUCCEEDED"
    assert len(kfp_server.calls("GET", f"{API}/runs/{out['run_id']}")) == 2  # RUNNING, then SUCCEEDED
    assert any("RUNNING" in line for line in lines) and any("SUCCEEDED" in line for line in lines)


def test_wait_ends_on_canceled_and_reports_failure(kfp_server, package):
    # kfp.Client.wait_for_run_completion only stops on succeeded/failed/skipped/error: CANCELED would hang
    kfp_server.run_states = ["CANCELING", "CANCELED"]
    out = cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, wait=True,
                         poll_s=0.05, log=_nolog)
    assert out["state"] == "CANCELED"
    kfp_server.run_states = ["FAILED"]
    out = cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, wait=True,
                         poll_s=0.05, log=_nolog)
    assert out["state"] == "FAILED" and "train-teacher" in out["error"]


def test_wait_timeout_returns_last_state(kfp_server, package):
    kfp_server.run_states = ["RUNNING"]
    t0 = time.monotonic()
    out = cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, wait=True,
                         timeout_s=0.3, poll_s=0.05, log=_nolog)
    assert out["state"] == "RUNNING" and out["timed_out"] is True
    assert time.monotonic() - t0 < 5


def test_params_are_checked_and_converted_before_any_request(kfp_server, package):
    s = kfp_server
    with pytest.raises(UserError, match="unknown pipeline parameter.*nope") as e:
        cluster.submit(s.url, package, pipeline_name="ofa", params={"a": 1, "nope": 2}, log=_nolog)
    assert "a, b, label" in e.value.fix
    with pytest.raises(UserError, match="required pipeline parameter.*: a"):
        cluster.submit(s.url, package, pipeline_name="ofa", params={"b": 2.0}, log=_nolog)
    with pytest.raises(UserError) as e:
        cluster.submit(s.url, package, pipeline_name="ofa", params={"a": "three"}, log=_nolog)
    assert e.value.field == "params.a" and "integer" in str(e.value)
    assert s.requests == []
    # strings from a command line become the declared types
    cluster.submit(s.url, package, pipeline_name="ofa", params={"a": "3", "b": "0.25"}, log=_nolog)
    assert s.calls("POST", f"{API}/runs")[0].json["runtime_config"]["parameters"] == {"a": 3, "b": 0.25}


def test_token_is_sent_as_bearer(kfp_server, package, tmp_path, monkeypatch):
    cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, token="tok-1",
                   log=_nolog)
    assert {r.headers.get("authorization") for r in kfp_server.requests} == {"Bearer tok-1"}
    token_file = tmp_path / "token"
    token_file.write_text("tok-from-file\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, log=_nolog)
    assert kfp_server.requests[-1].headers["authorization"] == "Bearer tok-from-file"


def test_multi_user_needs_a_namespace_and_uses_it(kfp_server, package):
    s = kfp_server
    s.multi_user = True
    with pytest.raises(UserError, match="multi-user") as e:
        cluster.submit(s.url, package, pipeline_name="ofa", params={"a": 1}, log=_nolog)
    assert e.value.field == "namespace" and "--namespace" in e.value.fix
    cluster.submit(s.url, package, pipeline_name="ofa", params={"a": 1}, namespace="team-a", log=_nolog)
    assert s.calls("POST", f"{API}/experiments")[0].json["namespace"] == "team-a"
    assert s.calls("GET", f"{API}/experiments")[-1].query["namespace"] == "team-a"
    assert s.calls("POST", f"{API}/pipelines/upload")[0].query["namespace"] == "team-a"


# ---------------------------------------------------------------------------------------------- schedule

def test_schedule_creates_enabled_recurring_run_in_6_field_cron(kfp_server, package):
    s = kfp_server
    lines = []
    out = cluster.schedule(s.url, package, pipeline_name="ofa", cron="0 2 * * *", params={"a": 5},
                           max_concurrency=2, service_account="ofa-pipeline-runner", log=lines.append)
    (req,) = s.calls("POST", f"{API}/recurringruns")
    body = req.json
    assert body["service_account"] == "ofa-pipeline-runner"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 2 * * *"}}
    assert int(body["max_concurrency"]) == 2
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"  # v2beta1 field; the server answers status ENABLED
    assert body["experiment_id"] == out["experiment_id"]
    assert body["pipeline_version_reference"] == {"pipeline_id": out["pipeline_id"],
                                                  "pipeline_version_id": out["version_id"]}
    assert body["runtime_config"]["parameters"] == {"a": 5}
    assert body["display_name"] == "ofa (0 2 * * *)"
    assert out["cron"] == "0 0 2 * * *" and out["recurring_run_id"] == s.recurring[0]["recurring_run_id"]
    assert s.recurring[0]["status"] == "ENABLED"
    assert any(f"/#/recurringrun/details/{out['recurring_run_id']}" in line for line in lines)
    assert not s.calls("POST", f"{API}/runs")


def test_schedule_rejects_bad_cron_and_concurrency_before_any_request(kfp_server, package):
    with pytest.raises(UserError, match="hour field '25'") as e:
        cluster.schedule(kfp_server.url, package, pipeline_name="ofa", cron="0 25 * * *", params={"a": 1},
                         log=_nolog)
    assert e.value.field == "cron"
    with pytest.raises(UserError) as e:
        cluster.schedule(kfp_server.url, package, pipeline_name="ofa", cron="@daily", params={"a": 1},
                         max_concurrency=0, log=_nolog)
    assert e.value.field == "max_concurrency"
    assert kfp_server.requests == []


# -------------------------------------------------------------------------------------------------- cron

@pytest.mark.parametrize("expr, expected", [
    ("0 2 * * *", "0 0 2 * * *"),
    ("*/15 * * * *", "0 */15 * * * *"),
    ("30 0 9 ? * MON-FRI", "30 0 9 ? * MON-FRI"),
    ("0 0 1,15 jan,jul *", "0 0 0 1,15 jan,jul *"),
    ("  0   6-18/2 * * 1-5 ", "0 0 6-18/2 * * 1-5"),
    ("5/10 * * * * *", "5/10 * * * * *"),
    ("@daily", "@daily"),
    ("@Hourly", "@hourly"),
    ("@every 1h30m", "@every 1h30m"),
    ("@every 90s", "@every 90s"),
])
def test_validate_cron_accepts(expr, expected):
    assert cluster.validate_cron(expr) == expected


@pytest.mark.parametrize("expr, words", [
    ("61 * * * *", "minute field '61' is out of range 0-59"),
    ("0 24 * * *", "hour field '24' is out of range 0-23"),
    ("0 0 0 * *", "day-of-month field '0' is out of range 1-31"),
    ("0 0 1 13 *", "month field '13' is out of range 1-12"),
    ("0 0 * * 7", "day-of-week field '7' is out of range 0-6"),
    ("0 0 * * FUNDAY", "day-of-week field 'FUNDAY' has 'FUNDAY'"),
    ("0 0 * FOO *", "month field 'FOO'"),
    ("60 0 0 * * *", "second field '60' is out of range 0-59"),
    ("5-1 * * * *", "minute field '5-1' has range 5-1 whose start is after its end"),
    ("*/0 * * * *", "minute field '*/0' has step '0'"),
    ("1,,2 * * * *", "minute field '1,,2' has an empty list element"),
    ("1-2-3 * * * *", "minute field '1-2-3' has more than one '-'"),
    ("0 0 L * *", "day-of-month field 'L'"),
    ("* * *", "has 3 fields, expected 5"),
    ("0 0 0 0 * * * *", "has 8 fields"),
    ("", "empty"),
    ("@sometimes", "not a known cron descriptor"),
    ("@every 1x", "not a Go duration"),
    ("@every 0s", "shorter than 1s"),
])
def test_validate_cron_rejects_naming_the_field(expr, words):
    with pytest.raises(UserError) as e:
        cluster.validate_cron(expr)
    assert e.value.field == "cron"
    assert words in e.value.what
    assert e.value.fix and "cron:" in str(e.value)


# ------------------------------------------------------------------------------------------------ errors

def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_host_fails_fast_with_port_forward_hint(package, monkeypatch, tmp_path):
    import kfp

    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "ctx.json"))
    host = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        cluster.submit(host, package, pipeline_name="ofa", params={"a": 1}, log=_nolog)
    assert time.monotonic() - t0 < 5
    assert host in str(e.value) and "connection refused" in str(e.value)
    assert e.value.field == "host"
    assert "kubectl port-forward svc/ml-pipeline-ui 8080:80 -n kubeflow" in e.value.fix


def test_host_that_never_answers_times_out(package, monkeypatch, tmp_path):
    import kfp

    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "ctx.json"))
    monkeypatch.setattr(cluster, "HEALTHZ_READ_TIMEOUT_S", 0.3)
    with socket.socket() as sock:  # listening, never accepting: the kernel completes the handshake
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        host = f"http://127.0.0.1:{sock.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(UserError, match="did not answer in time") as e:
            cluster.submit(host, package, pipeline_name="ofa", params={"a": 1}, log=_nolog)
        assert time.monotonic() - t0 < 5
    assert e.value.field == "host"


def test_every_api_call_has_a_read_timeout_and_posts_are_not_repeated(kfp_server, package, monkeypatch):
    monkeypatch.setattr(cluster, "READ_TIMEOUT_S", 0.3)  # kfp itself passes no timeout: a call could hang
    kfp_server.delays[f"{API}/runs"] = 1.5
    with pytest.raises(UserError, match="did not answer in time"):
        cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, log=_nolog)
    assert len(kfp_server.calls("POST", f"{API}/runs")) == 1  # a timed-out create is not sent twice


@pytest.mark.parametrize("status, prefix", [
    (401, API),                     # everything, healthz included: kfp would retry healthz 5 x 5 s
    (403, f"{API}/experiments"),    # healthz open, the namespaced API forbidden (multi-user, no token)
])
def test_unauthorized_gives_the_token_hint_fast(kfp_server, package, status, prefix):
    kfp_server.fail(status, prefix)
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, log=_nolog)
    assert time.monotonic() - t0 < 5
    assert str(status) in str(e.value) and kfp_server.url in str(e.value)
    assert "--token" in e.value.fix and "KF_PIPELINES_SA_TOKEN_PATH" in e.value.fix
    assert "--namespace" in e.value.fix


def test_login_redirect_is_not_followed(kfp_server, package):
    kfp_server.fail(302, API, headers={"Location": "/dex/auth?client_id=kubeflow-oidc-authservice"})
    with pytest.raises(UserError, match="redirected to /dex/auth") as e:
        cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, log=_nolog)
    assert "--token" in e.value.fix
    assert len(kfp_server.requests) == 1  # the redirect was not followed


def test_wrong_endpoint_404_and_html_answer(kfp_server, package):
    kfp_server.fail(404, API, body=b"404 page not found")
    t0 = time.monotonic()
    with pytest.raises(UserError, match="no KFP API") as e:
        cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, log=_nolog)
    assert time.monotonic() - t0 < 5
    assert "http://localhost:8080" in e.value.fix
    kfp_server.faults = []
    kfp_server.fail(200, API, body=b"<html>Central Dashboard</html>", headers={})
    with pytest.raises(UserError, match="not KFP's JSON"):
        cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, log=_nolog)


def test_server_error_message_is_shown(kfp_server, package):
    kfp_server.fail(400, f"{API}/runs", body=json.dumps(
        {"error": "x", "code": 3, "message": "Invalid input error: bad pipeline root"}).encode())
    with pytest.raises(UserError, match=r"rejected the request \(400: Invalid input error: bad pipeline"):
        cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, log=_nolog)


def test_bad_package_and_host_fail_before_any_request(kfp_server, package, tmp_path):
    s = kfp_server
    with pytest.raises(UserError, match="does not exist") as e:
        cluster.submit(s.url, tmp_path / "missing.yaml", pipeline_name="ofa", params={}, log=_nolog)
    assert e.value.source.endswith("missing.yaml") and "compile" in e.value.fix
    junk = tmp_path / "junk.yaml"
    junk.write_text("hello: [1, 2\n")
    with pytest.raises(UserError, match="not a compiled KFP pipeline"):
        cluster.submit(s.url, junk, pipeline_name="ofa", params={}, log=_nolog)
    other = tmp_path / "other.yaml"
    other.write_text("apiVersion: v1\nkind: ConfigMap\n")
    with pytest.raises(UserError, match="not a compiled KFP pipeline"):
        cluster.submit(s.url, other, pipeline_name="ofa", params={}, log=_nolog)
    wrong_ext = tmp_path / "tiny.json"
    wrong_ext.write_bytes(package.read_bytes())
    with pytest.raises(UserError, match="not a pipeline package name"):
        cluster.schedule(s.url, wrong_ext, pipeline_name="ofa", cron="@daily", params={}, log=_nolog)
    with pytest.raises(UserError, match="not an http") as e:
        cluster.submit("localhost:8080", package, pipeline_name="ofa", params={"a": 1}, log=_nolog)
    assert e.value.field == "host"
    assert s.requests == []



# ----------------------------------------------------------------------------------- backend version

@pytest.mark.parametrize("tag, via_ui", [("2.5.0", False), ("2.17.3", True), ("v2.14.0-rc.1", False)])
def test_backend_in_range_is_accepted_and_reported(kfp_server, package, tag, via_ui):
    kfp_server.tag_name, kfp_server.via_ui = tag, via_ui
    lines = []
    out = cluster.schedule(kfp_server.url, package, pipeline_name="ofa", cron="@daily", params={"a": 1},
                           log=lines.append)
    assert out["backend_version"] == tag.lstrip("v").split("-")[0]
    assert kfp_server.calls("POST", f"{API}/recurringruns") and not any("warning" in x for x in lines)


@pytest.mark.parametrize("tag, side", [("2.4.1", "older"), ("1.8.5", "older"), ("2.18.0", "newer"),
                                       ("3.0.0", "newer")])
def test_backend_outside_the_range_fails_in_one_line_before_any_upload(kfp_server, package, tag, side):
    kfp_server.tag_name = tag
    with pytest.raises(UserError) as e:
        cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, log=_nolog)
    line = str(e.value)
    assert "\n" not in line and f"backend {tag}, {side} than" in line
    assert "KFP backend 2.5.0 to 2.17.x (Kubeflow 1.10 and later)" in line
    assert "--skip-backend-check" in e.value.fix and e.value.field == "host"
    assert [r.path for r in kfp_server.requests] == [f"{API}/healthz"]  # nothing listed, nothing uploaded
    # the override goes on, and says which backend it ran on
    out = cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1},
                         check_backend=False, log=_nolog)
    assert out["backend_version"] == tag and kfp_server.calls("POST", f"{API}/runs")


@pytest.mark.parametrize("tag", ["unknown", "", None, "master"])
def test_backend_that_does_not_say_its_version_warns_and_goes_on(kfp_server, package, tag):
    # TAG_NAME defaults to "unknown" in API server images built without the release tag
    kfp_server.tag_name = tag
    lines = []
    out = cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, log=lines.append)
    assert out["backend_version"] is None and kfp_server.calls("POST", f"{API}/runs")
    (warning,) = [x for x in lines if x.startswith("warning:")]
    assert "does not say its version" in warning and "KFP backend 2.5.0 to 2.17.x" in warning


def test_cli_refuses_an_old_backend_in_one_line(kfp_server, package, capsys):
    from onceforall.cli import main

    kfp_server.tag_name = "2.4.1"
    code = main(["submit", "--host", kfp_server.url, "--package", str(package), "--param", "a=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "2.4.1" in err and "2.5.0 to 2.17.x" in err
    assert not kfp_server.calls("POST", f"{API}/pipelines/upload")


# ------------------------------------------------------------------------------------------ token file

def test_wait_sends_the_rotated_token_of_the_token_file(kfp_server, package, tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("tok-1\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    kfp_server.run_states = ["RUNNING", "RUNNING", "SUCCEEDED"]

    def log(line):  # the kubelet swaps the projected token while the run is being waited on
        if line.endswith(": RUNNING"):
            new = tmp_path / "token.new"
            new.write_text("tok-2\n")
            new.replace(token_file)

    out = cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, wait=True,
                         poll_s=0.05, log=log)
    assert out["state"] == "SUCCEEDED"
    polls = [r.headers.get("authorization") for r in kfp_server.calls("GET", f"{API}/runs/{out['run_id']}")]
    assert polls == ["Bearer tok-1", "Bearer tok-2", "Bearer tok-2"]
    assert kfp_server.calls("POST", f"{API}/runs")[0].headers["authorization"] == "Bearer tok-1"


def test_token_file_that_vanishes_or_is_empty_is_a_one_line_error(kfp_server, package, tmp_path,
                                                                  monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("  \n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    with pytest.raises(UserError, match="is empty") as e:
        cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, log=_nolog)
    assert e.value.field == "KF_PIPELINES_SA_TOKEN_PATH" and kfp_server.requests == []
    token_file.write_text("tok-1")

    def log(line):  # the token file goes away once the run is created, before the first poll
        if " started: " in line:
            token_file.unlink()

    with pytest.raises(UserError, match="cannot read the token file"):
        cluster.submit(kfp_server.url, package, pipeline_name="ofa", params={"a": 1}, wait=True,
                       poll_s=0.05, log=log)
