"""Sibling cache ownership: several afpa instances share one cache.

Theory of operation
-------------------
Each cache key has one owner among the members of ``siblings.members``
(rendezvous hashing, routing/siblings.py).  On a miss for a GET or HEAD that
would go to a backend, ``derive_miss_response`` asks who owns the key:

- this instance (or the owner failed recently): served as by a single afpa
  (coalescing, the origin, storing);
- another member: ``sibling``.  ``derive_sibling_response`` (remote.py) forwards the
  client's request to the owner's sibling listener over a pooled connection
  (the backend machine, ``http-backend.toml``, as for any backend) with
  ``Afpa-Sibling: <token>; for=<client address>; proto=<http|https>``, and
  relays the owner's answer as it is, Cache-Status included, storing nothing.
  When the owner gives no answer (refused, reset or closed before a response
  byte, timed out, busy) nothing has reached the client yet: ``fallback``, and
  the table sends the request to the origin directly.

On the owner, connections accepted on the sibling listener start with
:func:`sibling_entry`'s wrapper of the table's start function: after the
request is parsed it must carry exactly one ``Afpa-Sibling`` with the shared
token (compared in constant time; anything else is answered 403 and the
connection closed); the field is removed and its client address and scheme
become the connection's, so the request is served exactly as if the client had
sent it (cache lookup, trust rules of ``trusted_proxies``, ``X-Forwarded-For``
appended once, storing).  A request that came over a sibling listener is never
sent to another sibling, whatever the member lists say, so requests cannot loop.

A hit for a key stored locally never gets here (the fast path is unchanged);
only misses pay for the owner choice (one keyed BLAKE2b per member).
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from afpa.machine.modules import StateFn
from protocols.http.wire.responses import set_error

FIELD = b"afpa-sibling"
LISTENER = "sibling"  # Connection.listener of connections accepted on the sibling listener


def key_bytes(key: tuple[bytes, bytes]) -> bytes:
    """The bytes the owner is chosen by: the primary cache key (host, target)."""
    return key[0] + b" " + key[1]


def eligible(req: Any, conn: Any) -> bool:
    """Whether a miss on a remote route may be sent to its key's owner: a GET
    or HEAD without a body, an upgrade or a stale copy here (those are served
    here as by a single afpa), from a client, never from a sibling."""
    return (req.key is not None and req.stale is None and req.upgrade is None and not req.chunked
            and req.content_length <= 0 and conn.listener != LISTENER and bool(req.host))


def parse_field(value: bytes) -> tuple[bytes, str, bool] | None:
    """``<token>; for=<ip>; proto=<http|https>`` -> (token, ip, tls); None when
    malformed (a missing or unknown parameter, an address that is not an IP)."""
    token, *params = value.split(b";")
    facts: dict[bytes, bytes] = {}
    for param in params:
        name, eq, v = param.strip(b" \t").partition(b"=")
        if not eq or name.lower() in facts:
            return None
        facts[name.lower()] = v
    if set(facts) != {b"for", b"proto"} or facts[b"proto"] not in (b"http", b"https"):
        return None
    try:
        ip = str(ipaddress.ip_address(facts[b"for"].decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        return None
    return token.strip(b" \t"), ip, facts[b"proto"] == b"https"


def admit(g: Any, conn: Any, req: Any) -> bool:
    """A request parsed on the sibling listener: check its Afpa-Sibling, take
    its client facts, remove it.  False: refused (a 403 is on ``req``)."""
    where = [i for i, n in enumerate(req.lnames) if n == FIELD]
    facts = parse_field(req.headers[where[0]][1]) if len(where) == 1 else None
    token = g.siblings.token if g.siblings is not None else None
    # Compared whatever else is wrong, so the time taken says nothing about the token.
    good = hmac.compare_digest(facts[0] if facts is not None else b"", token or b"\0")
    if facts is None or token is None or not good:
        conn.inpos = len(conn.inbuf)
        conn.pending = None
        set_error(g, req, 403, "sibling requests need a valid Afpa-Sibling token", close=True)
        return False
    del req.headers[where[0]], req.lnames[where[0]]
    _, ip, tls = facts
    conn.peer_label = f"{ip}:0"  # the client's, for X-Forwarded-For, trust and the access log
    conn.tls = tls
    return True


def sibling_entry(start: StateFn) -> StateFn:
    """The start function of sibling-listener connections: ``start`` (the
    table's, which parses a request), then :func:`admit`.  Same outcomes, so the
    table, its counters and its drawing stay those of the one machine."""

    def derive_sibling_request(g: Any, conn: Any, req: Any) -> Any:
        outcome = start(g, conn, req)
        if outcome == "complete" and not admit(g, conn, req):
            return "malformed"
        return outcome

    return derive_sibling_request
