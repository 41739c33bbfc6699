"""Derive Remote Response: forward a request to a backend and relay its answer.

``derive_remote_response`` (a state of the client machine) starts an
:class:`~afpa.net.outbound.Exchange` running ``statetables/http-backend.toml``,
whose states are the ``backend_*`` functions below:

    backend_buffer_body -> backend_connect (-> backend_wait_turn) -> backend_send_request
        -> backend_read_head -> backend_stream_body -> @done (pool) / @close
        -> backend_tunnel (after a 101 to a WebSocket upgrade) -> @close
        -> backend_refresh (a 304 to a revalidation) -> @done

The word that ends the backend machine is its result, handed back to the client
machine as the outcome of ``derive_remote_response`` (``relayed``, ``close``,
``answered``, ``refreshed``, ``upgraded``, or one of :data:`FAILURES`); the
backend connection goes back to the pool after ``@done`` when it can carry
another request (:meth:`BackendExchange.finish`).

Events are outcomes of the backend table too: the client's ``peer_closed``
(``backend_client_gone``: the backend connection is cut) and the deadlines the
states arm on the client connection (``timeout``: ``backend_body_timeout`` 408,
``backend_queue_timeout`` 503, ``backend_first_byte_timeout`` 504,
``backend_body_stalled`` cuts both); the client's ``input`` runs the waiting
state again (a body buffered, or streamed to the backend).

Revalidation (RFC 9111 4.3): a stale stored response reaches this machine on
the client request (``req.stale``, left by ``derive_cached_response``).  When it
has a validator, ``backend_send_request`` makes the request conditional
(If-None-Match with its ETag, else If-Modified-Since with its Last-Modified,
replacing the client's own preconditions).  A 304 goes to ``backend_refresh``,
which stores a refreshed copy (fields updated from the 304, freshness computed
again) and answers the client from it; any other answer is relayed and stored
as usual, and a stale copy it does not replace is dropped (unless a 5xx).
Responses with ``Vary`` are stored as variants (``cachepolicy.secondary_key``).

Protocol upgrades: a WebSocket opening handshake is forwarded like any request
(its head rewritten, only ``Upgrade: websocket`` and ``Connection: Upgrade``
sent again); only when the backend answers ``101`` is the 101 relayed and the
client connection spliced with that backend connection (``afpa.net.splice``), which
then never returns to the pool.  Any other answer is relayed as usual and the
client connection stays parsed.  A 101 to a request that did not ask for it,
or to another protocol than the one asked for, is a 502.

Transfer codings: a backend body framed by chunked is de-chunked and chunked
again toward an HTTP/1.1 client; other codings (e.g. ``gzip``) are passed on
untouched and named in the client's ``Transfer-Encoding`` (``gzip, chunked``).
When chunked is not the final coding, the body ends when the backend closes
(RFC 9112 6.3).  An HTTP/1.0 client cannot receive a transfer coding: 502.
Transfer-coded bodies are never stored.

A small request body (``limits.buffer_body``) is read completely before a backend
connection is taken, so a slow uploader holds none while it trickles; larger
bodies stream.  Connections per backend are bounded: past the bound a request
waits its turn in the pool's queue (503 when the queue is full or the wait
times out).

Streaming both ways with back-pressure: the request body is read from the
client connection as it arrives and written to the backend (client reading is
paused while the backend's buffer is full); the response body is relayed as
it arrives (backend reading is paused while the client's buffer is full).
Both are the runtime's ``verbs.pace``; this module acts on connections only
through ``afpa.net.verbs``.

Faults: connect refused -> 502, connect or first-byte timeout -> 504, a
malformed response head -> 502 (never relayed, never cached), a backend that
dies mid-body -> the client connection is cut, never finished cleanly, and
nothing is stored; a body delimited by the close is complete only on a clean
close, never on a reset.  Every backend fault is counted per reason in the
backend's pool (``afpa_backend_failures_total``) and logged, rate-limited; the
client's error body says only a short fixed phrase.  A bad chunk from the
client drops the backend connection,
so no clean terminating chunk ever reaches the backend.  A request is retried
once on a fresh connection only when it is idempotent, has no body and no byte
of a response had arrived.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeout

from afpa.cache.store import CacheObject, fragments_of
from afpa.machine.modules import PEER_CLOSED, TIMEOUT, state
from afpa.machine.scopes import WORK
from afpa.machine.scopes import Connection, Request
from afpa.net import verbs
from protocols.http.policy import cachepolicy, forward, invalidation, ranges
from protocols.http.states import coalesce, tracing
from protocols.http.states import siblings as siblings_rules
from protocols.http.wire.errors import HttpError
from protocols.http.wire.parser import ChunkedBody, LengthBody, parse_response_head
from protocols.http.wire.responses import http_date, set_error
from protocols.http.scopes import HttpRequest
from protocols.http.states.client import _answer, answer_stale, settle_body

FAILURES = ("failed", "aborted", "stale", "fallback")
"""The backend machine's failure results (:meth:`BackendExchange.fail`): each
ends it on ``@close`` and is an outcome of the client state that forwarded."""
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
UNTIL_CLOSE = "until-close"
_NOTHING: frozenset = frozenset()
_SHORT_HEAD_FIELDS = frozenset({b"etag", b"last-modified", b"cache-control", b"expires",
                                b"content-location", b"vary", b"via", b"date"})


@attrs.define(slots=True, eq=False)
class BackendExchange(Request):
    """The backend machine's request scope: one forwarded request and its answer."""

    g: Any = None
    cconn: Any = None            # the client connection
    creq: Any = None             # the client request
    pool: Any = None
    proto: Any = None            # the backend connection (routing.pool.BackendProtocol)
    retried: bool = False
    runner: Any = None           # the Exchange driving this scope
    client_gone: bool = False
    connecting: Any = None       # the Deferred of a connection being opened
    queued: bool = False         # waiting in the pool's queue
    granted: Any = None          # what the queue handed over: a connection, or a slot
    probe: Any = None            # a chunked body's reader while buffering it
    probed: int = 0              # bytes of the body checked so far (from cconn.inpos)
    buffering: bool = False
    sent_continue: bool = False
    interims: int = 0            # 1xx interim responses relayed to the client (bounded)
    # request body upload
    upload: Any = None           # the client's body reader while forwarding
    upload_chunked: bool = False
    upload_done: bool = True
    upload_error: Any = None
    # response, as parsed
    version: int = 11
    reason: bytes = b""
    headers: list | None = None
    lnames: list | None = None
    out: list | None = None      # the response head, written with the first body bytes
    content_length: int = -1
    chunked: bool = False
    codings: bytes = b""         # transfer codings other than chunked, e.g. b"gzip"
    keep_alive: bool = True
    upgrade: bytes | None = None  # the protocol asked for (WebSocket), if any
    reader: Any = None
    client_chunked: bool = False
    client_close: bool = False
    relaying: bool = False
    # Range misses fetched whole (cache.range_miss = "whole"; see _range_from_whole)
    whole: bool = False          # Range and If-Range were not forwarded
    held: bool = False           # nothing relayed: answered from the stored object once complete
    part: Any = None             # (start, stop): the one range relayed from a 200 not stored
    part_pos: int = 0
    store: list | None = None
    store_size: int = 0
    reserved: int = 0            # in-flight bytes reserved for ``store``
    request_time: float = 0.0    # when the request head went to the backend (RFC 9111 4.2.3)
    meta: Any = None             # cachepolicy.StoredMeta of a response being stored
    strip: frozenset = frozenset()  # fields left out of the stored head (no-cache="f", private="f")
    vary: tuple | None = None    # the response's Vary names (its variant's selector)
    revalidating: Any = None     # the stale stored object a conditional request asks about
    background: bool = False     # a refresh with no client (stale-while-revalidate, grace)
    sibling: Any = None          # routing.siblings.Siblings when asking a key's owner (siblings.py)
    replica: bool = False        # ... for a hot key: its answer is stored here too, as an origin's

    # -- failure paths --------------------------------------------------------

    def fail(self, status: int, detail: str, reason: str = "") -> str:
        """Nothing usable came from the backend: answer the client ``status``
        if no byte of a response went to it yet, else cut the client.  A request
        body that turned out malformed is the client's fault: its 4xx wins.
        ``reason`` (one of routing.pool.FAILURE_REASONS) counts and logs it as the
        backend's failure.  Returns the outcome (one of :data:`FAILURES`) the
        state returns, which the backend table takes to ``@close`` and the
        client machine's table maps: ``failed`` (an error answer is on the
        client request), ``aborted`` (the client was cut), ``stale`` (answered
        from the stale stored response) or ``fallback`` (a sibling gave no
        answer: ask the origin)."""
        if reason:
            self.pool.failed(reason, detail if reason == "malformed_head" else "")
        if self.sibling is not None and not (self.relaying or self.creq.sent_head or self.client_gone):
            # The owner gave no answer: the client machine asks the origin
            # instead (a busy owner is tried again next time, a gone one not for a while).
            self.sibling.failed(self.pool, self.g.reactor.seconds(),
                                down=reason not in ("queue_full", "queue_timeout"))
            return "fallback"
        if self.background:
            return "failed"  # nobody to answer; the stale copy stays as it was
        if self.relaying or self.creq.sent_head:
            return self.abort_client()
        if self.upload_error is not None:
            status, detail = self.upload_error.status, self.upload_error.detail
            self.creq.close = True
        elif (self.creq.stale is not None and self.creq.stale.meta is not None
              and self.creq.stale.meta.must_revalidate):
            # must-revalidate / proxy-revalidate: an unvalidated copy is never
            # an answer, and the failure says "no timely answer" (RFC 9111 5.2.2.2).
            status = 504
        elif self.creq.stale is not None and _stale_if_error(self, b""):
            return "stale"
        self.creq.close = self.creq.close or not self.upload_done
        settle_body(self.g, self.cconn, self.creq)
        self.creq.cache_status = (self.creq.cache_status or b"afpa; fwd=bypass") + b"; detail=backend-error"
        set_error(self.g, self.creq, status, detail)
        return "failed"

    def abort_client(self) -> str:
        """Cut the client connection: a response that started cannot end
        cleanly (``aborted``; a held response not yet relayed gets a 502 instead)."""
        if self.held and not self.client_gone:
            self.held = False  # nothing went to the client yet: it gets a 502 instead
            self.drop_store()
            return self.fail(502, "backend closed the connection without a complete response")
        self.drop_store()
        if not self.cconn.closed:
            verbs.abort(self.cconn)
        return "aborted"

    def on_failure(self) -> str:
        """A backend state raised: 502 or a cut client, and a dropped backend."""
        return self.fail(502, "internal error while forwarding", "internal")

    def drop_backend(self) -> None:
        """Give up the backend connection (a deadline passed, or the client
        left): it is cut and never reused."""
        self.keep_alive = False
        if self.proto is not None and not self.proto.closed:
            verbs.abort(self.runner.conn)

    def turn(self, proto: Any) -> None:
        """The pool's queue reached this request: ``proto`` is a connection
        handed over, None a free slot to open one in."""
        self.queued = False
        self.granted = proto if proto is not None else True
        self.runner.poke()

    def disarm(self) -> None:
        """No deadline of ours until the next :meth:`arm` (the connect has its own)."""
        self.cconn.deadline = float("inf")

    def arm(self, seconds: float) -> None:
        """(Re)start the deadline: the client connection carries it, so the
        server's once-a-second sweep finds it without a timer per request, and
        the client's driver delivers ``timeout`` to this exchange's machine
        (the waiter on that connection), whose table maps it."""
        self.cconn.arm(self.g.reactor.seconds() + seconds, WORK)

    def drop_store(self) -> None:
        """Stop collecting the response for the cache; give its bytes back."""
        self.store = None
        if self.reserved:
            self.g.cache.unreserve(self.reserved)
            self.reserved = 0

    def finish(self, close: bool) -> None:
        """The backend machine ended: tidy both connections."""
        self.drop_store()
        if self.g.flights.inflight:
            coalesce.leader_ended(self.g, self.creq)  # coalesced waiters try for themselves
        cconn = self.cconn
        if self.queued:
            self.queued = False
            self.pool.leave(self.turn)
        if self.granted is not None:
            # Handed over but never used (the machine ended first): pass it on.
            self.pool.decline(None if self.granted is True else self.granted, self.g.reactor.seconds())
            self.granted = None
        if self.relaying and not cconn.closed:
            verbs.unpace(cconn)
        proto = self.proto
        if proto is None:
            return
        bconn = self.runner.conn  # attached to proto
        verbs.unpace(bconn)
        # Ended on @done: the pool takes the connection when it can carry
        # another request (the response was read to its end, nothing extra came).
        if close or not self.keep_alive or not self.upload_done or proto.closed or bconn.unread():
            proto.owner = None
            verbs.close(bconn)
        else:
            verbs.resume_reading(bconn)  # reading may have been paused by the client
            self.pool.release(proto, self.g.reactor.seconds())
        self.proto = None

    # -- request body upload --------------------------------------------------

    def pump_upload(self) -> None:
        """Client input while forwarding (the states waiting for the response
        run again on ``input``): move request-body bytes to the backend."""
        cconn = self.cconn
        if self.upload_done or self.proto is None:
            return
        try:
            pos, pieces, finished = self.upload.read(cconn.inbuf, cconn.inpos)
        except HttpError as exc:
            # Never let a clean end of body reach the backend: drop it, and tell
            # the client its body was bad (unless a response is already on its way).
            self.upload_done = True
            self.upload_error = exc
            verbs.abort(self.runner.conn)
            return
        cconn.inpos = cconn.scan = pos
        out = forward.frame(pieces, self.upload_chunked, finished)
        if out:
            verbs.write(self.runner.conn, out)
        if finished:
            self.upload_done = True
            cconn.pending = None
            verbs.unpace(self.runner.conn)
            verbs.resume_reading(cconn)


