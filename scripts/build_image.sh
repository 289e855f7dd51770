#!/usr/bin/env bash
# Build the CPU image here, without a Docker engine or a registry (`make image`):
#   1. installs buildah, podman, skopeo, umoci, mmdebstrap and runc when missing (root with apt-get);
#   2. writes podman's settings for this machine (host network, runc, cgroupfs, overlay storage)
#      under OFA_PODMAN_DIR, where `ofa run --runner container` finds the image and the settings;
#   3. makes a Debian bookworm base with mmdebstrap (python3, python3-venv, apt; the host's CA
#      bundle, for whoever pip-installs from it online) and imports it as localhost/onceforall-base;
#   4. fills images/wheelhouse/ with `pip wheel` (torch and every pin of images/constraints-cpu.txt):
#      the build then installs with no package index at all, as on an air-gapped cluster;
#   5. builds images/Dockerfile.cpu with buildah (BASE=that base, OFFLINE=1) and prints the build
#      time and the image size.
#
#   scripts/build_image.sh [PYTHON]     PYTHON: runs `pip wheel` (default .venv/bin/python)
#
# Environment: OFA_IMAGE (default localhost/onceforall-kfp:dev-cpu), OFA_PODMAN_DIR (default
# /var/tmp/onceforall-podman), TORCH_INDEX (an index that serves torch's CPU build, e.g.
# https://download.pytorch.org/whl/cpu; default: pip's own configuration), DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${1:-.venv/bin/python}
TAG=${OFA_IMAGE:-localhost/onceforall-kfp:dev-cpu}
DIR=${OFA_PODMAN_DIR:-/var/tmp/onceforall-podman}
BASE=localhost/onceforall-base:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TOOLS=(buildah podman skopeo umoci mmdebstrap runc)

missing=()
for t in "${TOOLS[@]}"; do command -v "$t" >/dev/null || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "build_image: missing ${missing[*]}: sudo apt-get install ${TOOLS[*]}" >&2
    exit 2
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Settings that work on these VMs (hybrid cgroups: crun and podman's default ulimits fail; vfs would
# copy the whole image for every container; only the host network is allowed).
mkdir -p "$DIR"
cat >"$DIR/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
netns = "host"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
cat >"$DIR/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$DIR/storage"
runroot = "$DIR/run"
EOF
export CONTAINERS_CONF="$DIR/containers.conf" CONTAINERS_STORAGE_CONF="$DIR/storage.conf"

if ! podman image exists "$BASE"; then
  echo "build_image: making the Debian base $BASE with mmdebstrap"
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
    --customize-hook='copy-in /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs' \
    bookworm "$DIR/base-bookworm.tar" "$MIRROR"
  podman import --quiet "$DIR/base-bookworm.tar" "$BASE" >/dev/null
  rm -f "$DIR/base-bookworm.tar"
fi

# `.` brings the project's own dependencies; its wheel is dropped (the build makes its own from the
# sources it copies, so a stale one could never be installed instead).
echo "build_image: filling images/wheelhouse with pip wheel"
"$PY" -m pip wheel --quiet --disable-pip-version-check --wheel-dir images/wheelhouse \
  ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
  -c images/constraints-cpu.txt -r images/requirements.in torch==2.13.0 setuptools .
rm -f images/wheelhouse/onceforall_kfp-*.whl
if ! compgen -G 'images/wheelhouse/torch-2.13.0+cpu-*.whl' >/dev/null; then
  echo "build_image: the wheelhouse has no CPU build of torch 2.13.0;" \
       "set TORCH_INDEX=https://download.pytorch.org/whl/cpu" >&2
  exit 1
fi

echo "build_image: building $TAG from images/Dockerfile.cpu"
start=$(date +%s)
buildah bud --quiet --isolation=chroot --network=host --layers \
  --build-arg BASE="$BASE" --build-arg OFFLINE=1 -f images/Dockerfile.cpu -t "$TAG" .
end=$(date +%s)
size=$(podman image inspect --format '{{.Size}}' "$TAG")
echo "build_image: built $TAG in $((end - start)) s; image size $((size / 1000000)) MB" \
     "(podman's storage: $DIR)"
