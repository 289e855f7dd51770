#!/usr/bin/env bash
# System packages the tests use, from Debian: the Fashion-MNIST IDX files (the data tests and the
# main job read them) and Prometheus + Pushgateway (the energy tests start them on loopback).
# Installs what is missing when it can (root with apt-get); otherwise says which tests will skip.
set -euo pipefail
missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v prometheus-pushgateway >/dev/null || missing+=(prometheus-pushgateway)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
else
  echo "note: not installed: ${missing[*]} (sudo apt-get install ${missing[*]}); the tests that need them skip" >&2
fi