# -- the client machine's state ------------------------------------------------

@state("relayed", "close", "failed", "aborted", "upgraded", "answered", "refreshed", "stale",
       needs=("request", "route"),
       provides={"failed": ("response",), "answered": ("response",), "refreshed": ("response",),
                 "stale": ("response",)})
def derive_remote_response(g: Any, conn: Any, req: Any) -> Any:
    """Forward the request to the route's backend; the backend machine relays
    the answer (``relayed``/``close``), or leaves a 502/504 on the request
    (``failed``), or had to cut a response short (``aborted``), or relayed a
    101 and spliced the connection until it closed (``upgraded``), or stored a
    whole response fetched for a Range request and left the ranged answer on the
    request (``answered``).  With a stale stored response on the request
    (``req.stale``) the request is made conditional; when the backend answers
    304 the refreshed stored response is left on the request (``refreshed``);
    when the backend fails (refused, timed out, 5xx) and the stale response's
    ``stale-if-error`` allows, that response is left on the request (``stale``)."""
    if req.method == b"CONNECT":
        # afpa is a reverse proxy: it opens no tunnels to wherever a client names.
        set_error(g, req, 405, "CONNECT is not served here", extra=b"Allow: GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH\r\n")
        settle_body(g, conn, req)
        return "failed"
    ex = BackendExchange(g=g, cconn=conn, creq=req, pool=g.pools.pick(req.route), trace=req.trace)
    ex.whole = (req.range is not None and req.key is not None and req.method == b"GET"
                and g.settings.range_miss == "whole")
    return _start_exchange(g, conn, ex)


