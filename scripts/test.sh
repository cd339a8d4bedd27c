#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (Redis,
# Postgres, nginx, OpenBao, the OIDC provider; idempotent) and runs every crate's tests
# against those real servers, then checks the running API against its OpenAPI reference
# (schemathesis) and the shipped Prometheus alert rules with promtool.
# Extra arguments go to `cargo test`.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/test.sh: cargo not found; install the Rust toolchain (rustup) first" >&2
  exit 1
fi

bash scripts/install-prereqs.sh

# Two cores: let cargo use both for building, and keep test threads modest so the real
# servers the tests start are not starved.
export RUST_TEST_THREADS=${RUST_TEST_THREADS:-4}

# Build every test, and with them the `portcullis` binary the end-to-end suites and the
# API contract run, before any test starts. `cargo test` builds it with the features the
# tests unify, so it is compiled once (the separate `cargo build --bins` this script ran
# before resolved the dependencies' features without the dev-dependencies, and ~34 crates
# were compiled twice).
cargo test --workspace --no-run
cargo test --workspace --no-fail-fast "$@"

# the running API against its reference, docs/api/openapi.json (schemathesis)
bash scripts/api-contract.sh

# the shipped alert rules, as Prometheus itself reads them, and their unit tests
"$root/.tools/prometheus/usr/bin/promtool" check rules deploy/prometheus/alerts.yml
"$root/.tools/prometheus/usr/bin/promtool" test rules deploy/prometheus/alerts.test.yml
