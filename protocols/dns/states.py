"""The DNS forwarder's states (``statetables/dns.toml``).

The AFPA shape, as for HTTP: Derive Request (parse; refuse; answer local
records), Derive Cached Response (the fast path: a stored answer replayed with
the client's ID and question case, TTLs lowered by its age), Derive Miss
Response (where it goes; join a query already in flight), Derive Remote
Response (one UDP try to one upstream), Derive TCP Response (the same question
again over TCP after a truncated answer), then the Send Engine.

Every wait ends in an outcome word the table maps: an upstream's answer
(``answer``), a truncated one (``truncated``), silence past the try's timeout
(``timeout``), a refusal or a useless answer (``failed``).  Retrying the next
upstream, falling back to TCP, serving stale or SERVFAIL are the table's
edges, not decisions taken in callbacks.

Upstream exchanges follow RFC 5452: a random ID and a connected UDP socket
on a random source port to itself per try (leased from the runtime's pool,
:class:`afpa.net.datagram.DatagramPool`), the question in random 0x20 case,
and only a datagram from that address and port with that ID and exactly that
question is taken (:func:`wire.parse_response`); anything else is counted and
ignored while the try goes on waiting.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from afpa.cache.store import CacheObject
from afpa.machine.modules import state
from protocols.dns import wire
from protocols.dns.scopes import DnsGlobal, DnsRequest, Flight, Waiter

# DNS answers counted in the runtime's request families by status class: an
# answer (NOERROR, NXDOMAIN) is a success, a refused or malformed query the
# client's problem, SERVFAIL the server's.
STATUS = {wire.NOERROR: 200, wire.NXDOMAIN: 200, wire.FORMERR: 400, wire.NOTIMP: 400, wire.REFUSED: 400,
          wire.BADVERS: 400, wire.SERVFAIL: 500}
STALE_TTL = 30  # RFC 8767 4: the TTL of a stale answer
_BAD_UPSTREAM_RCODES = frozenset({wire.SERVFAIL, wire.REFUSED, wire.NOTIMP, wire.FORMERR})


def _answer(g: DnsGlobal, req: DnsRequest, data: bytes, rcode: int) -> None:
    """Put the reply ``data`` on the request for the Send Engine (framed on TCP)."""
    req.head = wire.frame(data) if req.tcp else data
    req.rcode = rcode
    req.status = STATUS.get(rcode, 200)
    q = req.query
    g.count(q.qtype if q is not None else 0, rcode)


# -- Derive Request ----------------------------------------------------------

@state("query", "answered", "dropped", "need_more",
       provides={"query": ("query",), "answered": ("response",)})
def derive_request(g: DnsGlobal, conn: Any, req: DnsRequest) -> str:
    """Parse one query (a datagram, or a length-framed message on TCP); malformed
    ones get FORMERR/NOTIMP or are dropped; zone transfers refused, ANY answered
    minimally (RFC 8482); local records and hosts answered here."""
    if conn.kind == "datagram":
        data = conn.inbuf
    else:
        req.tcp = True
        buf, pos = conn.inbuf, conn.inpos
        if len(buf) - pos < 2:
            return "need_more"
        end = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
        if len(buf) < end:
            return "need_more"
        data = buf[pos + 2:end]
        conn.inpos = end
    try:
        q = wire.parse_query_memo(data, g.parsed)
    except wire.Malformed as exc:
        reply = wire.error_reply_raw(data, exc.rcode) if exc.rcode is not None else None
        if reply is None:
            g.dropped += 1
            req.cache_status = "dropped"
            return "dropped"
        req.cache_status = "error"
        _answer(g, req, reply, exc.rcode)
        return "answered"
    req.query = q
    if q.qtype >= 128 or q.qtype == wire.OPT:  # only these can be refused
        rcode = wire.refusal(q)
        if rcode is not None:
            req.cache_status = "refused"
            _answer(g, req, wire.error_reply(q, rcode), rcode)
            return "answered"
    local = g.local.answer(q, req.tcp) if len(g.local) else None
    if local is not None:
        req.cache_status = "local"
        _answer(g, req, local, local[3] & 0x0F)
        return "answered"
    if q.qtype == wire.ANY:
        req.cache_status = "local"
        _answer(g, req, wire.minimal_any_reply(q), wire.NOERROR)
        return "answered"
    return "query"


# -- Derive Cached Response (fast path) --------------------------------------

@state("hit", "miss", needs=("query",), provides={"hit": ("response",)})
def derive_cached_response(g: DnsGlobal, conn: Any, req: DnsRequest) -> str:
    """A fresh stored answer for this question: replayed with the client's ID and
    question case, every TTL lowered by the time it has been stored.  A stale one
    is kept on the request (serve-stale) and the query goes upstream."""
    q = req.query
    # DO queries get their own entries (answers with DNSSEC records): a wire
    # name never starts with 0xFF, so the prefix cannot collide.
    key = req.key = q.key if not q.do else b"\xff" + q.key
    now = g.seconds()
    obj = g.cache.get(key, now)
    if obj is None:
        req.cache_status = "miss"
        return "miss"
    if obj.fresh_until < now:
        req.stale = obj
        req.cache_status = "expired"
        return "miss"
    answer = obj.meta
    data = wire.reply_from_answer(answer, q, int(now - obj.stored_at), req.tcp)
    req.head = wire.frame(data) if req.tcp else data
    rcode = answer.rcode
    req.rcode = rcode
    req.status = 200 if rcode == 0 or rcode == 3 else STATUS.get(rcode, 200)
    req.cache_status = "hit"
    g.count(q.qtype, rcode)
    return "hit"


# -- Derive Miss Response ----------------------------------------------------

@state("forward", "collapsed", "answered", needs=("query",),
       provides={"forward": ("flight",), "collapsed": ("flight",), "answered": ("response",)})
def derive_miss_response(g: DnsGlobal, conn: Any, req: DnsRequest) -> str:
    """Where the query goes: the upstreams of its domain (per-domain rules, else
    the default list); a domain kept local gets NXDOMAIN, nowhere to go REFUSED.
    A query for a question already asked upstream waits for that answer."""
    q = req.query
    upstreams = g.forwarding.upstreams_for(q.key)
    if not upstreams:
        # A local-only domain (a rule without address) has no such name; with no
        # upstream at all the question is not ours to answer (dnsmasq does the same).
        rcode = wire.NXDOMAIN if g.forwarding.default else wire.REFUSED
        req.cache_status = "local"
        _answer(g, req, wire.error_reply(q, rcode), rcode)
        return "answered"
    now = g.seconds()
    flight = g.flights.get(req.key)
    if flight is not None and flight.expires > now:
        req.flight = flight
        req.cache_status = "coalesced"
        return "collapsed"
    dns = g.dns
    budget = dns.timeout * dns.tries * len(upstreams) + dns.tcp_timeout + 1.0
    req.flight = g.flights[req.key] = Flight(req.key, now + budget)
    req.leader = True
    req.upstreams = upstreams
    req.attempt = 0
    return "forward"


@state("answered", "failed", "released", "timeout", needs=("flight",), provides={"answered": ("response",)},
       drops={"released": ("flight",)})
def derive_collapsed_response(g: DnsGlobal, conn: Any, req: DnsRequest) -> Deferred:
    """Wait for the upstream query already in flight for this question: its
    answer, with this query's ID and case (``answered``); its failure
    (``failed``); its asker gone before the answer (``released``: ask again);
    or no end in sight (``timeout``)."""
    done: Deferred = Deferred()
    waiter = Waiter(req, req.tcp, done)
    wait = max(0.0, req.flight.expires - g.seconds())
    waiter.timer = g.reactor.callLater(wait, _waited_too_long, waiter)
    req.flight.waiters.append(waiter)
    return done


def _waited_too_long(waiter: Waiter) -> None:
    waiter.timer = None
    if not waiter.done.called:
        waiter.done.callback("timeout")


def _store(g: DnsGlobal, req: DnsRequest, answer: wire.Answer) -> bool:
    """Keep ``answer`` under the request's key until its TTL runs out (False: too big)."""
    now = g.seconds()
    obj = CacheObject(req.key, b"", (answer.wire,), len(answer.wire), now, now + answer.ttl, meta=answer)
    return g.cache.put(obj)


