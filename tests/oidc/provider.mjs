// The OpenID Connect identity provider the Portcullis test harness runs (oidc-provider v9).
//
// Started by `harness::OidcProvider` (tests/src/oidc.rs), which passes everything through
// the environment so the Rust side stays the single source of truth:
//
//   OIDC_PORT        port to listen on (127.0.0.1); the issuer is http://127.0.0.1:PORT
//   OIDC_CLIENT      JSON {client_id, client_secret, redirect_uris, post_logout_redirect_uris}
//   OIDC_USERS       JSON [{username, password, email, name, groups}]
//   OIDC_STATE_DIR   directory for the signing keys and cookie keys, so a restart keeps them
//   OIDC_TRUST_CA_FILE  a PEM file of CA certificates trusted for the provider's own
//                    HTTPS requests (back-channel logout), read at each request so the
//                    harness can write it once the relying party's certificate exists
//
// What it offers: discovery, JWKS (one RS256 and one ES256 key), authorization code flow
// with PKCE (S256) required for every client, refresh tokens, userinfo, introspection,
// revocation, RP-initiated logout (end_session_endpoint) and back-channel logout (a
// logout token posted to a client's `backchannel_logout_uri`, when OIDC_CLIENT gives one;
// such a client also gets `sid` in its ID tokens). Two clients are registered
// from OIDC_CLIENT: `<client_id>` signs ID tokens RS256, `<client_id>-es256` signs ES256.
//
// Login and consent are small HTML forms served by this script (not oidc-provider's
// devInteractions) so that a wrong password is really rejected:
//   GET  /interaction/:uid          login form (username, password) or consent form
//   POST /interaction/:uid/login    checks the password against OIDC_USERS
//   POST /interaction/:uid/confirm  grants the requested scopes and claims
//   GET  /interaction/:uid/abort    ends the flow with access_denied
// Every form is `<form method="post" action="...">` with plain `<input name value>` fields,
// which is what the harness's browser driver fills in and submits.
//
// For tests that need a JWT only this provider could have made (a logout token with a
// claim changed), with NODE_ENV=test:
//   POST /test/sign   JSON {header, claims} -> the compact JWS, signed RS256 with the
//                     provider's RSA key (header members given override alg/kid; a
//                     member given as null is left out)

import { createPrivateKey, generateKeyPairSync, randomBytes, sign } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { join } from 'node:path';

import Provider from 'oidc-provider';

// === configuration from the environment ===

function requireEnv(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`provider.mjs: environment variable ${name} is required`);
    process.exit(64);
  }
  return value;
}

// Start-up phases with the process's age, so that a start that stalls shows where.
function phase(what) {
  console.log(`provider.mjs: ${what} at ${Math.round(process.uptime() * 1000)} ms`);
}
phase('modules loaded');

const port = Number(requireEnv('OIDC_PORT'));
const client = JSON.parse(requireEnv('OIDC_CLIENT'));
const users = JSON.parse(requireEnv('OIDC_USERS'));
const stateDir = requireEnv('OIDC_STATE_DIR');
const issuer = `http://127.0.0.1:${port}`;

// === keys that survive a restart ===

function loadOrCreate(file, create) {
  const path = join(stateDir, file);
  if (existsSync(path)) {
    return JSON.parse(readFileSync(path, 'utf8'));
  }
  const value = create();
  writeFileSync(path, JSON.stringify(value), { mode: 0o600 });
  return value;
}

const jwks = loadOrCreate('jwks.json', () => {
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
  const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
  return {
    keys: [
      { ...rsa, kid: `rsa-${randomBytes(4).toString('hex')}`, alg: 'RS256', use: 'sig' },
      { ...ec, kid: `ec-${randomBytes(4).toString('hex')}`, alg: 'ES256', use: 'sig' },
    ],
  };
});

const cookieKeys = loadOrCreate('cookie-keys.json', () => [randomBytes(32).toString('hex')]);
phase('keys ready');

// === accounts ===

const usersByName = new Map(users.map((u) => [u.username, u]));

async function findAccount(_ctx, sub) {
  const user = usersByName.get(sub);
  if (!user) {
    return undefined;
  }
  return {
    accountId: sub,
    async claims() {
      return {
        sub,
        email: user.email,
        email_verified: true,
        name: user.name,
        preferred_username: user.username,
        groups: user.groups,
      };
    },
  };
}

// === the provider ===

const clientBase = {
  client_secret: client.client_secret,
  redirect_uris: client.redirect_uris,
  post_logout_redirect_uris: client.post_logout_redirect_uris,
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  token_endpoint_auth_method: 'client_secret_basic',
  ...(client.backchannel_logout_uri
    ? {
      backchannel_logout_uri: client.backchannel_logout_uri,
      backchannel_logout_session_required: true,
    }
    : {}),
};

