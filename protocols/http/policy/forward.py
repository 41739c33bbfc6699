"""What a reverse proxy changes in the messages it forwards (RFC 9110 7.6).

- Hop-by-hop fields never cross afpa: Connection and every field it names,
  Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding (afpa frames each
  side itself), Upgrade and Proxy-*.  A WebSocket upgrade request is the one
  exception: ``Upgrade: websocket`` and ``Connection: Upgrade`` are sent again
  (by afpa, not copied) so the backend may agree to switch.
- ``Via: 1.1 afpa`` is appended both ways.
- ``X-Forwarded-For``, ``-Proto`` and ``-Host`` are set toward the backend.
  What the peer says about the client is believed only when the peer is a
  trusted proxy (``trusted_proxies``): then its ``X-Forwarded-*`` and
  ``Forwarded`` are kept and the peer is appended to ``X-Forwarded-For`` once.
  From anyone else every field that claims a client address or scheme
  (:data:`CLIENT_CLAIMS`, any ``X-Forwarded-*``) is removed first, so a backend
  never sees a value the client made up.

Which backend responses may be stored is the caching policy's call
(``protocols/http/policy/cachepolicy.py``).
"""

from __future__ import annotations

from typing import Any

from protocols.http.wire.errors import REASONS
from protocols.http.wire.parser import connection_options

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"proxy-authenticate",
                        b"proxy-authorization"})
# Fields in which a peer claims who the client is (besides X-Forwarded-*): kept
# only from a trusted proxy.  Backends and their frameworks read all of these.
CLIENT_CLAIMS = frozenset({b"forwarded", b"x-real-ip", b"true-client-ip", b"cf-connecting-ip",
                           b"x-client-ip", b"x-cluster-client-ip", b"fastly-client-ip",
                           b"x-original-forwarded-for", b"x-originating-ip", b"client-ip"})
# Set by afpa toward the backend (framing, Host, Expect is answered by afpa).
# Afpa-Sibling (protocols/http/states/siblings.py) and Afpa-Trace (protocols/http/states/tracing.py)
# are for afpa alone: never sent to a backend.
REQUEST_REPLACED = frozenset({b"host", b"content-length", b"expect", b"via", b"afpa-sibling", b"afpa-trace"})
# A client's own preconditions, replaced by afpa's when it revalidates a stored
# response (the client's are then answered from the refreshed object).
# (If-Range stays: without it a Range request would get a part of a changed body.)
CONDITIONAL = frozenset({b"if-none-match", b"if-modified-since", b"if-match",
                         b"if-unmodified-since"})
# Set by afpa toward the client.
# Surrogate keys (purge by tag) are for afpa alone: never relayed or stored in a head.
# A backend's Afpa-Trace is not relayed: the client's is this afpa's own.
RESPONSE_REPLACED = frozenset({b"content-length", b"via", b"surrogate-key", b"cache-tag", b"afpa-trace"})
VIA = b"1.1 afpa"


def frame(pieces: list[bytes], chunked: bool, last: bool = False) -> list[bytes]:
    """Body pieces as they go on the wire: as they are, or as chunks (with the
    last-chunk when ``last``)."""
    if not chunked:
        return pieces
    out: list[bytes] = []
    for piece in pieces:
        out += [b"%x\r\n" % len(piece), piece, b"\r\n"]
    if last:
        out.append(b"0\r\n\r\n")
    return out


def connection_tokens(msg: Any) -> frozenset[bytes]:
    """Field names listed in a message's Connection field (lower-case)."""
    lnames = msg.lnames
    n = lnames.count(b"connection")  # scans in C: most messages have none or one
    if n == 0:
        return _NO_TOKENS
    if n == 1:
        return connection_options(msg.headers[lnames.index(b"connection")][1])
    out: frozenset[bytes] = _NO_TOKENS
    for lname, (_, value) in zip(lnames, msg.headers):
        if lname == b"connection":
            out = out | connection_options(value)
    return out


_NO_TOKENS: frozenset[bytes] = frozenset()


_WITH_HOP_BY_HOP: dict[frozenset[bytes], frozenset[bytes]] = {}


def _end_to_end(msg: Any, also_drop: frozenset[bytes],
                drop_prefixes: tuple[bytes, ...] = (b"proxy-",)) -> tuple[list[bytes], list[bytes]]:
    """(header lines of ``msg`` to forward, its existing Via values)."""
    named = connection_tokens(msg)
    drop = _WITH_HOP_BY_HOP.get(also_drop)
    if drop is None:
        drop = also_drop | HOP_BY_HOP
        if len(_WITH_HOP_BY_HOP) < 64:  # the callers' few constant sets (a frozenset keeps its hash)
            _WITH_HOP_BY_HOP[also_drop] = drop
    if named:
        drop = drop | named
    lnames, headers = msg.lnames, msg.headers
    lines = []
    for lname, (name, value) in zip(lnames, headers):
        if lname in drop or lname.startswith(drop_prefixes):
            continue
        lines.append(name + b": " + value + b"\r\n")
    # Every Via value, forwarded or not (scanned for in C: most messages have none).
    via = [value for lname, (_, value) in zip(lnames, headers) if lname == b"via"] if b"via" in lnames else []
    return lines, via


_UNTRUSTED_DROP = REQUEST_REPLACED | CLIENT_CLAIMS
_TRUSTED_DROP = REQUEST_REPLACED | {b"x-forwarded-for"}  # rewritten as one line below


