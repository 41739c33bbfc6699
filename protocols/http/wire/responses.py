"""Building response heads: immutable parts once per object, mutable parts per send.

A cached object's status line and immutable headers are serialized when the
object is made (:func:`object_heads`).  At send time only Date (formatted once a
second by :class:`DateCache`), Age, Cache-Status and Connection are appended
(:func:`finish_head`).
"""

from __future__ import annotations

from email.utils import formatdate
from typing import Any

from protocols.http.wire.errors import REASONS

SERVER = b"Server: afpa\r\n"


class DateCache:
    """``Date:`` header line for the current second, formatted once per second."""

    __slots__ = ("second", "line")

    def __init__(self) -> None:
        self.second = -1
        self.line = b""

    def get(self, now: float) -> bytes:
        """The complete ``Date: ...\\r\\n`` line for time ``now``."""
        second = int(now)
        if second != self.second:
            self.second = second
            self.line = b"Date: " + formatdate(second, usegmt=True).encode() + b"\r\n"
        return self.line


def http_date(ts: float) -> bytes:
    """IMF-fixdate for a POSIX time."""
    return formatdate(int(ts), usegmt=True).encode()


def status_line(status: int) -> bytes:
    """``HTTP/1.1 200 OK\\r\\n``."""
    return b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "Unknown").encode())


def object_heads(status: int, content_type: bytes, length: int, last_modified: float | None,
                 etag: bytes | None) -> tuple[bytes, bytes]:
    """(full head, not-modified head) of a cacheable object, without mutable fields."""
    validators = b""
    if last_modified is not None:
        validators += b"Last-Modified: " + http_date(last_modified) + b"\r\n"
    if etag is not None:
        validators += b"ETag: " + etag + b"\r\n"
    # Accept-Ranges: afpa answers Range requests for these (protocols/http/policy/ranges.py).
    head = (status_line(status) + SERVER + b"Content-Type: " + content_type + b"\r\n"
            + b"Content-Length: %d\r\n" % length + b"Accept-Ranges: bytes\r\n" + validators)
    return head, status_line(304) + SERVER + validators


# Pieces of the mutable fields, made once: a hit's head is then one join of
# ready parts.  Ages below 1024 s and the few Cache-Status values seen over and
# over are looked up rather than formatted per response.
_AGE_LINES = [b"Age: %d\r\n" % age for age in range(1024)]
_STATUS_LINES: dict[bytes, bytes] = {}
_CLOSE_END = b"Connection: close\r\n\r\n"
_KEEP_END = b"Connection: keep-alive\r\n\r\n"


def finish_head(g: Any, req: Any, head: bytes, now: float, age: int | None, dated: bool = False) -> bytes:
    """Append the mutable fields and the blank line to an immutable head.
    ``dated``: the head carries its origin's Date already (a stored backend
    response), so no fresh one is added."""
    if req.close:
        end = _CLOSE_END
    elif req.version == 10:
        end = _KEEP_END
    else:
        end = b"\r\n"
    status = req.cache_status
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"Cache-Status: " + status + b"\r\n"
        if len(_STATUS_LINES) < 256:  # stale answers carry a ttl: not all values recur
            _STATUS_LINES[status] = line
    if age is None:
        age_line = b""
    elif 0 <= age < 1024:
        age_line = _AGE_LINES[age]
    else:
        age_line = b"Age: %d\r\n" % age
    return b"".join((head, b"" if dated else g.dates.get(now), age_line, line, end))


def set_error(g: Any, req: Any, status: int, detail: str = "", *, extra: bytes = b"",
              close: bool = False) -> None:
    """Put a short plain-text error answer on ``req`` (body inline, none for HEAD)."""
    reason = REASONS.get(status, "Error")
    body = f"{status} {reason}{': ' + detail if detail else ''}\n".encode()
    req.status = status
    req.close = req.close or close
    if not req.cache_status:
        req.cache_status = b"afpa; detail=not-cacheable"
    head = (status_line(status) + SERVER + b"Content-Type: text/plain; charset=utf-8\r\n"
            + b"Content-Length: %d\r\n" % len(body) + b"Cache-Control: no-store\r\n" + extra)
    head = finish_head(g, req, head, g.reactor.seconds(), None)
    req.head = head if req.method == b"HEAD" else head + body
    req.body = None
