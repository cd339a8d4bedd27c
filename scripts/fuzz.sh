#!/usr/bin/env bash
# A short fuzzing run of every libFuzzer target in fuzz/ (JWT verification, the token
# endpoint's form and client authentication, config names and values, the forwarded
# headers), FUZZ_SECONDS each (default 25). Extra arguments name the targets to run
# (default: all).
#
# The targets are a member of the workspace and build in its dev profile, so they share
# most of the test build's compiled dependencies (those used with other features are
# compiled again); our own crates are compiled again with libFuzzer's coverage
# instrumentation (scripts/fuzz-rustc, cargo's RUSTC_WORKSPACE_WRAPPER). In a cold CI run
# on a 2-core machine that took 3 minutes, against 11 for an instrumented build of every
# dependency (cargo-fuzz's way); docs/security.md says what that trades.
# No sanitizer is needed: Rust code crashes without AddressSanitizer on a panic, an
# overflow (checks are on in this profile) or running out of memory.
#
# A crash fails the run and leaves its input in fuzz/artifacts/<target>/: reproduce it
# with `$CARGO_TARGET_DIR/debug/<target> <file>` after this script has built it, fix it,
# and turn the input into a test of the crate it belongs to.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

log() { printf '[fuzz] %s\n' "$*"; }

seconds=${FUZZ_SECONDS:-25}
target_dir="${CARGO_TARGET_DIR:-$root/target}"
# the corpus grows between runs on one machine, outside the clone; the checked-in seeds
# in fuzz/seeds/ are read every time but never written to
corpus="$target_dir/fuzz/corpus"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for f in fuzz/fuzz_targets/*.rs; do
    targets+=("$(basename "$f" .rs)")
  done
fi

log "building ${targets[*]} (our crates instrumented, dependencies shared with the tests where their features match)"
RUSTC_WORKSPACE_WRAPPER="$root/scripts/fuzz-rustc" cargo build -p portcullis-fuzz --bins

for t in "${targets[@]}"; do
  mkdir -p "$corpus/$t" "fuzz/artifacts/$t"
  out="$target_dir/fuzz/$t.log"
  log "$t: ${seconds}s"
  # -rss_limit_mb: an input that makes a parser allocate without bound is a crash too
  if ! "$target_dir/debug/$t" -artifact_prefix="fuzz/artifacts/$t/" \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    "$corpus/$t" "fuzz/seeds/$t" >"$out" 2>&1; then
    tail -n 60 "$out"
    log "$t: FAILED; the input is in fuzz/artifacts/$t/"
    exit 1
  fi
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb)|Done [0-9]+ runs' "$out" || true
done
log "no crash in ${#targets[@]} targets"