def request_head(req: Any, client_ip: str, tls: bool, trusted_peer: bool, *,
                 body: str, upgrade: bytes | None = None, drop: frozenset[bytes] = frozenset(),
                 conditional: bytes = b"") -> bytes:
    """The request head afpa sends to a backend.

    ``client_ip`` is the peer's address; ``trusted_peer`` whether it is a trusted
    proxy (see :class:`afpa.machine.trust.TrustedProxies`).  ``body``: ``"none"``,
    ``"length"`` (the client's Content-Length) or ``"chunked"``; ``upgrade``: the
    protocol to ask the backend to switch to (see :func:`websocket_upgrade`);
    ``drop``: more request fields not to forward (lower-case names).
    ``conditional``: afpa's own validator lines (revalidating a stored
    response), sent instead of the client's preconditions."""
    drop = (_TRUSTED_DROP if trusted_peer else _UNTRUSTED_DROP) | drop
    if conditional:
        drop = drop | CONDITIONAL
    if trusted_peer:
        lines, via = _end_to_end(req, drop)
    else:
        lines, via = _end_to_end(req, drop, (b"proxy-", b"x-forwarded-"))
    out = [req.method, b" ", req.target, b" HTTP/1.1\r\nHost: ", req.host, b"\r\n", *lines, conditional]
    if upgrade is not None:
        out.append(b"Upgrade: " + upgrade + b"\r\nConnection: Upgrade\r\n")
    out.append(b"Via: " + b", ".join([*via, VIA]) + b"\r\n")
    xff = client_ip.encode()
    seen: Any = ()
    if trusted_peer:
        # The proxy's chain, then the proxy itself: exactly one entry per hop.
        prior = [v for n, (_, v) in zip(req.lnames, req.headers) if n == b"x-forwarded-for"]
        if prior:
            xff = b", ".join([*prior, xff])
        seen = req.lnames  # its X-Forwarded-Proto/-Host were kept above
    out.append(b"X-Forwarded-For: " + xff + b"\r\n")
    if b"x-forwarded-proto" not in seen:
        out.append(b"X-Forwarded-Proto: " + (b"https" if tls else b"http") + b"\r\n")
    if b"x-forwarded-host" not in seen and req.host:
        out.append(b"X-Forwarded-Host: " + req.host + b"\r\n")
    if body == "length":
        out.append(b"Content-Length: %d\r\n" % req.content_length)
    elif body == "chunked":
        out.append(b"Transfer-Encoding: chunked\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def websocket_upgrade(req: Any) -> bytes | None:
    """The ``Upgrade`` token to forward when ``req`` is a WebSocket opening
    handshake afpa supports (HTTP/1.1 GET without a body, ``Upgrade: websocket``
    and ``Connection: Upgrade``), else None: the request is forwarded as an
    ordinary one, without Upgrade."""
    if (req.upgrade is None or req.method != b"GET" or req.version != 11 or req.chunked
            or req.content_length > 0 or b"upgrade" not in connection_tokens(req)):
        return None
    for token in req.upgrade.split(b","):
        token = token.strip(b" \t")
        if token.lower() == b"websocket":
            return token
    return None


def response_lines(resp: Any, hide: frozenset[bytes] = frozenset(), via: bool = True) -> list[bytes]:
    """The backend response's end-to-end header lines, plus Via; fields named
    (lower-case) in ``hide`` left out.  ``via`` False: Via relayed as it came
    (a sibling's answer, which already names afpa)."""
    if not via:
        return _end_to_end(resp, _SIBLING_RESPONSE_DROP | hide)[0]
    lines, vias = _end_to_end(resp, RESPONSE_REPLACED | hide if hide else RESPONSE_REPLACED)
    lines.append(b"Via: " + b", ".join([*vias, VIA]) + b"\r\n")
    return lines


_SIBLING_RESPONSE_DROP = RESPONSE_REPLACED - {b"via"}
# What a sibling does not pass on to the owner: what afpa frames itself and
# any Afpa-Sibling a client sent (its own replaces it).  Everything else of the
# client's request goes as it came, so the owner applies to it exactly the
# rules a single afpa applies to a client (trust, X-Forwarded-*, Via).
_SIBLING_REQUEST_DROP = frozenset({b"host", b"content-length", b"expect", b"afpa-sibling"})


def sibling_request_head(req: Any, token: bytes, client_ip: str, tls: bool) -> bytes:
    """The request head a sibling sends to a key's owner: the client's request
    (hop-by-hop fields removed, as on any hop) plus ``Afpa-Sibling: <token>;
    for=<client address>; proto=<http|https>``, which the owner checks, takes
    as the client's facts and removes."""
    lines, _ = _end_to_end(req, _SIBLING_REQUEST_DROP, ())
    return b"".join([req.method, b" ", req.target, b" HTTP/1.1\r\nHost: ", req.host, b"\r\n", *lines,
                     b"Afpa-Sibling: ", token, b"; for=", client_ip.encode("ascii"), b"; proto=",
                     b"https" if tls else b"http", b"\r\n\r\n"])


def status_line(resp: Any) -> bytes:
    """``HTTP/1.1 <status> <reason>`` as the backend gave it (reason normalised when empty)."""
    reason = resp.reason or REASONS.get(resp.status, "Unknown").encode()
    return b"HTTP/1.1 %d %s\r\n" % (resp.status, reason)
