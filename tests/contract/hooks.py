"""schemathesis hooks of scripts/api-contract.sh (loaded through SCHEMATHESIS_HOOKS)."""

import os
from urllib.parse import unquote

import schemathesis
from schemathesis.core.parameters import ParameterLocation

# The environments `serve --dev` configures. Environments are deployment data
# (`config_center.environments`): the spec can only say "a configured one", and any
# other name is answered 400. A generated case whose path parameters are meant to be
# valid therefore gets one of these; a case that breaks its path parameters on purpose
# keeps what it was given, so the invalid names are still sent.
ENVIRONMENTS = ("dev", "test", "prod")


# An emergency rotation with no `kid` retires every key that still verifies, the one that
# signed the run's own access token included, and one naming that key (a value the
# generator may take from an earlier answer of GET /admin/keys) retires it: every later
# request of the run would be refused 401 (as it must be). Every generated emergency
# therefore names a key the ring does not hold and is answered 400 `unknown_kid`;
# gateway/tests/it/keys.rs performs real emergency rotations against OpenBao.
NO_SUCH_KID = "contract-run-no-such-key"


# Disabling or deleting a client, or revoking its tokens, cuts off every access token
# issued to it: done to the run's own client, every later request of the run would be
# refused 401 (as it must be). A generated case aimed at that client therefore aims at
# another id; gateway/tests/it/cutoff.rs and token.rs cut real clients off.
OWN_CLIENT = os.environ.get("PORTCULLIS_CLIENT_ID", "admin")
CUTTING = ("/admin/clients/{id}/disable", "/admin/clients/{id}/revoke-tokens")


def cuts_own_client(case):
    path = case.operation.path
    cutting = path in CUTTING or (path == "/admin/clients/{id}" and case.method.upper() == "DELETE")
    # compared as the server reads it: a path segment is percent-decoded (`%61dmin`
    # names `admin`)
    given = (case.path_parameters or {}).get("id")
    return cutting and isinstance(given, str) and unquote(given) == OWN_CLIENT


@schemathesis.hook
def map_case(context, case):
    if cuts_own_client(case):
        case.path_parameters["id"] = "contract-run-other-client"
    body = case.body
    if (
        case.operation.path == "/admin/keys/rotate"
        and isinstance(body, dict)
        and body.get("emergency") is True
    ):
        body["kid"] = NO_SUCH_KID
    params = case.path_parameters
    if not params or "env" not in params:
        return case
    meta = case.meta
    path = meta.components.get(ParameterLocation.PATH) if meta is not None else None
    if path is not None and path.mode.is_negative:
        return case
    if params["env"] not in ENVIRONMENTS:
        params["env"] = ENVIRONMENTS[len(str(params["env"])) % len(ENVIRONMENTS)]
    return case