def _start_exchange(g: Any, conn: Any, ex: BackendExchange) -> Any:
    """Run the backend machine for ``ex``.  It watches the client connection:
    the client's input (a request body), its leaving (``peer_closed``) and the
    deadlines the backend states arm on it (``timeout``) are its events."""
    exchange = ex.runner = verbs.exchange(g, g.backend_machine, ex, peer=str(ex.pool.backend), watch=conn)
    return exchange.start()


@state("relayed", "close", "failed", "aborted", "fallback", needs=("request", "route"),
       provides={"failed": ("response",)})
def derive_sibling_response(g: Any, conn: Any, req: Any) -> Any:
    """Ask the key's owner: its answer is relayed (``relayed``/``close``), or a
    response was cut short (``aborted``), or the owner gave none and the origin
    is to be asked instead (``fallback``)."""
    siblings = g.siblings
    pool = (siblings.pool_for(siblings_rules.key_bytes(req.key), g.reactor.seconds(), count=True)
            if siblings is not None else None)
    if pool is None:
        return "fallback"  # the owner failed a moment ago (or an edited table got here)
    ex = BackendExchange(g=g, cconn=conn, creq=req, pool=pool, sibling=siblings, trace=req.trace,
                         replica=siblings.hot(siblings_rules.key_bytes(req.key)))
    return _start_exchange(g, conn, ex)


# -- stale serving (RFC 5861, operator grace) -------------------------------------

def _stale_if_error(ex: BackendExchange, fwd_status: bytes) -> bool:
    """The backend failed (``fwd_status``: its 5xx, or empty when nothing came)
    while the request's stale stored response was being revalidated or fetched
    again: answer that response when its ``stale-if-error`` window allows
    (RFC 5861 4), never a ``must-revalidate``/``proxy-revalidate``/``no-cache``
    one, nor for a request with its own Cache-Control.  True: the state
    returns ``stale`` (the client machine sends that answer)."""
    creq, g = ex.creq, ex.g
    obj = creq.stale
    meta = obj.meta
    if (meta is None or meta.must_revalidate or meta.no_cache or creq.cache_control is not None
            or ex.upload_error is not None or creq.sent_head or ex.relaying):
        return False
    now = g.reactor.seconds()
    if now - obj.fresh_until > meta.stale_if_error:
        return False
    status = b"afpa; fwd=stale" + (b"; fwd-status=" + fwd_status if fwd_status else b"")
    creq.close = creq.close or not ex.upload_done
    answer_stale(g, ex.cconn, creq, obj, now, status, "if-error")
    return True


# Request fields a background refresh does not copy from the request that
# started it: its own preconditions, ranges, directives and body framing.
_NOT_REFRESHED = frozenset({b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since",
                            b"if-range", b"range", b"cache-control", b"pragma", b"expect",
                            b"content-length", b"transfer-encoding", b"upgrade"})


@state("answered", needs=("request", "stale", "response"))
def refresh_stale(g: Any, conn: Any, req: Any) -> str:
    """The client was answered from a stale stored response (``stale_hit``):
    start one background request that revalidates it (conditional when it has
    a validator; a 304 freshens it, a storable 200 replaces it), unless one is
    already in flight for that response.  The client does not wait for it."""
    obj = req.stale
    token = (obj.key, obj.secondary)
    refreshing = g.refreshing
    if token in refreshing:
        return "answered"
    route = g.router.choose(req.host, req.path)
    if route.kind != "remote":
        return "answered"
    headers, lnames = [], []
    for lname, field in zip(req.lnames, req.headers):
        if lname not in _NOT_REFRESHED:
            headers.append(field)
            lnames.append(lname)
    # The copy keeps the selecting fields (Vary) and the client's address for
    # X-Forwarded-For; it is a plain GET whatever the client sent.
    breq = HttpRequest(method=b"GET", target=req.target, path=req.path, query=req.query, version=11,
                       headers=headers, lnames=lnames, host=req.host, key=obj.key, stale=obj, route=route,
                       cache_status=b"afpa; fwd=stale")
    bconn = Connection(None, None, None)
    bconn.peer_label, bconn.tls, bconn.deadline = conn.peer, conn.tls, float("inf")
    ex = BackendExchange(g=g, cconn=bconn, creq=breq, pool=g.pools.pick(route), background=True)
    ex.runner = verbs.exchange(g, g.backend_machine, ex, peer=str(ex.pool.backend))
    refreshing[token] = ex
    ex.runner.start().addBoth(lambda _: refreshing.pop(token, None))
    return "answered"


# -- the backend machine ---------------------------------------------------------

