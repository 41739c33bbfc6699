"""Request path normalisation: one canonical path per request (sans-IO).

Every decision about a request -- the route rule it matches, the file it maps
to, a directory redirect, the cache key, the target forwarded to a backend --
must see the same path, or a client can write a path one way to pass a check
and have it read another way afterwards (``/x/../static/``, ``/%73tatic/``).
``parse_head`` therefore calls :func:`normalise` once, right after the head is
parsed, and everything later uses ``req.path`` / ``req.target``.

The rules (RFC 3986 section 6.2.2, plus refusals):

- ``%XX`` escapes of unreserved characters (ALPHA DIGIT ``-`` ``.`` ``_`` ``~``)
  are decoded; every other escape is kept, with its hex in upper case;
- an escape that is not ``%`` followed by two hex digits is refused (400);
- encoded ``/`` (``%2F``), encoded ``\\`` (``%5C``) and NUL (``%00``) are refused
  (400): they would let one segment be read as two by a file system or a
  backend (a Windows server splits on ``\\``), or end a C string early;
- empty segments are dropped (``//`` becomes ``/``): a path starting with
  ``//`` would otherwise read as a network-path reference (another host) in a
  ``Location``, and ``//static/`` would slip past a ``/static/`` rule;
- dot segments are resolved (RFC 3986 5.2.4); one that climbs above ``/`` is
  refused (400) rather than silently clamped;
- a trailing slash is kept, and a path ending in a dot segment ends in ``/``.
"""

from __future__ import annotations

from protocols.http.wire.errors import HttpError

_HEX = frozenset(b"0123456789abcdefABCDEF")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_REFUSED = {0x2F: "encoded slash in path", 0x5C: "encoded backslash in path", 0x00: "NUL in path"}


def normalise(path: bytes) -> bytes:
    """The canonical form of an origin-form path (starts with ``/``, no query).

    A path with no ``%``, ``/.`` or ``//`` is already canonical; the parser
    checks that inline and calls this only otherwise.

    Raises :class:`HttpError` (400) for a path that must be refused.
    """
    if b"%" in path:
        path = _normalise_escapes(path)
    segments = path.split(b"/")
    out: list[bytes] = []
    last = len(segments) - 1
    trailing = False
    for i, seg in enumerate(segments):
        if i == 0:
            continue  # before the leading "/"
        if seg == b"..":
            if not out:
                raise HttpError(400, "path climbs above the root")
            out.pop()
        elif seg and seg != b".":
            out.append(seg)
            continue
        trailing = i == last  # "", "." or ".." as the last segment: a directory
    if not out:
        return b"/"
    return b"/" + b"/".join(out) + (b"/" if trailing else b"")


def _normalise_escapes(path: bytes) -> bytes:
    pieces = path.split(b"%")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if len(piece) < 2 or piece[0] not in _HEX or piece[1] not in _HEX:
            raise HttpError(400, "invalid percent-encoding in path")
        byte = int(piece[:2], 16)
        refused = _REFUSED.get(byte)
        if refused is not None:
            raise HttpError(400, refused)
        if byte in _UNRESERVED:
            out.append(bytes((byte,)))
        else:
            out.append(b"%" + piece[:2].upper())
        out.append(piece[2:])
    return b"".join(out)
