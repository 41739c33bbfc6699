"""``GET /trace`` on the admin listener: the live trace stream as NDJSON.

One JSON object per line, in a chunked response, written as each traced
request finishes, until the client leaves:

- first ``{"subscribed": {<the filter>}}``, so a client knows it is listening;
- then one event per request that passes the filter (see :func:`afpa.machine.trace.event`);
- ``{"dropped": N}`` when N events were left out because the client read
  too slowly.

Query parameters (all optional): ``host``, ``path`` (a prefix), ``status``
(``404`` or ``5xx``), ``state`` (a state the request went through) and
``sample`` (1 in N).  It needs the admin token: the events carry request data.

A reader slower than the traffic never makes the server hold more than
:data:`MAX_QUEUED` events for it (plus the transport's own buffer): the
subscriber is the connection's push producer, so once the socket's buffer is
full it is paused and queues, and past the bound it counts what it drops.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from afpa.ops.adminauth import _json, _Refused, authorize
from afpa.machine.trace import FilterError, TraceFilter, TraceHub

MAX_QUEUED = 1000  # events held for one paused reader; past it they are dropped (and counted)


def _line(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


@implementer(IPushProducer)
class Subscriber:
    """One ``/trace`` client: writes events to ``request`` as they come, queues
    at most ``limit`` of them while the client's socket is full, drops and
    counts the rest."""

    def __init__(self, request: Any, hub: TraceHub, flt: TraceFilter, limit: int = MAX_QUEUED):
        self.request = request
        self.limit = limit
        self.queue: deque[bytes] = deque()
        self.dropped = 0
        self.paused = False
        self.gone = False
        request.registerProducer(self, True)
        request.write(_line({"subscribed": flt.describe()}))
        self.unsubscribe = hub.subscribe(flt, self.deliver)
        request.notifyFinish().addBoth(self._finished)

    def deliver(self, ev: dict) -> None:
        """A finished request for this client (the hub's callback)."""
        if self.gone:
            return
        if self.paused or self.queue:
            if len(self.queue) < self.limit:
                self.queue.append(_line(ev))
            else:
                self.dropped += 1
            return
        self.request.write(_line(ev))

    def _flush(self) -> None:
        while self.queue and not self.paused and not self.gone:
            self.request.write(self.queue.popleft())
        if self.dropped and not self.paused and not self.gone and not self.queue:
            n, self.dropped = self.dropped, 0
            self.request.write(_line({"dropped": n}))

    # IPushProducer: the connection tells us when its socket is full or drained.
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._flush()

    def stopProducing(self) -> None:
        self._stop()

    def _finished(self, _result: Any) -> None:
        self._stop()

    def _stop(self) -> None:
        if not self.gone:
            self.gone = True
            self.queue.clear()
            self.unsubscribe()


class TraceStream(Resource):
    """``GET /trace?host=&path=&status=&state=&sample=`` (token required)."""

    isLeaf = True

    def __init__(self, backend: Any):
        super().__init__()
        self.backend = backend  # afpa.ops.admin.AdminBackend: one server, or a supervisor

    def render_GET(self, request: Any) -> Any:
        try:
            if request.method != b"GET":  # twisted.web sends HEAD here: a stream has no head-only form
                request.setHeader(b"allow", b"GET")
                raise _Refused(405, "use GET for /trace (it streams)")
            authorize(request, self.backend.admin_token)
            args = {k.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in vs]
                    for k, vs in request.args.items()}
            flt = TraceFilter.from_query(args)
        except _Refused as exc:
            return _json(request, exc.status, {"error": str(exc)})
        except FilterError as exc:
            return _json(request, 400, {"error": str(exc)})
        request.setHeader(b"content-type", b"application/x-ndjson")
        request.setHeader(b"cache-control", b"no-store")
        Subscriber(request, self.backend.trace_hub, flt)
        return NOT_DONE_YET