@state("ready", "need_more", "failed", needs=())
def backend_buffer_body(g: Any, conn: Any, ex: BackendExchange) -> str:
    """Read a small request body completely before taking a backend connection
    (a slow uploader then holds none); a larger one streams once connected.  A
    chunked body is checked as it arrives: a malformed one is refused before
    anything reaches the backend.  It runs again on the client's ``input``."""
    cconn, creq = ex.cconn, ex.creq
    if cconn.pending is None or not (creq.chunked or creq.content_length > 0):
        return "ready"
    limit = g.settings.buffer_body
    if creq.chunked:
        if ex.probe is None:
            ex.probe = ChunkedBody(g.settings.max_header_block)
        start = cconn.inpos + ex.probed
        try:
            pos, _, finished = ex.probe.read(cconn.inbuf, start)
        except HttpError as exc:
            ex.buffering = False
            set_error(g, creq, exc.status, exc.detail, close=True)
            return "failed"
        ex.probed += pos - start
        done = finished or ex.probed > limit
    else:
        done = creq.content_length > limit or cconn.unread() >= creq.content_length
    if done:
        if ex.buffering:
            ex.buffering = False
            ex.disarm()
        return "ready"
    if not ex.buffering:
        ex.buffering = True
        if creq.expect_continue:
            ex.sent_continue = True
            verbs.write(cconn, [b"HTTP/1.1 100 Continue\r\n\r\n"])
        verbs.resume_reading(cconn)
    ex.arm(g.runtime.settings.idle_timeout)  # the body must keep arriving
    return "need_more"


@state("failed", needs=())
def backend_body_timeout(g: Any, conn: Any, ex: BackendExchange) -> str:
    """The request body being read before forwarding stopped arriving: 408."""
    ex.buffering = False
    set_error(g, ex.creq, 408, "request body not received in time", close=True)
    return "failed"


@state("aborted", needs=())
def backend_client_gone(g: Any, conn: Any, ex: BackendExchange) -> str:
    """The client closed while its request was being forwarded (``peer_closed``):
    the backend connection is cut (never reused) and nothing is stored."""
    ex.client_gone = True
    ex.drop_store()
    ex.drop_backend()
    return "aborted"


@state(*FAILURES, needs=())
def backend_first_byte_timeout(g: Any, conn: Any, ex: BackendExchange) -> str:
    """No response head within ``timeouts.backend_first_byte`` (a retry's
    connect counts too): 504, and the backend connection is cut."""
    ex.drop_backend()
    return ex.fail(504, "backend did not answer in time", "first_byte_timeout")


@state(*FAILURES, needs=())
def backend_queue_timeout(g: Any, conn: Any, ex: BackendExchange) -> str:
    """No connection came free within ``backends.queue_timeout``: 503."""
    return ex.fail(503, "backend busy", "queue_timeout")


@state(*FAILURES, needs=())
def backend_body_stalled(g: Any, conn: Any, ex: BackendExchange) -> str:
    """The response body stopped arriving for ``timeouts.backend_idle``: the
    backend connection is cut, and so is the client (its response cannot end
    cleanly; nothing is stored)."""
    ex.pool.failed("idle_timeout")
    ex.drop_backend()
    return ex.abort_client()


@state("connected", "queued", *FAILURES, needs=(), provides={"connected": ("backend",)},
       events=(TIMEOUT, PEER_CLOSED))
def backend_connect(g: Any, conn: Any, ex: BackendExchange) -> Any:
    """Take a pooled keep-alive connection to the backend (at once) or open one;
    when the backend has ``max_connections`` already, wait in its queue.  While
    a connection is being opened, ``timeout`` (a retry keeps its first-byte
    deadline) and ``peer_closed`` give the connect up."""
    pool = ex.pool
    granted, ex.granted = ex.granted, None
    if granted is not None and granted is not True:
        return _connected(granted, conn, ex)
    proto = None if ex.retried or granted is not None else pool.take_idle()
    if proto is not None:
        return _connected(proto, conn, ex)
    if granted is None and not pool.may_open():
        if not pool.enqueue(ex.turn):
            return ex.fail(503, "backend busy", "queue_full")
        ex.queued = True
        ex.arm(g.settings.backend_queue_timeout)
        return "queued"
    d = ex.connecting = pool.connect()
    d.addCallbacks(_connected, _connect_failed, callbackArgs=(conn, ex), errbackArgs=(ex,))
    return d


@state("turn", "need_more", needs=())
def backend_wait_turn(g: Any, conn: Any, ex: BackendExchange) -> str:
    """Queued for a connection: the pool hands one over (``turn``); the table
    maps the wait's ``timeout`` (503) and ``peer_closed``."""
    if ex.granted is not None:
        if not ex.retried:
            ex.disarm()  # a retry keeps its first-byte deadline
        return "turn"
    return "need_more"


def _connected(proto: Any, conn: Any, ex: BackendExchange) -> str:
    ex.connecting = None
    ex.proto = proto
    verbs.attach(conn, proto)
    conn.inbuf, conn.inpos, conn.closed, conn.reset = b"", 0, False, False
    proto.owner = ex.runner
    return "connected"


def _connect_failed(failure: Any, ex: BackendExchange) -> str:
    ex.connecting = None
    if failure.check(CancelledError):
        return "failed"  # given up for an event (timeout, peer_closed): the table has it
    if failure.check(ConnectTimeout):
        return ex.fail(504, "backend did not accept the connection in time", "connect_timeout")
    if failure.check(ConnectionRefusedError):
        return ex.fail(502, "cannot connect to the backend", "refused")
    if failure.check(DNSLookupError):
        return ex.fail(502, "cannot connect to the backend", "unresolvable")
    return ex.fail(502, "cannot connect to the backend", "connect_error")


@state("sent", needs=("backend",), provides={"sent": ("forwarded",)})
def backend_send_request(g: Any, conn: Any, ex: BackendExchange) -> str:
    """Write the request head, then stream the request body as it arrives."""
    creq, cconn = ex.creq, ex.cconn
    has_body = cconn.pending is not None and (creq.chunked or creq.content_length > 0)
    framing = "chunked" if creq.chunked else ("length" if creq.content_length >= 0 else "none")
    client_ip = cconn.peer_host
    if creq.upgrade is not None:
        ex.upgrade = forward.websocket_upgrade(creq)
    ex.request_time = g.reactor.seconds()
    conditional = _validators(ex, creq.stale) if creq.stale is not None else b""
    if ex.sibling is not None:
        head = forward.sibling_request_head(creq, ex.sibling.token, client_ip, cconn.tls)
    else:
        head = forward.request_head(creq, client_ip, cconn.tls, g.trusted.trusts(client_ip),
                                    body=framing, upgrade=ex.upgrade,
                                    drop=_RANGE_FIELDS if ex.whole else frozenset(),
                                    conditional=conditional)
    verbs.write(conn, [head])
    ex.arm(g.settings.backend_first_byte_timeout)
    if has_body:
        ex.upload = cconn.pending.reader
        ex.upload_chunked = creq.chunked
        ex.upload_done = False
        if creq.expect_continue and not ex.sent_continue:
            verbs.write(cconn, [b"HTTP/1.1 100 Continue\r\n\r\n"])
        verbs.pace(cconn, conn)  # the client is not read while the backend's buffer is full
        # The states waiting for the response pump the rest on the client's input.
        # Reading may have been paused while the backend connection was being
        # made; from now on the backend's buffer decides (through the throttle).
        verbs.resume_reading(cconn)
        ex.pump_upload()
    return "sent"


