#!/usr/bin/env bash
# Runs every Palisade check: installs what the tests need, then format, lints and all tests.
# This is the README's test command and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> test tools"
bash scripts/install-test-deps.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"

# One closing line over every test binary (the last binary cargo runs is a doc-test one).
summary="$(awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "%d passed, %d failed, %d skipped", p, f, i }' "$log")"
echo
echo "$summary"
case "$summary" in
  "0 passed"*) echo "error: no test ran" >&2; exit 1 ;;
esac
