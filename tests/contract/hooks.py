"""schemathesis hooks of scripts/api-contract.sh (loaded through SCHEMATHESIS_HOOKS)."""

import schemathesis
from schemathesis.core.parameters import ParameterLocation

# The environments `serve --dev` configures. Environments are deployment data
# (`config_center.environments`): the spec can only say "a configured one", and any
# other name is answered 400. A generated case whose path parameters are meant to be
# valid therefore gets one of these; a case that breaks its path parameters on purpose
# keeps what it was given, so the invalid names are still sent.
ENVIRONMENTS = ("dev", "test", "prod")


@schemathesis.hook
def map_case(context, case):
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
