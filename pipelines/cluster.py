"""Submit a compiled pipeline to a Kubeflow Pipelines (KFP) server: one run, or a recurring run.

Works on any compiled KFP pipeline package (``.yaml``, ``.yml``, ``.zip``, ``.tar.gz``, ``.tgz``) through
``kfp.Client``. The upload logic is shared by :func:`submit` and :func:`schedule`:

* the experiment is looked up by name (in the namespace, if one is given) and created when missing;
* a pipeline with ``pipeline_name`` is uploaded when none exists (the server names its first version
  after the pipeline); otherwise a new version is uploaded. The version name is ``version`` when given,
  else ``<first 12 hex digits of the package's sha256>-<UTC timestamp>``. A version whose name already
  exists is reused, not uploaded again.
* parameters are checked against the pipeline's root inputs before anything is sent: unknown names,
  missing required ones and values of the wrong type are errors; strings are converted where the
  pipeline declares a number, bool, list or struct (so ``--param epochs=3`` from a command line works).

Before anything is uploaded, the backend's version (its healthz ``tag_name``) is checked against
:data:`onceforall_pipelines.backends.SUPPORTED_BACKENDS`. A token file is read again before every request
(kfp's ServiceAccountTokenVolumeCredentials), so a rotated projected token is picked up during ``--wait``.

Errors a user can fix (unreachable host, missing token, wrong endpoint, bad package, bad cron) are raised
as :class:`onceforall.errors.UserError` with the host and the fix, and they come in seconds: the client
does one health check with a 5 s connect timeout and no retry loop (see ``_connect``).

Cron (:func:`validate_cron`): KFP's scheduler parses ``trigger.cron_schedule.cron`` with robfig/cron v1,
whose fields are ``second minute hour day-of-month month day-of-week`` (times in UTC). Given five fields,
robfig reads them as *seconds first without the day of week*, so the standard ``0 2 * * *`` would run at
minute 2 of every hour. We therefore always send six fields: a standard 5-field expression gets ``0 ``
prefixed (second 0), a 6-field one is sent as is, and the descriptors ``@yearly`` (``@annually``),
``@monthly``, ``@weekly``, ``@daily`` (``@midnight``), ``@hourly`` and ``@every <Go duration>`` are
passed through.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from onceforall.errors import UserError
from onceforall_pipelines.backends import (MIN_BACKEND, SUPPORTED_BACKENDS, format_version, is_supported,
                                           parse_backend_version)

#: Where a Kubeflow notebook/pod finds its projected KFP token when KF_PIPELINES_SA_TOKEN_PATH is unset.
DEFAULT_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
#: (connect, read) seconds for every API call; the health check fails fast on an unreachable host.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 120.0
HEALTHZ_READ_TIMEOUT_S = 10.0
#: Run states after which a run never changes (kfp's own wait_for_run_completion misses CANCELED).
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "ERROR"})
PACKAGE_SUFFIXES = (".yaml", ".yml", ".zip", ".tar.gz", ".tgz")

_PORT_FORWARD = "kubectl port-forward svc/ml-pipeline-ui 8080:80 -n kubeflow"
_TOKEN_FIX = ("pass a token with --token (or set KF_PIPELINES_SA_TOKEN_PATH to a token file); on a "
              "multi-user Kubeflow also pass your profile namespace with --namespace")


# ---------------------------------------------------------------------------------------------- public API

def submit(host: str, package_path: str | os.PathLike, *, pipeline_name: str, params: dict | None = None,
           experiment: str = "onceforall", version: str | None = None, run_name: str | None = None,
           namespace: str | None = None, token: str | None = None, wait: bool = False,
           timeout_s: float | None = None, poll_s: float = 5.0, service_account: str | None = None,
           check_backend: bool = True, log: Callable[[str], Any] = print) -> dict:
    """Upload the pipeline (or a new version of it) and start one run of that version.

    Returns ``{"backend_version", "experiment_id", "pipeline_id", "version_id", "version_name", "run_id",
    "run_url"}``, plus ``"state"`` when ``wait`` is true (and ``"timed_out": True`` when ``timeout_s``
    passed first: the run goes on on the cluster). A backend outside :data:`SUPPORTED_BACKENDS` is refused
    before anything is uploaded unless ``check_backend`` is false.
    """
    prep = _prepare(host, package_path, pipeline_name, params)
    client, ns, backend = _connect(prep.host, namespace, token, check_backend, log)
    with _api(prep.host):
        ids = {"backend_version": backend, **_upload(client, prep, experiment, version, ns, log)}
        run_name = run_name or f"{pipeline_name} {_utc_stamp()}"
        run = _quiet(client.run_pipeline, experiment_id=ids["experiment_id"], job_name=run_name,
                                  params=prep.params, pipeline_id=ids["pipeline_id"],
                                  version_id=ids["version_id"], service_account=service_account)
    url = f"{prep.host}/#/runs/details/{run.run_id}"
    log(f"run '{run_name}' started: {url}")
    result = {**ids, "run_id": run.run_id, "run_url": url}
    if wait:
        result.update(_wait(client, prep.host, run.run_id, timeout_s, poll_s, log))
    return result


def schedule(host: str, package_path: str | os.PathLike, *, pipeline_name: str, cron: str,
             params: dict | None = None, experiment: str = "onceforall", job_name: str | None = None,
             max_concurrency: int = 1, namespace: str | None = None, token: str | None = None,
             version: str | None = None, service_account: str | None = None, check_backend: bool = True,
             log: Callable[[str], Any] = print) -> dict:
    """Upload the pipeline (or a new version) and create an enabled recurring run on a cron schedule.

    ``cron`` goes through :func:`validate_cron` (sent in 6-field form); ``no_catchup`` is true, so a
    paused and re-enabled schedule runs once, not once per missed slot. Returns ``{"backend_version",
    "experiment_id", "pipeline_id", "version_id", "version_name", "recurring_run_id", "recurring_run_url",
    "cron"}``. The backend's version is checked as in :func:`submit`.
    """
    cron6 = validate_cron(cron)
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) \
            or not 1 <= max_concurrency <= 10:
        raise UserError(f"{max_concurrency!r} is not an integer from 1 to 10", field="max_concurrency",
                        fix="KFP runs at most 10 runs of one recurring run at once; 1 runs them one by one")
    prep = _prepare(host, package_path, pipeline_name, params)
    client, ns, backend = _connect(prep.host, namespace, token, check_backend, log)
    with _api(prep.host):
        ids = {"backend_version": backend, **_upload(client, prep, experiment, version, ns, log)}
        job_name = job_name or f"{pipeline_name} ({cron})"
        job = client.create_recurring_run(
            experiment_id=ids["experiment_id"], job_name=job_name, cron_expression=cron6,
            max_concurrency=max_concurrency, no_catchup=True, params=prep.params,
            pipeline_id=ids["pipeline_id"], version_id=ids["version_id"], enabled=True,
            service_account=service_account)
    url = f"{prep.host}/#/recurringrun/details/{job.recurring_run_id}"
    log(f"recurring run '{job_name}' ({cron6}, UTC) created: {url}")
    return {**ids, "recurring_run_id": job.recurring_run_id, "recurring_run_url": url, "cron": cron6}


# -------------------------------------------------------------------------------------------------- cron

_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_MONTHS = {m: i + 1 for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"))}
_DAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
# (name, low, high, names) in robfig/cron v1 order
_FIELDS = (("second", 0, 59, None), ("minute", 0, 59, None), ("hour", 0, 23, None),
           ("day-of-month", 1, 31, None), ("month", 1, 12, _MONTHS), ("day-of-week", 0, 6, _DAYS))
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_CRON_FIX = ("write 5 fields 'minute hour day-of-month month day-of-week' (e.g. '0 2 * * *' = daily "
             "02:00 UTC), 6 fields with seconds first, '@daily'/'@hourly'/'@weekly'/'@monthly'/'@yearly' "
             "or '@every 6h'")


def validate_cron(expr: str) -> str:
    """Check a cron expression and return it in the form KFP's scheduler parses as meant.

    Five fields (standard cron: minute hour day-of-month month day-of-week) get ``0 `` prefixed for the
    seconds; six fields (seconds first, robfig/cron v1) are kept; descriptors are kept (lower-cased).
    Each field takes ``*``, ``?``, numbers, names (JAN-DEC, SUN-SAT), lists ``a,b``, ranges ``a-b`` and
    steps ``*/n``, ``a-b/n``, ``a/n``. Ranges: second and minute 0-59, hour 0-23, day of month 1-31, month
    1-12, day of week 0-6 (0 = Sunday; 7 is not accepted by robfig). Schedules are evaluated in UTC.
    Raises UserError (field "cron") naming the bad field.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise UserError("the cron expression is empty", field="cron", fix=_CRON_FIX)
    text = " ".join(expr.split())
    if text.startswith("@"):
        return _validate_descriptor(text, expr)
    fields = text.split(" ")
    if len(fields) == 5:
        fields = ["0", *fields]
    elif len(fields) != 6:
        raise UserError(f"'{expr}' has {len(fields)} fields, expected 5 (standard cron) or 6 (with seconds)",
                        field="cron", fix=_CRON_FIX)
    for value, (name, low, high, names) in zip(fields, _FIELDS):
        problem = _cron_field_problem(value, low, high, names)
        if problem:
            raise UserError(f"'{expr}': the {name} field '{value}' {problem}", field="cron", fix=_CRON_FIX)
    return " ".join(fields)