def _finish_flight(g: DnsGlobal, req: DnsRequest, answer: wire.Answer | None, none: str = "failed") -> None:
    """The leader of a flight is done: every waiter gets ``answer``.  Without
    one the waiters get the word ``none``: ``failed`` (the upstreams failed;
    each serves stale or SERVFAIL itself) or ``released`` (the leader's client
    went away before its answer came: each asks again itself)."""
    flight = req.flight
    if flight is None or not req.leader:
        return
    req.leader = False
    if g.flights.get(flight.key) is flight:
        del g.flights[flight.key]
    flight.answer = answer
    waiters, flight.waiters = flight.waiters, []
    for w in waiters:
        if w.timer is not None and w.timer.active():
            w.timer.cancel()
        if w.done.called:
            continue
        if answer is None:
            w.done.callback(none)
            continue
        wreq = w.req
        try:
            _answer(g, wreq, wire.reply_from_answer(answer, wreq.query, 0, w.tcp), answer.rcode)
        except ValueError:  # too big to frame: that waiter gets SERVFAIL instead
            w.done.callback("failed")
            continue
        w.done.callback("answered")


# -- Derive Remote Response: one UDP try --------------------------------------

class _Try:
    """One question to one upstream; ``done`` fires with the try's outcome word."""

    __slots__ = ("g", "conn", "req", "upstream", "done", "sock", "timer", "sent_id", "sent_qname", "started",
                 "ended", "buf")

    def __init__(self, g: DnsGlobal, conn: Any, req: DnsRequest, upstream: tuple[str, int]):
        self.g = g
        self.conn = conn
        self.req = req
        self.upstream = upstream
        self.done: Deferred = Deferred()
        self.sock: Any = None
        self.timer: Any = None
        self.ended = False
        self.buf = b""
        rng = g.rng
        self.sent_id = rng.getrandbits(16)
        self.sent_qname = wire.randomize_case(req.query.qname, rng)
        self.started = g.seconds()

    def query(self) -> bytes:
        return wire.build_upstream_query(self.req.query, self.sent_id, qname=self.sent_qname)

    def message(self, data: bytes, tcp: bool) -> None:
        """A message from the upstream: the answer, or something to ignore."""
        if self.ended:
            return
        g = self.g
        dns = g.dns
        try:
            resp = wire.parse_response(data, self.req.query, self.sent_id, self.sent_qname,
                                       min_ttl=dns.min_ttl, max_ttl=dns.max_ttl, neg_max_ttl=dns.neg_max_ttl)
        except wire.Mismatch:
            g.ignored += 1
            return
        except wire.Malformed:
            if len(data) < 12:
                g.ignored += 1
                return
            self.end("failed")  # it is ours (ID and question matched) but unusable
            return
        if resp.truncated:
            self.end("failed" if tcp else "truncated")
        elif resp.rcode in _BAD_UPSTREAM_RCODES:
            self.end("failed")
        else:
            self.req.response = resp
            self.end("answer")

    def lost(self, _why: str) -> None:
        self.end("failed")

    def expired(self) -> None:
        self.timer = None
        self.end("timeout")

    def udp_message(self, data: bytes) -> None:
        self.message(data, False)

    def end(self, word: str) -> None:
        if self.ended:
            return
        self.ended = True
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
        else:
            self.g.deadlines.discard(self)
        if self.sock is not None:
            self.sock.close()
        g = self.g
        now = g.seconds()
        g.tried(self.upstream, word, now - self.started if word in ("answer", "truncated") else None)
        if self.conn.closed:
            # A TCP client that went away: its machine will not run on, so the
            # queries waiting for this one must not wait for it.
            req = self.req
            if word == "answer" and req.response.answer is not None:
                _store(g, req, req.response.answer)
                _finish_flight(g, req, req.response.answer)
            else:
                _finish_flight(g, req, None, "released")
        self.done.callback(word)


