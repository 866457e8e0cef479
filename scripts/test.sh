#!/usr/bin/env bash
# Runs every test of ghmd: formatting, lints, the Rust unit, property and integration tests.
# Later sections (Python client, deployment checks) are added here as they land, so that this one
# command stays the whole truth for newcomers and for CI.
set -euo pipefail
cd "$(dirname "$0")/.."

# On a fresh machine this installs what the sections below need; afterwards it is a no-op.
scripts/setup.sh
export PATH="$HOME/.cache/ghmd-ci/cargo-fuzz/bin:$PATH"
export GHMD_FUZZ_TARGET_DIR="${GHMD_FUZZ_TARGET_DIR:-$HOME/.cache/ghmd-ci/fuzz-target}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked --all-targets
echo "== fuzz: every cargo-fuzz target for 20 s"
scripts/fuzz.sh 20
# pytest includes the failover fault schedule (tests/test_failover.py: 3 replicas behind Debian's
# haproxy and nginx, about 80 s).
echo "== Python client: pytest against a release ghmd"
cargo build --release --locked --bin ghmd
venv=$(scripts/python-venv.sh)
ghmd_bin="$PWD/target/release/ghmd"
# The servers pytest starts keep no state and take any free metrics port, so that several can
# run at once without sharing ./ghmd-data or 127.0.0.1:9464.
(cd clients/python && GHMD_BIN="$ghmd_bin" GHMD_IN_MEMORY=true GHMD_METRICS_LISTEN=127.0.0.1:0 \
  "$venv/bin/python" -m pytest)
echo "== operations: deploy files, promtool, a Prometheus server scraping ghmd"
scripts/ops-checks.sh
# setup.sh installs podman; without it (a machine where apt-get cannot run) the section is skipped.
if command -v podman >/dev/null; then
  echo "== containers: the image built with podman, one container, 3 replicas behind HAProxy"
  scripts/container-test.sh
else
  echo "== containers: SKIPPED, podman is not installed"
fi
