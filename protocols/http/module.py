"""The HTTP module as the runtime sees it (registered through the
``afpa.modules`` entry point, exactly as a third-party module would be)."""

from afpa.machine.modules import ProtocolModule, collect
from protocols.http.states import coalesce, deferred, remote, client as states, tracing
from protocols.http.policy import invalidation
from protocols.http.scopes import HttpGlobal, HttpRequest, carry_over

FACTS = {
    # client machine (request scope: HttpRequest)
    "request": "a parsed request (method, target, headers)",
    "route": "a routing decision: where a miss goes (docroot, remote, deferred)",
    "stale": "a stale cached object to revalidate",
    # backend machine (request scope: BackendExchange)
    "backend": "a connection to the backend",
    "forwarded": "the request head written to the backend",
    "relaying": "the backend's response head parsed and relayed to the client",
}
"""The contract words of the HTTP state functions (plus the runtime's ``response``)."""

MODULE = ProtocolModule(
    name="http",
    functions=collect([*states.FUNCTIONS, *coalesce.FUNCTIONS, *remote.FUNCTIONS, *deferred.FUNCTIONS]),
    table="http.toml",
    companions=("http-backend",),
    make_global=HttpGlobal.build,
    make_request=lambda conn: HttpRequest(),
    fail=states.fail,
    access_field=tracing.access_field,
    access_format=tracing.DEFAULT_FORMAT,
    trace_answer=tracing.trace_answer,
    trace_fields=tracing.trace_fields,
    facts=FACTS,
    invalidation=invalidation,
    carry_over=carry_over,
)
