"""Byte range requests (RFC 9110 section 14), sans-IO.

Theory of operation
-------------------
A ``Range`` request is answered here from a representation afpa already holds
whole (a cache object, a file read from the document root) or can read at an
offset (a file streamed from disk).  The states in ``states.py`` ask three
questions, in the RFC's order, after the conditional headers (a 304 or 412
wins, RFC 9110 13.2.2):

1. does ``If-Range`` let the ranges apply (:func:`if_range_holds`)?
2. which byte ranges does ``Range`` select from a representation of this
   length (:func:`select`): ``None`` means "ignore Range, send the whole 200",
   an empty list "416, none satisfiable", else the ranges to send;
3. what head and body pieces make the 206 (:func:`single_head`,
   :func:`multipart`, :func:`slice_fragments`).

Decisions where the RFC leaves a choice:

- Invalid syntax, a unit other than ``bytes`` or an empty representation:
  ``Range`` is ignored (200), as RFC 9110 14.2 allows.
- Against range amplification (one request asking for the same bytes many
  times over): more than :data:`MAX_RANGES` ranges -> ignored (200, the whole
  representation once).  Ranges that overlap or lie closer than
  :data:`MERGE_GAP` bytes are coalesced (15.3.7.2 allows it), so a 206 body
  never holds a byte twice: at most the representation plus a small per-part
  overhead.  Order is kept as the client asked unless coalescing was needed.
- Only ``GET`` is ranged (14.2: it is the only method range handling is
  defined for); HEAD with Range gets the 200 head.

Bodies are never copied: a range is a list of the cache object's fragments,
the first and last cut as ``memoryview`` slices, which the Send Engine hands to
``sendmsg`` as they are.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from protocols.http.policy.cachepolicy import parse_http_date

MAX_RANGES = 16
MERGE_GAP = 80  # about the overhead of one more multipart part: not worth a part of its own
BOUNDARY = b"afpa" + os.urandom(12).hex().encode()  # per process; never needs to be predictable

_SPEC = re.compile(rb"[ \t]*([0-9]*)-([0-9]*)[ \t]*")
_UNIT = re.compile(rb"[Bb][Yy][Tt][Ee][Ss]=")
_BIG = 1 << 62  # any position beyond every representation afpa can hold


def _num(digits: bytes) -> int:
    # Positions may be arbitrarily long numerals (14.1.1): past 18 digits they
    # are larger than any length here, and int() of a huge numeral is avoided.
    return int(digits) if len(digits) <= 18 else _BIG


def parse(value: bytes) -> list[tuple[int | None, int | None]] | None:
    """The range-specs of a ``Range`` field value, or None when it is to be ignored
    (invalid syntax, another unit, more than :data:`MAX_RANGES` ranges).

    Each spec is ``(first, last)``: ``(first, None)`` is ``first-``,
    ``(None, n)`` the suffix ``-n``; positions are inclusive as written.
    """
    if _UNIT.match(value) is None:
        return None
    specs: list[tuple[int | None, int | None]] = []
    for element in value[6:].split(b","):
        m = _SPEC.fullmatch(element)
        if m is None:
            if element.strip(b" \t"):
                return None  # other-range or garbage: the whole field is invalid
            continue  # empty list elements are allowed (RFC 9110 5.6.1)
        first, last = m.groups()
        if not first:
            if not last:
                return None
            specs.append((None, _num(last)))
            continue
        a = _num(first)
        if last:
            b = _num(last)
            if b < a:
                return None  # "invalid if last-pos is less than first-pos" (14.1.2)
            specs.append((a, b))
        else:
            specs.append((a, None))
        if len(specs) > MAX_RANGES:
            return None
    if not specs or len(specs) > MAX_RANGES:
        return None
    return specs


def resolve(specs: Sequence[tuple[int | None, int | None]], length: int) -> list[tuple[int, int]]:
    """The satisfiable specs as half-open ``(start, stop)`` offsets in a
    representation of ``length`` bytes, coalesced where they overlap or nearly
    touch; empty when none is satisfiable (416)."""
    out: list[tuple[int, int]] = []
    for first, last in specs:
        if first is None:
            if last == 0:
                continue  # "-0" selects nothing
            out.append((max(0, length - last), length))
        elif first < length:
            out.append((first, length if last is None or last >= length else last + 1))
    if len(out) < 2:
        return out
    ordered = sorted(out)
    merged = [ordered[0]]
    for start, stop in ordered[1:]:
        pstart, pstop = merged[-1]
        if start <= pstop + MERGE_GAP:
            merged[-1] = (pstart, max(pstop, stop))
        else:
            merged.append((start, stop))
    return out if len(merged) == len(out) else merged


def select(value: bytes, length: int) -> list[tuple[int, int]] | None:
    """What a ``Range`` value asks of a ``length``-byte representation: None to
    ignore it (send the whole 200), ``[]`` for 416, else the ranges to send."""
    if length <= 0:
        return None
    specs = parse(value)
    if specs is None:
        return None
    return resolve(specs, length)


def if_range_holds(value: bytes, etag: bytes | None, last_modified: int | None) -> bool:
    """Whether ``If-Range`` lets the ranges apply (RFC 9110 13.1.5): a strong
    entity-tag equal to the representation's, or a date exactly equal to its
    Last-Modified.  A weak tag or anything else: send the whole representation."""
    value = value.strip(b" \t")
    if value.startswith(b'"') or value.startswith(b"W/"):
        return etag is not None and value.startswith(b'"') and value == etag
    if last_modified is None:
        return False
    when = parse_http_date(value)
    return when is not None and int(when) == last_modified and when == int(when)


def content_range(start: int, stop: int, length: int) -> bytes:
    """``Content-Range`` value for the half-open range ``start:stop``."""
    return b"bytes %d-%d/%d" % (start, stop - 1, length)


def _lines(head: bytes) -> list[bytes]:
    # A stored head is a status line and field lines, each ending in CRLF.
    return head.split(b"\r\n")[1:-1]


def _named(line: bytes, *names: bytes) -> bool:
    return line.partition(b":")[0].strip(b" \t").lower() in names


def single_head(head: bytes, start: int, stop: int, length: int) -> bytes:
    """The 206 head (without the mutable fields) for one range of the 200 ``head``."""
    keep = [line + b"\r\n" for line in _lines(head)
            if not _named(line, b"content-length", b"content-range")]
    return b"".join((b"HTTP/1.1 206 Partial Content\r\n", *keep,
                     b"Content-Length: %d\r\nContent-Range: " % (stop - start),
                     content_range(start, stop, length), b"\r\n"))


def multipart(head: bytes, ranges: Sequence[tuple[int, int]],
              length: int) -> tuple[bytes, list[tuple[bytes, int, int]], bytes]:
    """A multipart/byteranges 206 (RFC 9110 14.6) for several ranges of the 200 ``head``.

    Returns (head without the mutable fields, parts, closing delimiter); each
    part is (its delimiter and fields, start, stop): the body is each part's
    bytes followed by that range of the representation, then the closing
    delimiter.  The head's Content-Length counts all of it exactly.
    """
    ctype = b""
    keep = []
    for line in _lines(head):
        if _named(line, b"content-type"):
            ctype = b"Content-Type: " + line.partition(b":")[2].strip(b" \t") + b"\r\n"
        elif not _named(line, b"content-length", b"content-range"):
            keep.append(line + b"\r\n")
    parts = []
    total = 0
    for i, (start, stop) in enumerate(ranges):
        sep = b"" if i == 0 else b"\r\n"
        part = b"".join((sep, b"--", BOUNDARY, b"\r\n", ctype, b"Content-Range: ",
                         content_range(start, stop, length), b"\r\n\r\n"))
        parts.append((part, start, stop))
        total += len(part) + stop - start
    closing = b"\r\n--" + BOUNDARY + b"--\r\n"
    total += len(closing)
    new_head = b"".join((b"HTTP/1.1 206 Partial Content\r\n", *keep,
                         b"Content-Type: multipart/byteranges; boundary=", BOUNDARY, b"\r\n",
                         b"Content-Length: %d\r\n" % total))
    return new_head, parts, closing


def slice_fragments(fragments: Sequence[bytes], start: int, stop: int) -> list[bytes | memoryview]:
    """The pieces of ``fragments`` (one payload, in order) covering bytes
    ``start:stop``: whole fragments as they are, the cut ones as memoryviews."""
    out: list[bytes | memoryview] = []
    pos = 0
    for frag in fragments:
        end = pos + len(frag)
        if end > start:
            if pos >= stop:
                break
            a = max(start - pos, 0)
            b = min(stop, end) - pos
            out.append(frag if a == 0 and b == len(frag) else memoryview(frag)[a:b])
        pos = end
    return out
