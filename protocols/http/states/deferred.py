"""Derive Deferred Response: hand the connection to a local server.

The request that chose this route, and every byte the client sent after it, is
replayed to the server, and the two connections are spliced until either side
closes (``afpa.net.splice``).  Only routes the operator made deferred come here;
an ``Upgrade`` request on a remote route is forwarded and spliced by the backend
machine once the backend answers 101 (``protocols.http.states.remote``).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import TimeoutError as ConnectTimeout

from afpa.machine.modules import state
from afpa.net.verbs import splice
from protocols.http.wire.responses import set_error


@state("spliced", "failed", needs=("request", "route"), provides={"failed": ("response",)})
def derive_deferred_response(g: Any, conn: Any, req: Any) -> Any:
    """Splice the client with the route's local server (``failed``: 502/504 set)."""
    backend = g.pools.pick(req.route).backend
    # Everything from this request's first byte on is the server's to read.
    conn.inbuf, conn.inpos, conn.scan, conn.pending = conn.inbuf[req.raw_start:], 0, 0, None
    d = splice(g.reactor, conn, backend.host, backend.port, g.settings.backend_connect_timeout,
               g.settings.tunnel_idle_timeout)

    def refused(failure: Any) -> str:
        req.cache_status = b"afpa; fwd=bypass; detail=backend-error"
        if failure.check(ConnectTimeout):
            set_error(g, req, 504, "local server did not accept the connection in time", close=True)
        else:
            set_error(g, req, 502, "cannot connect to the local server", close=True)
        return "failed"

    return d.addErrback(refused)


FUNCTIONS = (derive_deferred_response,)
