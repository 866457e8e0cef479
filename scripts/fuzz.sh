#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a while: `scripts/fuzz.sh [SECONDS]` (default 20),
# starting from the inputs saved under fuzz/regressions/ and the local corpus in fuzz/corpus/.
# cargo-fuzz passes nightly -Z flags (sanitizer, coverage); RUSTC_BOOTSTRAP lets the stable
# toolchain take them. A crash leaves its input under fuzz/artifacts/ and fails the run: fix it,
# then save the input under fuzz/regressions/<target>/ so that `cargo test` replays it.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-20}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked (.ci/run does it)" >&2
  exit 1
fi
args=()
if [ -n "${GHMD_FUZZ_TARGET_DIR:-}" ]; then
  args+=(--target-dir "$GHMD_FUZZ_TARGET_DIR")
fi
for target in $(cargo fuzz list); do
  mkdir -p "fuzz/corpus/$target" "fuzz/regressions/$target"
  echo "-- $target: ${seconds} s"
  RUSTC_BOOTSTRAP=1 cargo fuzz run "${args[@]}" "$target" \
    "fuzz/corpus/$target" "fuzz/regressions/$target" \
    -- -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1 2>&1 |
    grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)' || true
  # The pipe hides cargo fuzz's status; a crash leaves an artifact behind.
  if compgen -G "fuzz/artifacts/$target/crash-*" >/dev/null ||
     compgen -G "fuzz/artifacts/$target/oom-*" >/dev/null ||
     compgen -G "fuzz/artifacts/$target/timeout-*" >/dev/null; then
    echo "fuzz target $target failed; inputs under fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