@state("answer", "truncated", "timeout", "failed", needs=("flight",), provides={"answer": ("upstream_answer",)})
def derive_remote_response(g: DnsGlobal, conn: Any, req: DnsRequest) -> str | Deferred:
    """Ask the next upstream over UDP (fresh ID, random source port and 0x20 case);
    wait for its answer, ignoring datagrams that do not answer this question."""
    upstreams = req.upstreams
    upstream = req.upstream = upstreams[req.attempt % len(upstreams)]
    req.attempt += 1
    t = _Try(g, conn, req, upstream)
    try:
        t.sock = g.open_datagram(upstream[0], upstream[1], t.udp_message, t.lost)
    except Exception:  # noqa: BLE001 - no socket (EMFILE...): this try failed, the table goes on
        t.end("failed")
        return t.done
    g.deadlines.add(t, t.started + g.dns.timeout)  # one timer for every UDP try (they all wait as long)
    if not t.sock.send(t.query()):
        t.end("failed")
    return t.done


@state("answer", "timeout", "failed", needs=("flight",), provides={"answer": ("upstream_answer",)})
def derive_tcp_response(g: DnsGlobal, conn: Any, req: DnsRequest) -> Deferred:
    """The upstream's UDP answer was truncated: ask it the same question over TCP."""
    upstream = req.upstream
    t = _Try(g, conn, req, upstream)

    def data(chunk: bytes) -> None:
        msgs, t.buf = wire.unframe(t.buf + chunk)
        for msg in msgs:
            t.message(msg, True)

    t.timer = g.reactor.callLater(g.dns.tcp_timeout, t.expired)
    try:
        t.sock = g.open_stream(upstream[0], upstream[1], data, t.lost)
    except Exception:  # noqa: BLE001
        t.end("failed")
        return t.done
    t.sock.write(wire.frame(t.query()))
    return t.done


