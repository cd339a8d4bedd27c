#!/usr/bin/env bash
# Supply-chain policy (deny.toml) with cargo-deny: licences, banned crates (one crypto
# provider, aws-lc-rs; no OpenSSL), where crates come from, and security advisories when
# the advisory database can be fetched. Installs cargo-deny beside the build cache when it
# is missing (a few minutes, once per machine).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

log() { printf '[supply-chain] %s\n' "$*"; }

version=0.20.2
# installed beside the build cache, so a fresh clone on the same machine reuses them
tools="${CARGO_TARGET_DIR:-$root/target}/cargo-tools/root"
deny="$tools/bin/cargo-deny"
if ! "$deny" --version 2>/dev/null | grep -qx "cargo-deny $version"; then
  log "installing cargo-deny $version into $tools"
  # a build directory of its own: the tool's dependencies are not the project's
  # without the tool's own fat LTO and single codegen unit: they cost minutes of a
  # fresh machine's CI and buy nothing for a check that runs in seconds
  CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}/cargo-tools" \
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    cargo install --root "$tools" --locked --version "$version" cargo-deny
fi

# errors only: crates present in several versions are warnings in deny.toml, listed by
# running `cargo deny check bans` by hand, and would bury a finding in CI's log
"$deny" --locked --log-level error check licenses bans sources

# The advisory database is a git repository fetched over the network. Where it cannot be
# reached (machines that see only the package registries) the check cannot run; say so
# rather than pass silently or fail for a reason that is not a finding.
if "$deny" fetch db >/dev/null 2>&1; then
  "$deny" --locked --offline --log-level error check advisories
else
  log "WARNING: the advisory database could not be fetched; advisories were NOT checked"
fi
