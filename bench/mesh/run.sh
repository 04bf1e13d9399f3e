#!/usr/bin/env bash
# Palisade mesh benchmark: direct vs an Envoy sidecar pair vs a Palisade sidecar pair, in one run.
#
#   bash bench/mesh/run.sh [--quick] [bench.py options, e.g. --repeats 5 --duration 20]
#
# Installs what is missing (nginx, wrk and openssl from the distribution with apt-get; Envoy with
# scripts/install-envoy.sh), builds palisade with the dist profile (target/dist/), then runs
# bench.py, which prints the table and writes bench/mesh/results/latest.json. See
# docs/benchmarks.md.
#
# Environment: PALISADE_BIN (skip the build, use this binary), PALISADE_ENVOY (use this envoy),
# BENCH_KEEP_WORK=1 (keep the scratch directory with every config and log).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

log() { printf 'run.sh: %s\n' "$*" >&2; }

sudo_cmd() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_packages() {
    local missing=()
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || { log "missing ${missing[*]} and no apt-get: install them by hand"; exit 1; }
    # Refresh the package lists only when apt does not know a candidate for a missing package.
    local pkg
    for pkg in "${missing[@]}"; do
        if ! apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
            log "apt-get update (no candidate for $pkg)"
            sudo_cmd apt-get update -q >&2
            break
        fi
    done
    log "installing ${missing[*]}"
    # RUNLEVEL=1 keeps the package scripts from starting the system nginx service.
    sudo_cmd env RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

install_packages
export PATH="$PATH:/usr/sbin:/sbin"

envoy="${PALISADE_ENVOY:-}"
if [ -z "$envoy" ]; then
    envoy="$(bash "$root/scripts/install-envoy.sh")"
fi

palisade="${PALISADE_BIN:-}"
if [ -z "$palisade" ]; then
    # dist: fat LTO and one codegen unit, as release artifacts are built (Cargo.toml).
    log "cargo build --profile dist -p palisade (a first dist build takes a while on a small machine)"
    (cd "$root" && cargo build --profile dist -p palisade >&2)
    palisade="${CARGO_TARGET_DIR:-$root/target}/dist/palisade"
fi
[ -x "$palisade" ] || { log "no palisade binary at $palisade"; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/palisade-bench.XXXXXX")"
bench_pid=""
cleanup() {
    local rc=$?
    # bench.py stops its own processes on SIGTERM; this covers an interrupted run.sh.
    if [ -n "$bench_pid" ] && kill -0 "$bench_pid" 2>/dev/null; then
        kill -TERM "$bench_pid" 2>/dev/null || true
        wait "$bench_pid" 2>/dev/null || true
    fi
    if [ "${BENCH_KEEP_WORK:-0}" = 1 ] || [ $rc -ne 0 ]; then
        log "scratch directory kept: $work"
    else
        rm -rf "$work"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

python3 "$here/bench.py" --palisade "$palisade" --envoy "$envoy" --work "$work" \
    --out "$here/results/latest.json" "$@" &
bench_pid=$!
wait "$bench_pid"