def _validators(ex: BackendExchange, stale: CacheObject) -> bytes:
    """The conditional fields that revalidate ``stale`` (RFC 9111 4.3.1):
    If-None-Match with its ETag, else If-Modified-Since with its Last-Modified;
    none (a full refetch) when it has neither or the request is not GET/HEAD."""
    if ex.creq.method not in (b"GET", b"HEAD"):
        return b""
    if stale.etag:
        ex.revalidating = stale
        return b"If-None-Match: " + stale.etag + b"\r\n"
    if stale.last_modified is not None:
        ex.revalidating = stale
        return b"If-Modified-Since: " + http_date(stale.last_modified) + b"\r\n"
    return b""


@state("head", "interim", "need_more", "retry", "switched", "not_modified", *FAILURES,
       needs=("backend", "forwarded"),
       provides={"head": ("relaying",), "switched": ("relaying",), "not_modified": ("validated",)},
       drops={"retry": ("backend", "forwarded")})
def backend_read_head(g: Any, conn: Any, ex: BackendExchange) -> str:
    """Parse the response head strictly; relay it (and decide about storing).
    ``switched``: the backend agreed to the WebSocket upgrade the client asked
    for, and its 101 went to the client.  ``not_modified``: a 304 to afpa's own
    conditional request; nothing is relayed, the stored response answers.
    Runs again on the client's ``input`` too, moving request-body bytes on."""
    if not ex.upload_done:
        ex.pump_upload()
    if conn.inpos >= len(conn.inbuf) and not conn.closed:
        return "need_more"  # entered straight after sending: nothing to read yet
    try:
        end = parse_response_head(conn.inbuf, conn.inpos, g.settings.max_header_block, ex)
    except HttpError as exc:
        return ex.fail(502, exc.detail, "malformed_head")
    if end < 0:
        if conn.closed:
            # Retried only as documented: idempotent and without a body (a body
            # already sent is gone from the client's input and cannot be resent).
            if not conn.inbuf and not ex.retried and ex.upload is None and ex.creq.method in IDEMPOTENT:
                ex.retried = True
                ex.proto.owner = None
                ex.proto = None
                # The dead connection's state must not leak into the retry: a
                # connect that then fails would find conn.closed set and the
                # machine would never resume (the request hung forever).
                verbs.detach(conn)
                conn.inbuf, conn.inpos, conn.closed, conn.reset = b"", 0, False, False
                return "retry"
            return ex.fail(502, "backend closed the connection without a complete response",
                           "closed_early" if ex.upload_error is None else "")
        return "need_more"
    conn.inpos = end
    if ex.status < 200:
        if ex.status == 101:
            if ex.upgrade is None:
                return ex.fail(502, "backend switched protocols on a request that did not ask to")
            if not _switches_to(ex, ex.upgrade):
                return ex.fail(502, "backend switched to a protocol the client did not ask for")
            _relay_switch(g, conn, ex)
            return "switched"
        _relay_interim(g, ex)
        return "interim"  # 1xx: read the next head
    if ex.status == 304 and ex.revalidating is not None:
        return "not_modified"
    if ex.status >= 500 and ex.creq.stale is not None and not ex.background and _stale_if_error(ex, b"%d" % ex.status):
        ex.keep_alive = False  # its body is not read: the connection is closed, not reused
        return "stale"
    if ex.codings and ex.creq.version == 10 and not _bodiless(ex.creq, ex.status):
        # Transfer-Encoding cannot be sent to an HTTP/1.0 client (RFC 9112 6.1),
        # and the body means nothing without it.
        return ex.fail(502, "backend used a transfer coding an HTTP/1.0 client cannot receive")
    ex.arm(g.settings.backend_idle_timeout)
    _relay_head(g, conn, ex)
    return "head"


# A backend flooding interim responses must not fill the client's send buffer;
# past this many the rest are read and dropped (the first-byte timeout still runs).
_MAX_INTERIM = 10


def _relay_interim(g: Any, ex: BackendExchange) -> None:
    """Pass a backend's 1xx interim response (103 Early Hints, ...) on to the
    client, rewritten like a final head (hop-by-hop fields out, Via added), and
    never stored (RFC 9110 15.2).  Not to an HTTP/1.0 client, which cannot
    receive one, and never ``100 Continue``: afpa does not forward ``Expect``
    and answers it itself, so a backend's 100 is its own business and the client
    must not get a second one."""
    creq = ex.creq
    if ex.status == 100 or creq.version != 11 or ex.interims >= _MAX_INTERIM:
        return
    ex.interims += 1
    hide = frozenset(t for t in _targeted(g.settings) if t in ex.lnames)
    verbs.write(ex.cconn, [b"".join([forward.status_line(ex), *forward.response_lines(ex, hide),
                                     b"\r\n"])])


def _bodiless(creq: Any, status: int) -> bool:
    return creq.method == b"HEAD" or status in (204, 304)


def _switches_to(ex: BackendExchange, protocol: bytes) -> bool:
    """Whether the backend's 101 names the protocol the client asked for."""
    want = protocol.lower()
    for lname, (_, value) in zip(ex.lnames, ex.headers):
        if lname == b"upgrade" and any(t.strip(b" \t").lower() == want for t in value.split(b",")):
            return True
    return False


def _relay_switch(g: Any, conn: Any, ex: BackendExchange) -> None:
    """Send the backend's 101 (end-to-end fields, Via, Upgrade, Connection) and any
    bytes of the new protocol that came with it to the client."""
    creq = ex.creq
    cache_status = (creq.cache_status or b"afpa; fwd=bypass") + b"; fwd-status=101"
    creq.cache_status = cache_status
    head = [forward.status_line(ex), *forward.response_lines(ex), b"Upgrade: ", ex.upgrade,
            b"\r\nConnection: Upgrade\r\nCache-Status: ", cache_status, b"\r\n",
            _trace_line(creq), b"\r\n"]
    out = [b"".join(head)]
    if conn.unread():
        out.append(conn.inbuf[conn.inpos:])
        conn.inpos = len(conn.inbuf)
    creq.status = 101
    creq.sent_head = True
    creq.close = True
    ex.keep_alive = False
    verbs.write(ex.cconn, out)