def _validate_descriptor(text: str, expr: str) -> str:
    lowered = text.lower()
    if lowered in _DESCRIPTORS:
        return lowered
    if lowered.startswith("@every "):
        spec = text[len("@every "):]
        seconds = _go_duration_s(spec)
        if seconds is None:
            raise UserError(f"'{expr}': the @every duration '{spec}' is not a Go duration", field="cron",
                            fix="write it like 30m, 6h or 1h30m (units h, m, s)")
        if seconds < 1:
            raise UserError(f"'{expr}': the @every duration '{spec}' is shorter than 1s", field="cron",
                            fix="use an interval of at least 1s, e.g. '@every 1h'")
        return "@every " + spec
    raise UserError(f"'{expr}' is not a known cron descriptor", field="cron", fix=_CRON_FIX)


def _go_duration_s(spec: str) -> float | None:
    pos, total = 0, 0.0
    while pos < len(spec):
        m = _GO_DURATION.match(spec, pos)
        if not m:
            return None
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    return total if spec else None


def _cron_field_problem(value: str, low: int, high: int, names: dict | None) -> str | None:
    """None when ``value`` is a valid robfig/cron v1 field, else what is wrong with it."""
    for part in value.split(","):
        if not part:
            return "has an empty list element"
        base, *step = part.split("/")
        if len(step) > 1:
            return "has more than one '/'"
        if step:
            if not step[0].isdigit() or int(step[0]) == 0:
                return f"has step '{step[0]}', expected a whole number of at least 1"
        if base in ("*", "?"):
            continue
        bounds = base.split("-")
        if len(bounds) > 2:
            return "has more than one '-' in a range"
        nums = []
        for b in bounds:
            n = _cron_number(b, names)
            if n is None:
                named = " or a name " + "/".join(k.upper() for k in names) if names else ""
                allowed = f"{low}-{high}{named}"
                return f"has '{b}', expected {allowed}"
            if not low <= n <= high:
                return f"is out of range {low}-{high}"
            nums.append(n)
        if len(nums) == 2 and nums[0] > nums[1]:
            return f"has range {base} whose start is after its end"
    return None