// === the provider's own HTTPS requests (back-channel logout) ===

// A fetch that trusts the CA in OIDC_TRUST_CA_FILE (the relying party's test CA) and
// reaches `localhost` over IPv4, where the relying party listens; without the file, the
// platform's fetch. The provider's default fetch also refuses loopback addresses, which is
// right for a real provider and exactly where a test's relying party is.
function trustingFetch(url, options) {
  const caFile = process.env.OIDC_TRUST_CA_FILE;
  if (!caFile || !existsSync(caFile) || new URL(url).protocol !== 'https:') {
    return globalThis.fetch(url, options);
  }
  const body = options.body === undefined ? undefined : Buffer.from(String(options.body));
  const headers = Object.fromEntries(new Headers(options.headers));
  if (body !== undefined) {
    headers['content-length'] = String(body.length);
  }
  return new Promise((resolve, reject) => {
    const req = httpsRequest(url, {
      method: options.method ?? 'GET',
      headers,
      ca: readFileSync(caFile),
      family: 4,
      signal: options.signal,
    }, (res) => {
      const chunks = [];
      res.on('data', (chunk) => chunks.push(chunk));
      res.on('error', reject);
      res.on('end', () => {
        const responseHeaders = new Headers();
        for (const [name, value] of Object.entries(res.headers)) {
          for (const one of [value].flat()) {
            responseHeaders.append(name, one);
          }
        }
        const empty = chunks.length === 0 || [204, 304].includes(res.statusCode);
        resolve(new Response(empty ? null : Buffer.concat(chunks), {
          status: res.statusCode,
          headers: responseHeaders,
        }));
      });
    });
    req.on('error', reject);
    req.end(body);
  });
}

const provider = new Provider(issuer, {
  clients: [
    { ...clientBase, client_id: client.client_id, id_token_signed_response_alg: 'RS256' },
    { ...clientBase, client_id: `${client.client_id}-es256`, id_token_signed_response_alg: 'ES256' },
  ],
  jwks,
  cookies: { keys: cookieKeys },
  findAccount,
  fetch: trustingFetch,
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  // Put the scope claims (email, groups, ...) into the ID token too, as many IdPs do, so a
  // relying party does not need a userinfo round trip to learn them.
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  // Any client allowed the refresh_token grant gets one, without demanding offline_access.
  issueRefreshToken: async (_ctx, c) => c.grantTypeAllowed('refresh_token'),
  interactions: {
    url: (_ctx, interaction) => `/interaction/${interaction.uid}`,
  },
  features: {
    devInteractions: { enabled: false },
    rpInitiatedLogout: {
      enabled: true,
      async logoutSource(ctx, form) {
        const confirm = '<input type="hidden" name="logout" value="yes"/><button type="submit">Sign out</button></form>';
        ctx.body = page('Sign out', `<h1>Sign out of ${escapeHtml(ctx.host)}?</h1>${form.replace('</form>', confirm)}`);
      },
      async postLogoutSuccessSource(ctx) {
        ctx.body = page('Signed out', '<h1>Signed out</h1>');
      },
    },
    backchannelLogout: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    userinfo: { enabled: true },
  },
  renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = page('Error', `<h1>Error</h1><pre id="error">${escapeHtml(JSON.stringify(out))}</pre>`);
  },
});

provider.on('backchannel.success', (_ctx, c, accountId) => {
  console.log(`back-channel logout of ${accountId} delivered to ${c.clientId}`);
});
provider.on('backchannel.error', (_ctx, err, c, accountId) => {
  console.error(`back-channel logout of ${accountId} to ${c.clientId} failed: ${err.message}`);
});

// === test-only signing ===

const rsaJwk = jwks.keys.find((k) => k.kty === 'RSA');
const rsaKey = createPrivateKey({ key: rsaJwk, format: 'jwk' });

function signJwt(headerGiven, claims) {
  const header = { alg: 'RS256', kid: rsaJwk.kid, ...headerGiven };
  for (const [name, value] of Object.entries(header)) {
    if (value === null) {
      delete header[name];
    }
  }
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const input = `${encode(header)}.${encode(claims)}`;
  const signature = sign('sha256', Buffer.from(input), rsaKey).toString('base64url');
  return `${input}.${signature}`;
}

async function handleTestSign(req, res) {
  const chunks = [];
  for await (const chunk of req) {
    chunks.push(chunk);
  }
  const { header, claims } = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  res.statusCode = 200;
  res.setHeader('Content-Type', 'application/jwt');
  res.end(signJwt(header ?? {}, claims));
}