def _relay_head(g: Any, conn: Any, ex: BackendExchange) -> None:
    creq, cconn = ex.creq, ex.cconn
    status = ex.status
    bodiless = _bodiless(creq, status)
    if bodiless:
        ex.reader = None
    elif ex.chunked:
        ex.reader = ChunkedBody(g.settings.max_header_block)
    elif ex.content_length >= 0:
        ex.reader = LengthBody(ex.content_length)
    else:
        ex.reader = UNTIL_CLOSE
        ex.keep_alive = False
    now = g.reactor.seconds()
    # Targeted cache-control fields (RFC 9213) are for afpa: never relayed.
    targeted = _targeted(g.settings)
    lnames = ex.lnames
    hide = _NOTHING
    for t in targeted:
        if t in lnames:  # rare: the set is built only then
            hide = frozenset(t for t in targeted if t in lnames)
            break
    if ex.sibling is not None and not ex.replica:
        _relay_sibling_head(g, conn, ex, forward.response_lines(ex, hide, via=False))
        return
    lines = forward.response_lines(ex, hide)
    if ex.content_length >= 0 and not (status == 304):
        lines.append(b"Content-Length: %d\r\n" % ex.content_length)
    elif not bodiless:
        if creq.version == 11:
            ex.client_chunked = True
            # Codings afpa does not undo stay named, with its own chunked last.
            lines.append(b"Transfer-Encoding: " + ex.codings + b", chunked\r\n" if ex.codings
                         else b"Transfer-Encoding: chunked\r\n")
        else:
            ex.client_close = True  # an HTTP/1.0 client learns the end from the close
    if b"date" not in ex.lnames:
        lines.append(g.dates.get(now))
    if creq.method != b"GET" and creq.method != b"HEAD":
        _invalidate(g, ex, status)
    meta = None
    if (creq.key is not None and not ex.codings
            and ex.content_length <= g.runtime.settings.max_object_bytes):
        meta = _decide(g, ex, status, now, targeted)
    if meta is None and ex.revalidating is not None and status < 500:
        # The origin answered a revalidation with a new response we do not
        # store: the stale copy is outdated (5xx says nothing about it).
        g.cache.discard(ex.revalidating)
    stored = b""
    if meta is not None:
        # The body is collected for the store only within the in-flight budget
        # (a known length is reserved now, an unknown one as it arrives); past
        # it the response is relayed without storing.
        if ex.content_length > 0 and not g.cache.reserve(ex.content_length):
            stored = b"; detail=busy"
        else:
            ex.reserved = max(ex.content_length, 0)
            ex.meta = meta
            ex.store = []
            stored = b"; stored"
    elif creq.method == b"HEAD" and creq.key is not None:
        stored = b"; detail=head"  # no body to store; as for a file (README, Cache-Status)
    cache_status = creq.cache_status or b"afpa; fwd=bypass"  # no lookup in the table
    cache_status += b"; fwd-status=%d" % status + stored
    creq.cache_status = cache_status
    ex.client_close = ex.client_close or creq.close
    if ex.background:
        ex.held = True  # no client: the body is read into the store (or dropped)
        return
    if ex.whole:
        status = _range_from_whole(ex, lines)
        if not status:
            return  # held: answered from the stored object when it is complete
    head = [forward.status_line(ex), *lines, b"Cache-Status: ", cache_status, b"\r\n", _trace_line(creq)]
    if ex.client_close:
        head.append(b"Connection: close\r\n")
    elif creq.version == 10:
        head.append(b"Connection: keep-alive\r\n")
    head.append(b"\r\n")
    creq.status = status
    creq.sent_head = True
    ex.relaying = True
    # Held back a moment: backend_stream_body sends it with the first body bytes
    # (one write instead of two for the common small response).
    ex.out = [b"".join(head)]
    if ex.reader is not None:
        verbs.pace(conn, cconn)  # the backend is not read while the client's buffer is full
    if ex.store is None and g.flights.inflight:
        # Coalescing: nothing will be stored, so nobody waits for this answer.
        coalesce.leader_uncacheable(g, creq, status, transient=meta is not None)  # busy


def _relay_sibling_head(g: Any, conn: Any, ex: BackendExchange, lines: list[bytes]) -> None:
    """The owner's answer to a sibling request: relayed as the owner gave it
    (its Via and Cache-Status, which already say what afpa did), re-framed for
    this client, never stored here.  ``ex.reader`` is set."""
    creq, cconn = ex.creq, ex.cconn
    status = ex.status
    if ex.content_length >= 0 and status != 304:
        lines.append(b"Content-Length: %d\r\n" % ex.content_length)
    elif ex.reader is not None:
        if creq.version == 11:
            ex.client_chunked = True
            lines.append(b"Transfer-Encoding: " + ex.codings + b", chunked\r\n" if ex.codings
                         else b"Transfer-Encoding: chunked\r\n")
        else:
            ex.client_close = True
    for lname, (_, value) in zip(ex.lnames, ex.headers):
        if lname == b"cache-status":
            creq.cache_status = value  # for this instance's access log
    ex.client_close = ex.client_close or creq.close
    if ex.client_close:
        lines.append(b"Connection: close\r\n")
    elif creq.version == 10:
        lines.append(b"Connection: keep-alive\r\n")
    creq.status = status
    creq.sent_head = True
    ex.relaying = True
    ex.out = [b"".join([forward.status_line(ex), *lines, _trace_line(creq), b"\r\n"])]
    if ex.reader is not None:
        verbs.pace(conn, cconn)  # the backend is not read while the client's buffer is full


def _trace_line(creq: Any) -> bytes:
    """``Afpa-Trace`` for a relayed head, when the client asked for it."""
    trace = creq.trace
    if trace is None or not trace.header:
        return b""
    return tracing.header_line(trace, trace.clock())


_TARGETED: dict[str, tuple[bytes, ...]] = {}


def _targeted(settings: Any) -> tuple[bytes, ...]:
    """The targeted cache-control fields afpa obeys, most specific first:
    the operator's ``cache.targeted_field``, then ``CDN-Cache-Control``."""
    name = settings.targeted_field
    fields = _TARGETED.get(name)
    if fields is None:
        own = name.lower().encode("ascii")
        fields = _TARGETED[name] = (own, b"cdn-cache-control") if own != b"cdn-cache-control" else (own,)
    return fields


def _decide(g: Any, ex: BackendExchange, status: int, now: float, targeted: tuple[bytes, ...]) -> Any:
    """The StoredMeta of a response to store, or None (cachepolicy.decide says why)."""
    creq, settings = ex.creq, g.settings
    d = cachepolicy.decide(creq.method, creq.lnames, creq.headers, status, ex.lnames, ex.headers,
                           now=now, heuristic_fraction=settings.heuristic_fraction,
                           heuristic_max=settings.heuristic_max, targeted=targeted,
                           policy=creq.route.cache if creq.route is not None else None)
    if not d.store:
        return None
    meta = cachepolicy.stored_meta(d, ex.request_time or now, now)
    # Variants are keyed on the normalised Vary names (Vary: * was refused above).
    meta.vary = cachepolicy.vary_names(ex) if d.vary is not None else None
    selector = creq.route.cache.selector if creq.route is not None else ()
    if selector:
        # The route's key headers and cookies select variants as if the
        # origin had named them in Vary (so purge by URL still reaches them).
        meta.vary = tuple(sorted(set(meta.vary or ()) | set(selector)))
    if (cachepolicy.fresh_until(meta) < now and not meta.no_cache
            and b"etag" not in ex.lnames and b"last-modified" not in ex.lnames):
        return None  # stale on arrival with nothing to revalidate it with: useless
    ex.strip = d.strip | d.hide
    return meta


