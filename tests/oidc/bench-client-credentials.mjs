// oidc-provider issuing client_credentials access tokens as ES256 JWTs over TLS: the
// comparison point for Portcullis's token endpoint benchmark (gateway/benches/token_http.rs).
//
//   BENCH_PORT, BENCH_CERT, BENCH_KEY   where to listen and the TLS pair to serve
//   BENCH_CLIENT_SECRET                 the secret of client `bench`
//
// Single node process, as the provider is normally deployed per core.
import { generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';

import Provider from 'oidc-provider';

const port = Number(process.env.BENCH_PORT);
const issuer = `https://127.0.0.1:${port}`;
const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'bench',
    client_secret: process.env.BENCH_CLIENT_SECRET,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    token_endpoint_auth_method: 'client_secret_basic',
    id_token_signed_response_alg: 'ES256',
  }],
  jwks: { keys: [{ ...ec, kid: 'bench-es256', alg: 'ES256', use: 'sig' }] },
  scopes: ['jobs:run', 'jobs:read'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => 'urn:scheduler',
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: 'jobs:run jobs:read',
        audience: 'urn:scheduler',
        accessTokenTTL: 3600,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'ES256' } },
      }),
    },
  },
});

createServer(
  { cert: readFileSync(process.env.BENCH_CERT), key: readFileSync(process.env.BENCH_KEY) },
  provider.callback(),
).listen(port, '127.0.0.1', () => console.log(`bench provider on ${issuer}`));
