#!/usr/bin/env bash
# A short fuzzing run of every cargo-fuzz target in fuzz/ (JWT verification, the token
# endpoint's form and client authentication, config names and values, the forwarded
# headers), FUZZ_SECONDS each (default 25). Installs cargo-fuzz beside the build cache when
# it is missing. Works on a stable toolchain: no sanitizer (`-s none`), coverage
# instrumentation only; Rust code needs no AddressSanitizer to crash on a panic, an
# overflow (checks are on) or running out of memory.
#
# A crash fails the run and leaves its input in fuzz/artifacts/<target>/: reproduce it
# with `cargo fuzz run -s none <target> <file>`, fix it, and turn the input into a test
# of the crate it belongs to. Extra arguments name the targets to run (default: all).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

log() { printf '[fuzz] %s\n' "$*"; }

version=0.13.2
# installed beside the build cache, so a fresh clone on the same machine reuses them
tools="${CARGO_TARGET_DIR:-$root/target}/cargo-tools/root"
export PATH="$tools/bin:$PATH"
if ! cargo-fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $version"; then
  log "installing cargo-fuzz $version into $tools"
  CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}/cargo-tools" \
    cargo install --root "$tools" --locked --version "$version" cargo-fuzz
fi

seconds=${FUZZ_SECONDS:-25}
build="${CARGO_TARGET_DIR:-$root/target}/fuzz"
# the corpus grows between runs on one machine, outside the clone; the checked-in seeds
# in fuzz/seeds/ are read every time but never written to
corpus="$build/corpus"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi

# many codegen units: the instrumented build of the whole gateway dominates a short run
opts=(-s none --fuzz-dir fuzz --target-dir "$build" --codegen-units 16)
cargo fuzz build "${opts[@]}"
for t in "${targets[@]}"; do
  mkdir -p "$corpus/$t"
  log "$t: ${seconds}s"
  # -rss_limit_mb: an input that makes a parser allocate without bound is a crash too
  if ! cargo fuzz run "${opts[@]}" "$t" "$corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    >"$build/$t.log" 2>&1; then
    tail -n 60 "$build/$t.log"
    log "$t: FAILED; the input is in fuzz/artifacts/$t/"
    exit 1
  fi
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb)|Done [0-9]+ runs' "$build/$t.log" || true
done
log "no crash in ${#targets[@]} targets"