def _invalidate(g: Any, ex: BackendExchange, status: int) -> None:
    """An unsafe method's non-error answer invalidates what it names (RFC 9111 4.4)."""
    creq = ex.creq
    location = content_location = None
    for lname, (_, value) in zip(ex.lnames, ex.headers):
        if lname == b"location":
            location = value
        elif lname == b"content-location":
            content_location = value
    scheme = b"https" if ex.cconn.tls else b"http"
    for key in cachepolicy.invalidated(creq.method, status, creq.host, creq.target, scheme,
                                       location, content_location):
        if g.router.keyed:
            key = invalidation.routed_key(g.router, *key)
        g.cache.remove(key)


@state("relayed", "close", "answered", "need_more", *FAILURES, needs=("backend", "relaying"))
def backend_stream_body(g: Any, conn: Any, ex: BackendExchange) -> str:
    """Relay the response body as it arrives (storing it when cacheable):
    ``relayed`` (``close``: and the client connection closes after it);
    ``answered``: a whole response fetched for a Range request was stored and
    the ranges answered from it; ``aborted``: the backend died mid-body and
    the client was cut.  Runs again on the client's ``input`` too (a request
    body still streaming to the backend)."""
    if not ex.upload_done:
        ex.pump_upload()
    reader = ex.reader
    if reader is None:
        pieces, finished = [], True
    elif reader is UNTIL_CLOSE:
        pieces = [conn.inbuf[conn.inpos:]] if conn.unread() else []
        conn.inpos = len(conn.inbuf)
        # Only a clean close ends such a body: a reset leaves it truncated, so
        # the client is cut and nothing stored.
        finished = conn.closed and not conn.reset
    else:
        try:
            conn.inpos, pieces, finished = reader.read(conn.inbuf, conn.inpos)
        except HttpError:
            ex.pool.failed("malformed_body")
            return ex.abort_client()
    if ex.part is not None:
        pieces, finished = _cut(ex, pieces, finished)
    out = ex.out or []
    ex.out = None
    if pieces or finished:
        out += forward.frame(pieces, ex.client_chunked, finished)
    if out and not ex.held:
        verbs.write(ex.cconn, out)
        if pieces:
            ex.creq.relayed += sum(len(p) for p in pieces)  # $body_bytes_sent, trace "bytes"
    if pieces:
        if ex.store is not None:
            ex.store += pieces
            n = sum(len(p) for p in pieces)
            ex.store_size += n
            if ex.store_size > g.runtime.settings.max_object_bytes:
                ex.drop_store()
            elif ex.content_length < 0:
                if g.cache.reserve(n):
                    ex.reserved += n
                else:
                    ex.drop_store()  # the in-flight budget is full: relay only
        ex.arm(g.settings.backend_idle_timeout)
    if finished:
        obj = _store(g, ex) if ex.store is not None else None
        if ex.background:
            return "relayed"
        if ex.held:
            return _answer_held(g, ex, obj)
        return "close" if ex.client_close else "relayed"
    if conn.closed:
        ex.pool.failed("reset")
        return ex.abort_client()
    return "need_more"


def _store(g: Any, ex: BackendExchange) -> CacheObject:
    """Store the relayed response.  Its head keeps the origin's ``Date`` (one is
    added from the arrival time when it sent none, RFC 9110 6.6.1), so hits send
    it unchanged; ``Age`` is computed per hit from ``stored_at``, which is when
    the origin made the response by RFC 9111 4.2.3's reckoning."""
    meta = ex.meta
    body = b"".join(ex.store)
    lines, short = [], []
    drop = ex.strip
    for line in forward.response_lines(ex, drop):
        lname = line.split(b":", 1)[0].lower()
        if lname in (b"age", b"content-length"):
            continue
        lines.append(line)
        if lname in _SHORT_HEAD_FIELDS:
            short.append(line)
    if b"date" not in ex.lnames:
        date = b"Date: " + http_date(meta.date) + b"\r\n"
        lines.append(date)
        short.append(date)
    if ex.status == 200 and b"accept-ranges" not in ex.lnames:
        lines.append(b"Accept-Ranges: bytes\r\n")  # hits answer Range (protocols/http/policy/ranges.py)
    if ex.status != 204:  # a 204 has no Content-Length (RFC 9110 8.6)
        lines.append(b"Content-Length: %d\r\n" % len(body))
    head = b"".join([forward.status_line(ex), *lines])
    short_head = b"".join([b"HTTP/1.1 304 Not Modified\r\n", *short])
    fields = {n: v for n, (_, v) in zip(ex.lnames, ex.headers)}
    lm = cachepolicy.parse_http_date(fields.get(b"last-modified"))
    stored_at = cachepolicy.born(meta)
    secondary = None if meta.vary is None else cachepolicy.secondary_key(meta.vary, ex.creq)
    meta.secondary = secondary or ()
    obj = CacheObject(ex.creq.key, head, fragments_of(body), len(body), stored_at,
                      cachepolicy.fresh_until(meta), short_head, fields.get(b"etag"),
                      int(lm) if lm is not None else None, meta=meta, secondary=secondary)
    obj.set_tags(invalidation.tags_of(ex))
    ex.drop_store()  # the bytes are now the object's: stored (charged) or dropped
    stored = g.cache.put(obj, meta.vary)
    if g.flights.inflight:
        coalesce.leader_stored(g, ex.creq, obj, stored)  # answer the coalesced waiters
    return obj


# -- Range misses fetched whole (cache.range_miss = "whole") ---------------------

_RANGE_FIELDS = frozenset({b"range", b"if-range"})


def _range_from_whole(ex: BackendExchange, lines: list[bytes]) -> int:
    """A GET with Range went to the backend without it: decide how the client is
    answered.  Returns 0 when the response is being stored (held back; the ranges
    are answered from the stored object, :func:`_answer_held`); otherwise the
    status to relay: 206 when one range can be cut from a 200 of known length as
    it streams (``lines`` and ``ex`` rewritten), else the response as it came
    (a whole 200 answers a Range request too, RFC 9110 14.2)."""
    creq = ex.creq
    if ex.status != 200 or ex.content_length < 0:
        return ex.status
    if ex.store is not None:
        ex.held = True
        return 0
    fields = {n: v for n, (_, v) in zip(ex.lnames, ex.headers)}
    if creq.if_range is not None:
        lm = cachepolicy.parse_http_date(fields.get(b"last-modified"))
        if not ranges.if_range_holds(creq.if_range, fields.get(b"etag"), int(lm) if lm is not None else None):
            return ex.status
    selected = ranges.select(creq.range, ex.content_length)
    if not selected or len(selected) > 1:
        return ex.status  # unsatisfiable, or several ranges of a response not kept: the whole 200
    start, stop = selected[0]
    lines[:] = [line for line in lines if not line[:15].lower() == b"content-length:"]
    lines.append(b"Content-Length: %d\r\nContent-Range: %s\r\n"
                 % (stop - start, ranges.content_range(start, stop, ex.content_length)))
    ex.status, ex.reason = 206, b"Partial Content"
    ex.part = (start, stop)
    return 206


