#!/usr/bin/env python3
"""Verifies one Portcullis access token with PyJWT, a JOSE implementation that shares no
code with ours: the key comes from the instance's JWKS over HTTPS (trusting only the
given CA), the signature must be ES256, and `aud`, `iss`, `exp`, `iat` are checked.

Usage: verify.py JWKS_URL CA_FILE AUDIENCE ISSUER  (the token on stdin)

Prints the token's `sub` and exits 0 when it verifies; prints why and exits 1 otherwise.
Run by gateway/tests/it/token.rs; PyJWT comes from scripts/install-prereqs.sh.
"""

import ssl
import sys

import jwt


def main() -> int:
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    jwks_url, ca_file, audience, issuer = sys.argv[1:]
    token = sys.stdin.read().strip()
    context = ssl.create_default_context(cafile=ca_file)
    client = jwt.PyJWKClient(jwks_url, ssl_context=context, timeout=10)
    try:
        key = client.get_signing_key_from_jwt(token)
        claims = jwt.decode(
            token,
            key.key,
            algorithms=["ES256"],
            audience=audience,
            issuer=issuer,
            options={"require": ["exp", "iat", "iss", "aud", "sub"]},
        )
    except jwt.PyJWTError as e:
        print(f"rejected: {type(e).__name__}: {e}")
        return 1
    print(claims["sub"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
