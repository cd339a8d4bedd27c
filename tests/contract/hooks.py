"""schemathesis hooks of scripts/api-contract.sh (loaded through SCHEMATHESIS_HOOKS)."""

import os

import schemathesis
from schemathesis.core.parameters import ParameterLocation

# The environments `serve --dev` configures. Environments are deployment data
# (`config_center.environments`): the spec can only say "a configured one", and any
# other name is answered 400. A generated case whose path parameters are meant to be
# valid therefore gets one of these; a case that breaks its path parameters on purpose
# keeps what it was given, so the invalid names are still sent.
ENVIRONMENTS = ("dev", "test", "prod")


# An emergency rotation with no `kid` retires every key that still verifies, the one that
# signed the run's own access token included: every later request of the run would be
# refused 401 (as it must be). A generated emergency therefore names a key the ring does
# not hold and is answered 400 `unknown_kid`; gateway/tests/it/keys.rs performs real
# emergency rotations against OpenBao.
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
    return cutting and (case.path_parameters or {}).get("id") == OWN_CLIENT


@schemathesis.hook
def map_case(context, case):
    if cuts_own_client(case):
        case.path_parameters["id"] = "contract-run-other-client"
    body = case.body
    if (
        case.operation.path == "/admin/keys/rotate"
        and isinstance(body, dict)
        and body.get("emergency") is True
        and body.get("kid") is None
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