def _cut(ex: BackendExchange, pieces: list[bytes], finished: bool) -> tuple[list[bytes], bool]:
    """The bytes of ``pieces`` inside the range relayed (``ex.part``); finished
    once its end has gone by (the rest of the body is not read: the backend
    connection is closed instead of reused)."""
    start, stop = ex.part
    pos = ex.part_pos
    out = []
    for piece in pieces:
        end = pos + len(piece)
        a, b = max(start - pos, 0), min(stop, end) - pos
        if a < b:
            out.append(piece[a:b])
        pos = end
    ex.part_pos = pos
    if pos >= stop and not finished:
        ex.keep_alive = False
        finished = True
    return out, finished


def _answer_held(g: Any, ex: BackendExchange, obj: CacheObject | None) -> str:
    """The whole response fetched for a Range request is complete: answer the
    client from it (206, 416 or 200, after its conditionals, as a hit would)."""
    if obj is None:
        ex.held = False
        return ex.fail(502, "backend response could not be kept")
    now = g.reactor.seconds()
    settle_body(g, ex.cconn, ex.creq)
    _answer(g, ex.creq, obj.head, obj.short_head, obj.etag, obj.last_modified, obj, now,
            int(now - obj.stored_at), obj.meta is not None)
    return "answered"


# Fields a 304 does not update in the stored response (RFC 9111 4.3.4): framing
# and coding the stored body depends on, and what afpa sets itself.
_NOT_UPDATED = frozenset({b"content-length", b"content-encoding", b"content-range",
                          b"transfer-encoding", b"date", b"age", b"via"})


def _split_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes, bytes]]]:
    """A stored head as (status line, [(lower-case name, name, value)])."""
    first, *rest = head.split(b"\r\n")
    fields = []
    for line in rest:
        if line:
            name, _, value = line.partition(b":")
            fields.append((name.lower(), name, value.strip(b" \t")))
    return first + b"\r\n", fields


@state("refreshed", needs=("backend", "validated"))
def backend_refresh(g: Any, conn: Any, ex: BackendExchange) -> str:
    """The backend answered 304 to afpa's conditional request: freshen the
    stored response (its fields updated from the 304 as RFC 9111 4.3.4 says,
    its freshness computed again) and answer the client from it, including
    the client's own conditionals (304/412)."""
    stale, creq = ex.revalidating, ex.creq
    now = g.reactor.seconds()
    status_line, fields = _split_head(stale.head)
    update = {n for n in ex.lnames if n not in _NOT_UPDATED and not n.startswith(b"proxy-")}
    update -= forward.HOP_BY_HOP | forward.connection_tokens(ex)
    if creq.route is not None and creq.route.cache.set_cookie == "strip":
        update.discard(b"set-cookie")  # the route shares responses without their cookies
    fields = [f for f in fields if f[0] not in update]
    fields += [(n, name, value) for n, (name, value) in zip(ex.lnames, ex.headers) if n in update]
    lines = [name + b": " + value + b"\r\n" for _, name, value in fields]
    head = b"".join([status_line, *lines])
    short_head = b"".join([b"HTTP/1.1 304 Not Modified\r\n",
                           *(line for (n, _, _), line in zip(fields, lines) if n in _SHORT_HEAD_FIELDS)])
    named = {n: v for n, _, v in fields}
    # Freshness again, from the updated fields (RFC 9111 4.3.4), by the same policy
    # as any stored response; without any it is kept but revalidated on every use.
    settings = g.settings
    d = cachepolicy.decide(b"GET", creq.lnames, creq.headers, int(status_line.split(b" ")[1]),
                           [n for n, _, _ in fields], [(name, v) for _, name, v in fields], now=now,
                           heuristic_fraction=settings.heuristic_fraction,
                           heuristic_max=settings.heuristic_max, targeted=_targeted(settings),
                           policy=creq.route.cache if creq.route is not None else None)
    if d.store:
        meta = cachepolicy.stored_meta(d, ex.request_time or now, now)
    else:
        meta = attrs.evolve(stale.meta) if stale.meta is not None else cachepolicy.StoredMeta(
            date=now, request_time=now, response_time=now)
        meta.no_cache = True
    meta.vary, meta.secondary = (stale.meta.vary, stale.meta.secondary) if stale.meta is not None else (None, ())
    lm = cachepolicy.parse_http_date(named.get(b"last-modified"))
    stored_at = cachepolicy.born(meta)
    obj = CacheObject(stale.key, head, stale.fragments, stale.size, stored_at, cachepolicy.fresh_until(meta),
                      short_head, named.get(b"etag"), int(lm) if lm is not None else stale.last_modified,
                      stale.identity, meta=meta, tags=stale.tags, secondary=stale.secondary,
                      file=stale.file)  # the same payload: its views and memory file are shared
    g.cache.discard(stale)
    # A Set-Cookie in the 304 is for this client only: answered, never shared.
    if creq.key is not None and b"set-cookie" not in update:
        g.cache.put(obj, meta.vary if meta is not None else None)
    creq.cache_status = (creq.cache_status or b"afpa; fwd=stale") + b"; fwd-status=304"
    settle_body(g, ex.cconn, creq)
    _answer(g, creq, obj.head, obj.short_head, obj.etag, obj.last_modified, obj, now,
            int(now - stored_at), True)
    return "refreshed"


@state("upgraded", needs=("backend", "relaying"))
def backend_tunnel(g: Any, conn: Any, ex: BackendExchange) -> Any:
    """After a 101: splice the client with this backend connection (bytes both
    ways, back-pressure, ``tunnel_idle_timeout``) until either side closes
    (the splice takes the client connection's events meanwhile)."""
    tunnel = verbs.splice_to(g.reactor, ex.cconn, conn, g.settings.tunnel_idle_timeout)
    ex.proto.owner = tunnel  # the backend connection's events now go to the tunnel
    if conn.closed:
        tunnel.lost(None)  # the backend closed right after its 101
    return tunnel.done.addCallback(lambda _: "upgraded")


FUNCTIONS = (derive_remote_response, derive_sibling_response, refresh_stale, backend_buffer_body, backend_connect,
             backend_wait_turn, backend_send_request, backend_read_head, backend_refresh, backend_stream_body,
             backend_tunnel, backend_body_timeout, backend_client_gone,
             backend_first_byte_timeout, backend_queue_timeout, backend_body_stalled)
