"""The HTTP module as the runtime sees it (registered through the
``afpa.modules`` entry point, exactly as a third-party module would be)."""

from afpa.machine.modules import Peering, ProtocolModule, collect
from afpa.machine.scopes import request_factory
from protocols.http.states import coalesce, deferred, remote, client as states, tracing
from protocols.http.policy import invalidation
from protocols.http.scopes import HttpGlobal, HttpRequest, carry_over
from protocols.http.settings import (SETTINGS, SIBLING_TOKEN_ENV, join_siblings, own_siblings,
                                     stream_limits)
from protocols.http.states.siblings import LISTENER

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
    make_request=request_factory(HttpRequest),
    fail=states.fail,
    access_field=tracing.access_field,
    access_format=tracing.DEFAULT_FORMAT,
    trace_answer=tracing.trace_answer,
    trace_fields=tracing.trace_fields,
    facts=FACTS,
    invalidation=invalidation,
    carry_over=carry_over,
    settings=SETTINGS,
    url_schemes=("http", "https"),
    alpn=(b"http/1.1",),
    describe=HttpGlobal.describe,
    sweep=HttpGlobal.sweep,
    metrics=HttpGlobal.metrics,
    listeners=HttpGlobal.listeners,
    stream_limits=stream_limits,
    peering=Peering(listener=LISTENER, token_env=SIBLING_TOKEN_ENV, join=join_siblings,
                    configured=own_siblings, mark=HttpGlobal.mark_sibling),
)