@state("retry", "exhausted", needs=("flight",))
def next_upstream(g: DnsGlobal, conn: Any, req: DnsRequest) -> str:
    """After a failed try: another one (the next upstream, round after round, up
    to ``tries`` rounds), or give up."""
    return "retry" if req.attempt < len(req.upstreams) * g.dns.tries else "exhausted"


@state("stored", "answered", needs=("upstream_answer",), provides={"stored": ("response",),
                                                                   "answered": ("response",)})
def store_answer(g: DnsGlobal, conn: Any, req: DnsRequest) -> str:
    """Keep a cacheable answer (positive for its smallest TTL, negative for the
    SOA minimum, RFC 2308, both clamped), answer this query and every one that
    waited for it."""
    resp = req.response
    answer = resp.answer
    word = "answered"
    if answer is not None and _store(g, req, answer):
        word = "stored"
    reply = answer if answer is not None else resp.reply
    _finish_flight(g, req, reply)
    _answer(g, req, wire.reply_from_answer(reply, req.query, 0, req.tcp), reply.rcode)
    return word


@state("stale", "servfail", needs=("query",), provides={"stale": ("response",), "servfail": ("response",)})
def derive_failed_response(g: DnsGlobal, conn: Any, req: DnsRequest) -> str:
    """No upstream answered: a stale answer (serve-stale on, RFC 8767: its
    records with TTL 30), else SERVFAIL (never NXDOMAIN: the name may exist)."""
    _finish_flight(g, req, None)
    q = req.query
    stale = req.stale
    dns = g.dns
    if dns.serve_stale and stale is not None and g.seconds() - stale.fresh_until <= dns.stale_max:
        answer = stale.meta
        req.cache_status = "stale"
        _answer(g, req, wire.stale_reply(answer, q, req.tcp, STALE_TTL), answer.rcode)
        return "stale"
    req.cache_status = "error"
    _answer(g, req, wire.error_reply(q, wire.SERVFAIL), wire.SERVFAIL)
    return "servfail"


def fail(g: DnsGlobal, conn: Any, req: DnsRequest, reason: str) -> None:
    """A state raised (``failed``) or a TCP query never completed
    (``timeout``): SERVFAIL when the query was understood and a state failed,
    else nothing; waiters of its flight are let go."""
    _finish_flight(g, req, None)
    q = req.query
    if q is None or reason != "failed":
        return
    req.cache_status = "error"
    _answer(g, req, wire.error_reply(q, wire.SERVFAIL), wire.SERVFAIL)


FUNCTIONS = [derive_request, derive_cached_response, derive_miss_response, derive_collapsed_response,
             derive_remote_response, derive_tcp_response, next_upstream, store_answer, derive_failed_response]
