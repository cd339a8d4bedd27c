#!/usr/bin/env bash
# The API contract check: runs the `portcullis` binary (`serve --dev`, nothing external)
# and lets schemathesis generate requests from docs/api/openapi.json — valid ones, invalid
# ones, and sequences that follow the spec's links — against both listeners. It fails
# when any answer is a 5xx, a status code or body the spec does not declare, a valid
# request refused, or an invalid one accepted (tests/contract/schemathesis.toml says
# which checks run where, and why some are off for a few operations).
#
#   scripts/api-contract.sh            # after `cargo build --bins`; part of scripts/test.sh
#   CONTRACT_MAX_EXAMPLES=200 scripts/api-contract.sh    # a longer run
#   CONTRACT_EXPLORE=1 scripts/api-contract.sh            # other inputs than CI's, each run
#
# Generation is deterministic (a fixed seed), so a failure reproduces with the same
# command; the report names each failing request as a curl line.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
st="$root/.tools/schemathesis/bin/schemathesis"
bin="${CARGO_TARGET_DIR:-$root/target}/debug/portcullis"
[ -x "$st" ] || { echo "api-contract: run scripts/install-prereqs.sh first" >&2; exit 1; }
[ -x "$bin" ] || { echo "api-contract: build first: cargo build --bins" >&2; exit 1; }

log() { printf '[api-contract] %s\n' "$*"; }

work=$(mktemp -d)
server=""
cleanup() {
  if [ -n "$server" ]; then
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
https_port=$(free_port)
admin_port=$(free_port)
https="https://127.0.0.1:$https_port"
admin="http://127.0.0.1:$admin_port"

"$bin" serve --dev --data-dir "$work/data" --listen "127.0.0.1:$https_port" \
  --admin-listen "127.0.0.1:$admin_port" >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 1 200); do
  curl -fs "$admin/readyz" >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.1
done
curl -fs "$admin/readyz" >/dev/null || { echo "api-contract: not ready" >&2; cat "$work/server.log" >&2; exit 1; }

# the bootstrap admin client --dev writes, and a token of it (scope portcullis:admin,
# which may use every route)
creds="$work/data/dev-credentials.json"
id=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["client_id"])' "$creds")
secret=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["client_secret"])' "$creds")
token=$(curl -fsk -u "$id:$secret" -d grant_type=client_credentials "$https/oauth2/token" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')

# The per-IP buckets of /auth/* allow 20 requests and one more every 3 s, and a client
# id that fails authentication a few times is backed off: generated requests would meet
# 429 after the first few and leave the handlers untested. The instance's own runtime
# settings (config center, application `portcullis`) lift both for this run, as an
# operator could.
curl -fsk -X PATCH -H "authorization: Bearer $token" -H 'content-type: application/json' \
  -d '{"set": [{"key": "protection.auth_rate.burst", "value": "1000000"},
               {"key": "protection.auth_rate.replenish_every", "value": "1us"},
               {"key": "protection.token_rate.burst", "value": "1000000"},
               {"key": "protection.token_rate.replenish_every", "value": "1us"},
               {"key": "protection.lockout.free_failures", "value": "1000000"},
               {"key": "protection.lockout.max_failures", "value": "2000000"},
               {"key": "protection.lockout.account_max_failures", "value": "2000000"}],
       "message": "api contract run: no rate limits, no lockout"}' \
  "$https/config/v1/dev/portcullis" >/dev/null
# (the scrape is read whole before grep looks at it: with pipefail, `curl | grep -q`
# fails when grep stops reading before curl is done writing)
applied() { grep -q '^portcullis_runtime_settings_version 1' <<<"$(curl -fs "$admin/metrics")"; }
for _ in $(seq 1 100); do
  applied && break
  sleep 0.1
done
applied ||
  { echo "api-contract: the runtime settings were not applied" >&2; cat "$work/server.log" >&2; exit 1; }

examples=${CONTRACT_MAX_EXAMPLES:-25}
# deterministic unless asked to explore (CONTRACT_EXPLORE=1: a new random seed each run,
# printed in the report so that a finding can be replayed with --seed)
generation=(--seed 20261130 --generation-deterministic)
[ "${CONTRACT_EXPLORE:-0}" = 1 ] && generation=()
run() { # name, base url, then schemathesis options
  local name=$1 url=$2
  shift 2
  log "$name: $url"
  SCHEMATHESIS_HOOKS="$root/tests/contract/hooks.py" \
    PORTCULLIS_TOKEN="$token" PORTCULLIS_CLIENT_ID="$id" PORTCULLIS_CLIENT_SECRET="$secret" "$st" --config-file tests/contract/schemathesis.toml run \
    docs/api/openapi.json --url "$url" --tls-verify false \
    --max-examples "$examples" "${generation[@]}" \
    --report junit --report-dir "$work/reports" "$@" || {
    log "$name: FAILED; the server's warnings and errors follow"
    grep -E 'WARN|ERROR' "$work/server.log" | tail -n 20 >&2 || true
    return 1
  }
}

status=0
# the admin listener serves /healthz, /readyz, /metrics and /admin/*; the rest is HTTPS
run "HTTPS listener" "$https" --exclude-path-regex '^/(healthz|readyz|metrics|admin/.*)$' || status=1
run "admin listener" "$admin" --include-path-regex '^/(healthz|readyz|metrics|admin/.*)$' || status=1
if ! kill -0 "$server" 2>/dev/null; then
  log "the server died during the run"
  cat "$work/server.log" >&2
  status=1
fi
[ "$status" -eq 0 ] && log "passed"
exit "$status"
