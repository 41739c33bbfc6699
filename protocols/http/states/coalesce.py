"""Request coalescing (collapsed forwarding) and hit-for-miss.

Theory of operation
-------------------
Many clients missing on the same key at once would each make the same backend
request.  Instead the first cacheable miss for a key on a remote route becomes
the *leader*: it is forwarded as usual and its :class:`Flight` is registered
under the key (``HttpGlobal.flights``).  Misses that arrive while the flight is
open become *waiters* (``derive_collapsed_response``) and are parked, with no
timer of their own: the client connection's deadline (swept once a second)
bounds the wait.

The leader's backend exchange reports what happened through three small hooks
in ``remote.py``:

- :func:`leader_stored`: the response was stored; every waiter is answered from
  that object (``Cache-Status: afpa; fwd=uri-miss; fwd-status=200; collapsed``) once
  the object is complete.
- :func:`leader_uncacheable`: the head said the response will not be stored.
  The waiters are released at once to make their own requests
  (``collapsed=?0``), and unless the reason was transient (a 5xx, a 304 to a
  revalidation, a full in-flight budget) the key is remembered as not
  cacheable for ``cache.hit_for_miss`` seconds: later misses for it are
  forwarded straight away, never serialised behind a leader (Varnish's
  hit-for-miss).  A later storable answer still stores as usual.
- :func:`leader_ended`: the exchange ended without either (a backend failure,
  a cut response, a leader whose client left): the waiters are released to try
  for themselves, as Varnish does.

Only a GET with no ``Authorization``, ``Cache-Control`` or ``Pragma`` (and no
``Upgrade``) leads, and only such a GET or HEAD waits: such requests are the
ones whose answer any other plain request may share.  Everything here runs on a miss; the hit path never looks at it.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from afpa.machine.modules import PEER_CLOSED, TIMEOUT, state
from afpa.machine.scopes import WORK
from protocols.http.states.client import _answer, settle_body

HIT_FOR_MISS_ENTRIES = 65536
"""At most this many keys are remembered as not cacheable (oldest forgotten first)."""

_PRIVATE_FIELDS = (b"authorization", b"cache-control", b"pragma")


@attrs.define(slots=True, eq=False)
class Flight:
    """One backend fetch in progress for a key, and the requests waiting for it."""

    key: Hashable
    leader: Any                                 # the request whose backend exchange fetches it
    waiters: list = attrs.field(factory=list)   # Deferreds, fired with an object or None


@attrs.define(slots=True, eq=False)
class Flights:
    """The in-flight registry and the hit-for-miss memory of one server."""

    hit_for_miss: float = 120.0
    max_waiters: int = 1000
    inflight: dict = attrs.field(factory=dict)   # key -> Flight
    # hash(key) -> until; insertion order is expiry order (one fixed lifetime).
    # Hashes, not keys: a target can be kilobytes long, and a collision only
    # means one request is forwarded instead of waiting.
    uncacheable: dict = attrs.field(factory=dict)
    collapsed: int = 0                          # requests answered from a leader's response
    hit_for_miss_total: int = 0                 # misses sent straight on because of hit-for-miss

    def on_miss(self, req: Any, now: float) -> str:
        """``collapsed`` when ``req`` should wait for a fetch in flight; else
        ``remote`` (leading a new flight when it may)."""
        key = req.key
        if (req.method != b"GET" and req.method != b"HEAD") or req.upgrade is not None:
            return "remote"  # an upgrade's exchange lasts as long as its tunnel
        lnames = req.lnames or ()
        for name in _PRIVATE_FIELDS:
            if name in lnames:
                return "remote"
        flight = self.inflight.get(key)
        if flight is not None:
            if len(flight.waiters) >= self.max_waiters:
                return "remote"
            return "collapsed"
        if self.uncacheable:
            until = self.uncacheable.get(hash(key))
            if until is not None:
                if until > now:
                    self.hit_for_miss_total += 1
                    return "remote"
                del self.uncacheable[hash(key)]
        if req.method == b"GET" and self.max_waiters > 0:
            self.inflight[key] = Flight(key, req)
        return "remote"

    def led_by(self, req: Any) -> Flight | None:
        """The open flight ``req`` leads, if any (no request field: the hit path
        builds no more than before)."""
        flight = self.inflight.get(req.key)
        return flight if flight is not None and flight.leader is req else None

    def close(self, flight: Flight, obj: Any) -> None:
        """The flight is over: wake every waiter with ``obj`` (None: go forward)."""
        if self.inflight.get(flight.key) is flight:
            del self.inflight[flight.key]
        waiters, flight.waiters = flight.waiters, []
        for d in waiters:
            d.callback(obj)

    def remember_uncacheable(self, key: Hashable, now: float) -> None:
        """Hit-for-miss: forward misses for ``key`` without coalescing for a while."""
        h = hash(key)
        self.uncacheable.pop(h, None)  # re-inserted last: keeps expiry order
        self.uncacheable[h] = now + self.hit_for_miss
        while len(self.uncacheable) > HIT_FOR_MISS_ENTRIES:
            del self.uncacheable[next(iter(self.uncacheable))]

    def sweep(self, now: float) -> None:
        """Forget hit-for-miss entries that have expired (oldest first)."""
        u = self.uncacheable
        while u:
            h = next(iter(u))
            if u[h] > now:
                break
            del u[h]


# -- hooks called by the leader's backend exchange (remote.py) ---------------

def leader_uncacheable(g: Any, creq: Any, status: int, transient: bool) -> None:
    """The leader's response head was relayed and will not be stored: release
    the waiters now; remember the key as not cacheable unless the reason was
    transient (5xx, 304, in-flight budget full)."""
    flight = g.flights.led_by(creq)
    if flight is None:
        return
    if not transient and status < 500 and status != 304:
        g.flights.remember_uncacheable(flight.key, g.reactor.seconds())
    g.flights.close(flight, None)


def leader_stored(g: Any, creq: Any, obj: Any, stored: bool) -> None:
    """The leader's response is complete: answer the waiters from it when it
    was stored, else release them."""
    flight = g.flights.led_by(creq)
    if flight is None:
        return
    g.flights.close(flight, obj if stored else None)


def leader_ended(g: Any, creq: Any) -> None:
    """The leader's exchange ended with the flight still open (failure, cut
    response, client gone): the waiters make their own requests."""
    flight = g.flights.led_by(creq)
    if flight is None:
        return
    g.flights.close(flight, None)


# -- the client machine's waiting state -----------------------------------------

@state("hit", "released", needs=("request", "route"), provides={"hit": ("response",)},
       events=(TIMEOUT, PEER_CLOSED))
def derive_collapsed_response(g: Any, conn: Any, req: Any) -> Deferred | str:
    """Wait for the fetch in flight for this key: ``hit`` when it was stored
    (answered from it), ``released`` when it was not (forward this request
    yourself).  The wait takes the events ``timeout`` (after
    ``cache.coalesce_timeout``) and ``peer_closed``; either gives it up."""
    flight = g.flights.inflight.get(req.key)
    if flight is None:  # reached without derive_miss_response's check (an edited table)
        return _woken(None, g, conn, req)

    def give_up(d: Deferred) -> None:
        # The driver delivers an event instead: leave the flight's waiters.
        if d in flight.waiters:
            flight.waiters.remove(d)
        req.cache_status = (req.cache_status or b"afpa; fwd=bypass") + b"; collapsed=?0"

    d: Deferred = Deferred(give_up)
    flight.waiters.append(d)
    # The connection's deadline bounds the wait: the server's sweep finds it,
    # so a waiter costs no timer.
    conn.arm(g.reactor.seconds() + g.settings.coalesce_timeout, WORK)
    return d.addCallback(_woken, g, conn, req)


def _woken(result: Any, g: Any, conn: Any, req: Any) -> str:
    if result is None or conn.closed or _varies(result):
        # RFC 9211: collapsed=?0, this request had to make its own.
        req.cache_status = (req.cache_status or b"afpa; fwd=bypass") + b"; collapsed=?0"
        return "released"
    obj = result
    now = g.reactor.seconds()
    if conn.pending is not None:
        settle_body(g, conn, req)
    req.cache_status = ((req.cache_status or b"afpa; fwd=bypass")
                        + b"; fwd-status=" + obj.head[9:12] + b"; collapsed")
    _answer(g, req, obj.head, obj.short_head, obj.etag, obj.last_modified, obj, now,
            int(now - obj.stored_at), obj.meta is not None)
    g.flights.collapsed += 1
    return "hit"


def _varies(obj: Any) -> bool:
    """A stored response that varies is for the leader's variant only; choosing
    one is the lookup's business, so a waiter with it goes forward."""
    meta = obj.meta
    return meta is not None and getattr(meta, "vary", None) is not None


FUNCTIONS = (derive_collapsed_response,)
