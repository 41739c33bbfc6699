"""HTTP's part in tracing and in the access log.

- ``Afpa-Trace: 1`` on a request from a trusted peer (loopback unless
  ``trace.loopback = false``, and every ``trusted_proxies`` address) makes
  ``derive_request`` start the request's trace (:func:`afpa.machine.trace.begin`), and
  the answer carries ``Afpa-Trace: <state path>`` (:func:`trace_answer`, or
  :func:`header_line` for a relayed backend head).  From anyone else the field
  is ignored; it is never forwarded to a backend, and a backend's own is never
  relayed (``protocols/http/policy/forward.py``).
- :func:`trace_fields`: the HTTP fields of a trace event.
- :func:`access_field`: the HTTP fields of the access-log format, nginx names.
"""

from __future__ import annotations

import re
from typing import Any

from afpa.ops.accesslog import Field
from afpa.cache.store import CacheObject
from afpa.net.sendengine import FileBody, Pieces
from afpa.machine.trace import begin

TRACE_COMPLETE = begin("complete")  # derive_request's "complete", tracing the request

DEFAULT_FORMAT = ('$remote_addr - - [$time_local] "$request" $status $body_bytes_sent '
                  '"$http_referer" "$http_user_agent" "$cache_status" $states')
"""The combined log format plus Cache-Status and the state path."""


def allowed(g: Any, conn: Any) -> bool:
    """Whether this connection's peer may ask for a trace."""
    host = conn.peer_host
    if g.runtime.settings.trace_loopback and (host.startswith("127.") or host == "::1" or host.startswith("::ffff:127.")):
        return True
    return g.trusted.trusts(host)


def header_line(trace: Any, now: float) -> bytes:
    """The ``Afpa-Trace`` response field line for ``trace`` as it stands at ``now``."""
    return b"Afpa-Trace: " + trace.text(now).encode("ascii", "replace") + b"\r\n"


def trace_answer(req: Any, text: str) -> None:
    """Put ``Afpa-Trace: text`` into the answer waiting on ``req`` (before the
    blank line that ends its head)."""
    head = req.head
    end = head.find(b"\r\n\r\n")
    if end >= 0:
        req.head = b"".join((head[:end + 2], b"Afpa-Trace: ", text.encode("ascii", "replace"), b"\r\n",
                             head[end + 2:]))


def body_bytes(req: Any) -> int:
    """Body bytes of the answer (relayed, or sent from the cache, a file or an error)."""
    if req.relayed:
        return req.relayed
    body = req.body
    if body is None:
        head = req.head
        end = head.find(b"\r\n\r\n")
        return len(head) - end - 4 if end >= 0 else 0
    cls = body.__class__
    if cls is CacheObject:
        return body.size
    if cls is FileBody:
        return body.stop - body.start
    if cls is Pieces:
        return sum(len(b) for b in body.fragments)
    return 0


def trace_fields(conn: Any, req: Any) -> dict:
    """The HTTP fields of a traced request's event."""
    out = {"method": req.method.decode("latin-1"), "host": req.host.decode("latin-1"),
           "path": req.path.decode("latin-1"), "cache_status": req.cache_status.decode("latin-1"),
           "bytes": body_bytes(req)}
    if req.query:
        out["query"] = req.query.decode("latin-1")
    return out


# -- access-log fields ----------------------------------------------------------

# Bytes a log line must not carry as they are: controls, quote, backslash and
# non-ASCII become \xHH (as nginx writes them), so a client cannot forge lines
# or break the quoting.
_UNSAFE = re.compile(rb'[\x00-\x1f"\\\x7f-\xff]')
_ESCAPE = str.maketrans({c: f"\\x{c:02X}" for c in (*range(0x20), 0x22, 0x5C, *range(0x7F, 0x100))})


def _text(value: bytes) -> str:
    if not value:
        return "-"
    if _UNSAFE.search(value) is None:
        return value.decode("ascii")  # the common case: nothing to escape
    return value.decode("latin-1").translate(_ESCAPE)


def _ascii(value: bytes) -> str:
    """A value the parser (or afpa itself) made of visible ASCII only: method, Host, Cache-Status."""
    return value.decode("ascii", "replace") if value else "-"


def _request(_conn: Any, req: Any, _now: float) -> str:
    method = req.method
    if not method:
        return "-"  # refused before a request line could be read
    return method.decode("ascii") + " " + _text(req.target) + (" HTTP/1.0" if req.version == 10 else " HTTP/1.1")


def _protocol(_conn: Any, req: Any, _now: float) -> str:
    return f"HTTP/1.{0 if req.version == 10 else 1}" if req.method else "-"


FIELDS: dict[str, Field] = {
    "request": _request,
    "request_method": lambda c, req, n: _ascii(req.method),
    "request_uri": lambda c, req, n: _text(req.target),
    "uri": lambda c, req, n: _text(req.path),
    "args": lambda c, req, n: _text(req.query),
    "host": lambda c, req, n: _ascii(req.host),
    "server_protocol": _protocol,
    "body_bytes_sent": lambda c, req, n: str(body_bytes(req)),
    "cache_status": lambda c, req, n: _ascii(req.cache_status),
}


def _header(lname: bytes) -> Field:
    def field(_conn: Any, req: Any, _now: float) -> str:
        lnames = req.lnames
        if not lnames:
            return "-"
        try:
            i = lnames.index(lname)
        except ValueError:
            return "-"
        if lnames.count(lname) == 1:
            return _text(req.headers[i][1])
        return _text(b", ".join(v for n, (_, v) in zip(lnames, req.headers) if n == lname))
    return field


def access_field(name: str) -> Field | None:
    """The access-log field ``$name``: one of :data:`FIELDS`, or ``$http_<name>``
    (a request field, ``_`` for ``-``: ``$http_user_agent``)."""
    field = FIELDS.get(name)
    if field is None and name.startswith("http_") and len(name) > 5:
        field = _header(name[5:].replace("_", "-").lower().encode("ascii"))
    return field


access_field.names = tuple(FIELDS)  # type: ignore[attr-defined]
access_field.hint = "$http_<request field, e.g. http_user_agent>"  # type: ignore[attr-defined]