def _cron_number(text: str, names: dict | None) -> int | None:
    if names and text.lower() in names:
        return names[text.lower()]
    return int(text) if text.isdigit() else None


# ----------------------------------------------------------------------------------------------- prepare

class _Prepared:
    def __init__(self, host: str, path: Path, data: bytes, pipeline_name: str, params: dict):
        self.host, self.path, self.data = host, path, data
        self.pipeline_name, self.params = pipeline_name, params
        self.sha256 = hashlib.sha256(data).hexdigest()


def _prepare(host: str, package_path, pipeline_name: str, params: dict | None) -> _Prepared:
    host = _check_host(host)
    if not pipeline_name or not str(pipeline_name).strip():
        raise UserError("the pipeline name is empty", field="pipeline_name",
                        fix="give the name the pipeline has (or gets) on the KFP server")
    path = Path(package_path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise UserError(f"pipeline package {what}", source=str(path),
                        fix="compile the pipeline first (ofa compile) or check the path")
    if not path.name.endswith(PACKAGE_SUFFIXES):
        raise UserError(f"'{path.name}' is not a pipeline package name", source=str(path),
                        fix=f"KFP takes packages ending in {', '.join(PACKAGE_SUFFIXES)}")
    from kfp.client.client import _extract_pipeline_yaml  # the parser kfp.Client itself uses

    try:
        doc = _extract_pipeline_yaml(str(path))
    except Exception as e:  # yaml, protobuf ParseError, tar/zip errors, ValueError: all mean a bad package
        raise UserError(f"not a compiled KFP pipeline ({type(e).__name__}: {_first_line(e)})",
                        source=str(path), fix="compile it with kfp's Compiler (ofa compile)") from None
    spec = doc.pipeline_spec
    if not spec.pipeline_info.name or not spec.HasField("root"):
        raise UserError("not a compiled KFP pipeline (no pipelineInfo.name or root)", source=str(path),
                        fix="compile it with kfp's Compiler (ofa compile)")
    checked = _check_params(params or {}, spec.root.input_definitions.parameters, str(path))
    return _Prepared(host, path, path.read_bytes(), str(pipeline_name).strip(), checked)


def _check_host(host: str) -> str:
    if not host or not str(host).strip():
        raise UserError("no KFP host given", field="host",
                        fix=f"pass --host, e.g. http://localhost:8080 after `{_PORT_FORWARD}`")
    host = str(host).strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", host):
        raise UserError(f"'{host}' is not an http(s) URL", field="host",
                        fix="write the scheme, e.g. http://localhost:8080 or https://kubeflow.example.com/pipeline")
    return host


_TYPE_NAMES = {1: "a number", 2: "an integer", 3: "a string", 4: "a bool", 5: "a list", 6: "a struct (dict)"}


def _check_params(params: dict, declared, source: str) -> dict:
    if not isinstance(params, dict):
        raise UserError(f"parameters must be a mapping of name to value, not {type(params).__name__}",
                        source=source, field="params")
    known = ", ".join(sorted(declared)) or "(none)"
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise UserError(f"unknown pipeline parameter(s): {', '.join(unknown)}", source=source, field="params",
                        fix=f"the pipeline's parameters are: {known}")
    missing = sorted(n for n, p in declared.items()
                     if n not in params and not p.is_optional and not p.HasField("default_value"))
    if missing:
        raise UserError(f"required pipeline parameter(s) not given: {', '.join(missing)}", source=source,
                        field="params", fix="give a value for each")
    out = {}
    for name, value in params.items():
        kind = declared[name].parameter_type
        ok, converted = _coerce(value, kind)
        if not ok:
            want = _TYPE_NAMES.get(kind, "a valid value")
            raise UserError(f"{value!r} is not {want}", source=source, field=f"params.{name}",
                            fix=f"give {name} {want}")
        out[name] = converted
    return out


def _coerce(value, kind: int) -> tuple[bool, Any]:
    """Check ``value`` against a KFP ParameterType; strings (from a command line) are converted."""
    if kind == 2:  # NUMBER_INTEGER
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return True, int(value)
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind == 1:  # NUMBER_DOUBLE
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if kind == 3:  # STRING
        return isinstance(value, str), value
    if kind == 4:  # BOOLEAN
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return True, value.strip().lower() == "true"
        return isinstance(value, bool), value
    if kind in (5, 6):  # LIST, STRUCT
        want = list if kind == 5 else dict
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return False, value
        return isinstance(value, want), value
    return True, value


# ----------------------------------------------------------------------------------------------- connect

def _connect(host: str, namespace: str | None, token: str | None, check_backend: bool, log):
    """A kfp.Client that fails in seconds, the namespace to use (None on single-user KFP) and the backend's
    version ("2.5.0"; None when it does not say).

    kfp.Client's constructor calls ``get_kfp_healthz`` when no namespace is known, and that method retries
    5 times with 5 s sleeps on any ApiException (401, 403, 404...), i.e. 25 s before a TimeoutError. The
    subclass replaces it with one health check (5 s connect timeout, JSON checked), sets urllib3 retries to
    one retry and no redirects (an auth proxy's 302 to its login page becomes an error instead of a 200 HTML
    page) and gives every other call a (connect, read) timeout; kfp's calls have none by default.
    """
    import warnings

    client_cls = _client_class()
    existing_token, credentials = _credentials(token)
    with _api(host), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "This client only works with KFP v2.0.0-beta.2+"
        # namespace "kubeflow" is kfp's "not given"; the constructor then runs the health check itself
        client = _quiet(client_cls, host=host, namespace=namespace or "kubeflow",
                        existing_token=existing_token, credentials=credentials)
        health = client._ofa_health if client._ofa_health is not None else client.get_kfp_healthz()
    backend = _check_backend(host, client._ofa_tag, check_backend, log)
    _bound_timeouts(client)
    ns = namespace or client.get_user_namespace() or None
    if health.multi_user and not ns:
        raise UserError(f"KFP at {host} is multi-user and no namespace was given", field="namespace",
                        fix="pass your Kubeflow profile namespace with --namespace")
    return client, ns, backend


def _check_backend(host: str, tag: str | None, check: bool, log) -> str | None:
    """Refuse a backend outside the supported range (the compiled YAML would fail on it, maybe hours in).

    A backend that does not say its version (TAG_NAME "unknown": an API server image built from source
    or by a distribution without the release tag) is let through with a warning: refusing it would block
    backends that may well be in range, and the check exists to stop known-bad ones.
    """
    version = parse_backend_version(tag)
    if version is None:
        log(f"warning: KFP at {host} does not say its version (tag_name {tag!r}); this pipeline is made "
            f"for {SUPPORTED_BACKENDS}")
        return None
    name = format_version(version)
    if check and not is_supported(version):
        side = "older" if version < MIN_BACKEND else "newer"
        fix = ("upgrade Kubeflow Pipelines (Kubeflow 1.10 ships 2.5.0)" if side == "older" else
               "use an onceforall-kfp release made for it (pipelines/backends.py)")
        raise UserError(f"KFP at {host} is backend {name}, {side} than the supported {SUPPORTED_BACKENDS}",
                        field="host", fix=f"{fix}, or pass --skip-backend-check to go on anyway")
    return name


def _bound_timeouts(client) -> None:
    """Give every API call a (connect, read) timeout: kfp.Client passes none, so a call could hang."""
    rest = client._healthz_api.api_client.rest_client  # one ApiClient is shared by all of kfp's APIs
    original = rest.request

    def request(*args, _request_timeout=None, **kwargs):
        timeout = _request_timeout or (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
        return original(*args, _request_timeout=timeout, **kwargs)

    rest.request = request


def _credentials(token: str | None):
    """``(existing_token, credentials)`` for kfp.Client.

    A ``--token`` is sent as given. A token file (``KF_PIPELINES_SA_TOKEN_PATH``, else the projected
    token's default path when it exists) goes through kfp's ServiceAccountTokenVolumeCredentials, which
    reads the file again before every request: the kubelet rotates a projected token (by default within
    an hour), and a ``--wait`` that outlives it must send the new one.
    """
    if token:
        return token.strip(), None
    env_path = os.environ.get("KF_PIPELINES_SA_TOKEN_PATH")
    path = env_path or (DEFAULT_TOKEN_PATH if os.path.isfile(DEFAULT_TOKEN_PATH) else None)
    if not path:
        return None, None
    _read_token(path)  # fail now, with the fix, rather than inside kfp's first request
    return None, _token_file_credentials(path)


def _read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise UserError(f"cannot read the token file {path}: {e.strerror}",
                        field="KF_PIPELINES_SA_TOKEN_PATH",
                        fix="point it at a readable token file or pass --token") from None
    if not token:
        raise UserError(f"the token file {path} is empty", field="KF_PIPELINES_SA_TOKEN_PATH",
                        fix="point it at the projected KFP token or pass --token")
    return token


def _token_file_credentials(path: str):
    """kfp's refreshing file credentials, with our one-line error when the file cannot be read."""
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    class _TokenFile(ServiceAccountTokenVolumeCredentials):
        def _get_token(self) -> str:
            return _read_token(path)

    return _TokenFile(path)


_CLIENT_CLASS = None


def _client_class():
    global _CLIENT_CLASS
    if _CLIENT_CLASS is not None:
        return _CLIENT_CLASS
    import kfp
    import kfp_server_api
    import urllib3

    class _FastClient(kfp.Client):
        _ofa_health = None
        _ofa_tag = None

        def _load_config(self, *args, **kwargs):
            config = super()._load_config(*args, **kwargs)
            # one retry of a failed connect, none of a read (POSTs must not repeat), no redirects
            config.retries = urllib3.util.Retry(total=1, read=0, redirect=0, raise_on_redirect=False)
            return config

        def get_kfp_healthz(self, sleep_duration: int = 5):
            """One attempt, bounded in time, answer checked to be KFP's JSON (kfp: 5 tries, 5 s apart)."""
            resp = self._healthz_api.healthz_service_get_healthz(
                _preload_content=False, _request_timeout=(CONNECT_TIMEOUT_S, HEALTHZ_READ_TIMEOUT_S))
            host = self._existing_config.host
            try:
                body = json.loads(resp.data or b"null")
            except ValueError:
                body = None
            finally:
                resp.release_conn()
            if not isinstance(body, dict):
                ctype = resp.headers.get("Content-Type", "?")
                raise UserError(f"{host}/apis/v2beta1/healthz answered with something that is not KFP's JSON "
                                f"(Content-Type {ctype}): not the KFP API, or a login page", field="host",
                                fix=f"use the KFP API/UI endpoint (e.g. http://localhost:8080 after "
                                    f"`{_PORT_FORWARD}`); behind an auth proxy, {_TOKEN_FIX}")
            # the API server says tag_name; ml-pipeline-ui answers for it with apiServerTagName
            self._ofa_tag = body.get("tag_name", body.get("apiServerTagName"))
            self._ofa_health = kfp_server_api.V2beta1GetHealthzResponse(
                multi_user=bool(body.get("multi_user", body.get("multiUser", False))),
                pipeline_store=body.get("pipeline_store", body.get("pipelineStore")))
            return self._ofa_health

    _CLIENT_CLASS = _FastClient
    return _CLIENT_CLASS


@contextlib.contextmanager
def _api(host: str):
    """Turn what kfp/kfp_server_api/urllib3 raise into one-line UserErrors."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except UserError:
        raise
    except kfp_server_api.ApiException as e:
        raise _api_error(host, e) from None
    except urllib3.exceptions.HTTPError as e:
        reason = e.reason if isinstance(e, urllib3.exceptions.MaxRetryError) and e.reason else e
        raise UserError(f"cannot reach the KFP API at {host} ({_reach_reason(reason)})", field="host",
                        fix=f"check --host; for a cluster without ingress run `{_PORT_FORWARD}` and use "
                            "--host http://localhost:8080") from None


def _quiet(fn, *args, **kwargs):
    """Call a kfp.Client method without its own "... details: <link>" print (we log our own line)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _reach_reason(reason) -> str:
    import urllib3

    exc = urllib3.exceptions
    # urllib3 2.x: NameResolutionError < NewConnectionError < ConnectTimeoutError, so test in this order
    if isinstance(reason, exc.NameResolutionError):
        return "the host name does not resolve"
    if isinstance(reason, exc.NewConnectionError):
        return "connection refused" if "refused" in str(reason).lower() else _first_line(reason)
    if isinstance(reason, exc.ConnectTimeoutError):
        return f"connection timed out after {CONNECT_TIMEOUT_S:g}s"
    if isinstance(reason, exc.ReadTimeoutError):
        return "the server accepted the connection but did not answer in time"
    return f"{type(reason).__name__}: {_first_line(reason)}"


def _api_error(host: str, e) -> UserError:
    status = e.status or 0
    message = _server_message(e)
    said = f": {message}" if message else ""
    if status == 0:  # kfp_server_api turns urllib3 SSLError into ApiException(status=0)
        return UserError(f"TLS error talking to {host}{said}", field="host",
                         fix="check http:// vs https:// in --host and the server's certificate")
    if status in (401, 403):
        word = "unauthorized" if status == 401 else "forbidden"
        return UserError(f"KFP at {host} answered {status} {word}{said}", field="token", fix=_TOKEN_FIX)
    if status in (301, 302, 303, 307, 308):
        where = e.headers.get("Location", "?") if e.headers else "?"
        return UserError(f"KFP at {host} redirected to {where} (an auth proxy's login page?)", field="token",
                         fix=_TOKEN_FIX)
    if status == 404:
        return UserError(f"{host} has no KFP API here (404 Not Found{said})", field="host",
                         fix=f"the host must be the KFP API/UI endpoint, e.g. http://localhost:8080 after "
                             f"`{_PORT_FORWARD}` (behind the Kubeflow dashboard: https://<dashboard>/pipeline)")
    if status >= 500:
        return UserError(f"the KFP API server at {host} failed ({status}{said})",
                         fix="see `kubectl logs deploy/ml-pipeline -n kubeflow`; retry once it is healthy")
    return UserError(f"KFP at {host} rejected the request ({status}{said})",
                     fix="check the pipeline parameters, names and namespace")


def _server_message(e) -> str:
    body = e.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return _first_line(body)[:200]
    if isinstance(data, dict):
        return _first_line(str(data.get("message") or data.get("error") or ""))[:300]
    return ""


def _first_line(obj) -> str:
    text = str(obj).strip()
    return text.splitlines()[0] if text else ""


# ------------------------------------------------------------------------------------------------ upload

def _filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def _upload(client, prep: _Prepared, experiment: str, version: str | None, ns: str | None, log) -> dict:
    # experiment: reuse by name, else create
    found = client.list_experiments(filter=_filter(experiment), namespace=ns, page_size=10).experiments or []
    if len(found) > 1:
        raise UserError(f"{len(found)} experiments are named '{experiment}'", field="experiment",
                        fix="name a unique experiment")
    if found:
        exp = found[0]
        if str(exp.storage_state or "").upper() == "ARCHIVED":
            raise UserError(f"experiment '{experiment}' is archived", field="experiment",
                            fix="restore it in the KFP UI or name another experiment")
        log(f"experiment '{experiment}' ({exp.experiment_id})")
    else:
        exp = _quiet(client.create_experiment, experiment, namespace=ns)
        log(f"experiment '{experiment}' created ({exp.experiment_id})")

    # pipeline: upload when new, else a new version (or reuse a version of the same name)
    pipelines = client.list_pipelines(filter=_filter(prep.pipeline_name), namespace=ns,
                                      page_size=10).pipelines or []
    if len(pipelines) > 1:
        raise UserError(f"{len(pipelines)} pipelines are named '{prep.pipeline_name}'", field="pipeline_name",
                        fix="delete the duplicates in the KFP UI or give another name")
    if not pipelines:
        pipeline = _quiet(client.upload_pipeline, str(prep.path), pipeline_name=prep.pipeline_name,
                          namespace=ns)
        pipeline_id = pipeline.pipeline_id
        versions = client.list_pipeline_versions(pipeline_id, sort_by="created_at desc",
                                                 page_size=1).pipeline_versions or []
        if not versions:
            raise UserError(f"KFP created pipeline {pipeline_id} but lists no version of it",
                            fix="see the pipeline in the KFP UI; the server may be failing")
        ver = versions[0]
        log(f"pipeline '{prep.pipeline_name}' uploaded ({pipeline_id}), version '{ver.display_name}'")
    else:
        pipeline_id = pipelines[0].pipeline_id
        name = version or f"{prep.sha256[:12]}-{_utc_stamp()}"
        same = client.list_pipeline_versions(pipeline_id, filter=_filter(name),
                                             page_size=10).pipeline_versions or []
        if same:
            ver = same[0]
            log(f"pipeline '{prep.pipeline_name}' ({pipeline_id}): reusing version '{name}'")
        else:
            ver = _quiet(client.upload_pipeline_version, str(prep.path), pipeline_version_name=name,
                         pipeline_id=pipeline_id)
            log(f"pipeline '{prep.pipeline_name}' ({pipeline_id}): new version '{name}' uploaded")
    return {"experiment_id": exp.experiment_id, "pipeline_id": pipeline_id,
            "version_id": ver.pipeline_version_id, "version_name": ver.display_name}


def _wait(client, host: str, run_id: str, timeout_s: float | None, poll_s: float, log) -> dict:
    """Poll the run until a terminal state (kfp's wait_for_run_completion never ends on CANCELED)."""
    start, last = time.monotonic(), None
    while True:
        with _api(host):
            run = client.get_run(run_id)
        state = str(run.state or "RUNTIME_STATE_UNSPECIFIED").upper()
        if state != last:
            log(f"run {run_id}: {state}")
            last = state
        if state in TERMINAL_STATES:
            out = {"state": state}
            if state != "SUCCEEDED" and run.error is not None:
                out["error"] = _first_line(getattr(run.error, "message", "") or run.error)
                log(f"run {run_id} error: {out['error']}")
            return out
        if timeout_s is not None and time.monotonic() - start >= timeout_s:
            log(f"run {run_id} still {state} after {timeout_s:g}s; it goes on on the cluster: "
                f"{host}/#/runs/details/{run_id}")
            return {"state": state, "timed_out": True}
        left = None if timeout_s is None else timeout_s - (time.monotonic() - start)
        time.sleep(poll_s if left is None else max(0.0, min(poll_s, left)))


def _utc_stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