// === interaction pages ===

function escapeHtml(value) {
  return String(value)
    .replaceAll('&', '&amp;')
    .replaceAll('<', '&lt;')
    .replaceAll('>', '&gt;')
    .replaceAll('"', '&quot;')
    .replaceAll("'", '&#39;');
}

function page(title, body) {
  return `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head><body>${body}</body></html>`;
}

function loginPage(uid, clientId, error) {
  const message = error ? `<p id="error">${escapeHtml(error)}</p>` : '';
  return page('Sign in', `<h1>Sign in to ${escapeHtml(clientId)}</h1>${message}
<form method="post" action="/interaction/${uid}/login">
<input type="text" name="username" value="" autofocus/>
<input type="password" name="password" value=""/>
<button type="submit">Sign in</button>
</form>`);
}

function consentPage(uid, clientId, scopes) {
  return page('Authorize', `<h1>Allow ${escapeHtml(clientId)} access?</h1>
<p id="scopes">${escapeHtml(scopes.join(' '))}</p>
<form method="post" action="/interaction/${uid}/confirm">
<input type="hidden" name="consent" value="yes"/>
<button type="submit">Allow</button>
</form>
<a href="/interaction/${uid}/abort">Deny</a>`);
}

function send(res, status, html) {
  res.statusCode = status;
  res.setHeader('Content-Type', 'text/html; charset=utf-8');
  res.setHeader('Cache-Control', 'no-store');
  res.end(html);
}

async function readForm(req) {
  const chunks = [];
  for await (const chunk of req) {
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

async function handleInteraction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) {
    send(res, 400, page('Error', '<p id="error">interaction mismatch</p>'));
    return;
  }
  const { prompt, params, session, grantId } = details;

  if (req.method === 'GET' && action === undefined) {
    if (prompt.name === 'login') {
      send(res, 200, loginPage(uid, params.client_id));
    } else {
      send(res, 200, consentPage(uid, params.client_id, String(params.scope ?? '').split(' ')));
    }
    return;
  }

  if (req.method === 'GET' && action === 'abort') {
    await provider.interactionFinished(req, res, {
      error: 'access_denied',
      error_description: 'End-User aborted interaction',
    }, { mergeWithLastSubmission: false });
    return;
  }

  if (req.method === 'POST' && action === 'login' && prompt.name === 'login') {
    const form = await readForm(req);
    const user = usersByName.get(form.get('username') ?? '');
    if (!user || user.password !== form.get('password')) {
      send(res, 200, loginPage(uid, params.client_id, 'Invalid username or password.'));
      return;
    }
    await provider.interactionFinished(req, res, {
      login: { accountId: user.username },
    }, { mergeWithLastSubmission: false });
    return;
  }

  if (req.method === 'POST' && action === 'confirm' && prompt.name === 'consent') {
    await readForm(req);
    const grant = grantId
      ? await provider.Grant.find(grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const { details: missing } = prompt;
    if (missing.missingOIDCScope) {
      grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    }
    if (missing.missingOIDCClaims) {
      grant.addOIDCClaims(missing.missingOIDCClaims);
    }
    if (missing.missingResourceScopes) {
      for (const [indicator, scope] of Object.entries(missing.missingResourceScopes)) {
        grant.addResourceScope(indicator, scope.join(' '));
      }
    }
    await provider.interactionFinished(req, res, {
      consent: { grantId: await grant.save() },
    }, { mergeWithLastSubmission: true });
    return;
  }

  send(res, 400, page('Error', `<p id="error">unexpected ${escapeHtml(req.method)} for prompt ${escapeHtml(prompt.name)}</p>`));
}

// === server ===

const providerCallback = provider.callback();
const interactionPath = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|confirm|abort))?$/;

const server = createServer((req, res) => {
  const { pathname } = new URL(req.url, issuer);
  if (pathname === '/test/sign' && req.method === 'POST' && process.env.NODE_ENV === 'test') {
    handleTestSign(req, res).catch((err) => {
      console.error('test signing failed:', err);
      res.statusCode = 400;
      res.end(String(err.message));
    });
    return;
  }
  const match = interactionPath.exec(pathname);
  if (!match) {
    providerCallback(req, res);
    return;
  }
  handleInteraction(req, res, match[1], match[2]).catch((err) => {
    console.error('interaction failed:', err);
    if (!res.headersSent) {
      send(res, err.statusCode ?? 500, page('Error', `<p id="error">${escapeHtml(err.message)}</p>`));
    }
  });
});

phase(`listening on 127.0.0.1:${port}`);
server.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider ready: issuer ${issuer}`);
});

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
