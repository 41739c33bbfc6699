"""A strict HTTP/1.0 and HTTP/1.1 request parser (RFC 9110, RFC 9112).

Theory of operation
-------------------
One parser serves every path through afpa, because two parsers that disagree
about where a request ends is how request smuggling happens.  It is strict by
design: anything RFC 9112 lets a server reject is rejected, with the status the
RFC names, and the connection is closed afterwards.

``parse_head`` looks for the blank line that ends a head, starting where the
previous look stopped (a head arriving one byte at a time is not rescanned).
Before the end is found it still rejects early what can never become valid
(bare LF or CR, a request line or head over its limit), so a client cannot make
us wait for garbage.  When the head is complete it is validated and split in
one pass: the request line is split at its two spaces and each part checked
(method and version against the few every client sends, else their grammar;
the target's bytes with one ``translate``); every byte of the field block is
checked at once by one ``translate`` (field-vchar, SP, HT, and CR LF only
where lines end), then each line is cut at its first colon, its name checked
to be a token (once per distinct spelling: names repeat, values do not) and
its value stripped of OWS.  That is the grammar of RFC 9112 5 exactly; the
unit tests hold the parser to it, as regular expressions, on mutated heads.
Then its semantics are checked: Host, Content-Length, Transfer-Encoding,
Connection, Expect -- only once every line is well-formed, so a malformed
head is a 400 whatever its fields say.

House rules, with the RFC text they implement:

- "a recipient MUST NOT ... accept bare CR" / bare LF: rejected (RFC 9112 2.2).
- obs-fold: rejected with 400 (RFC 9112 5.2 allows it for a server).
- "No whitespace is allowed between the field name and colon" -> 400 (5.1).
- Host: "A server MUST respond with a 400 ... to any HTTP/1.1 request message
  that lacks a Host header field and to any request message that contains more
  than one Host header field line or a Host header field with an invalid field
  value" (RFC 9112 3.2).  A Host longer than a DNS name (255 octets, RFC 1035)
  plus a port is refused with 400: it is part of the cache key.
- Content-Length and Transfer-Encoding together: 400 and close (RFC 9112 6.3),
  as is Transfer-Encoding in an HTTP/1.0 request and any Transfer-Encoding
  whose final coding is not ``chunked``.  Codings we do not implement: 501.
- Content-Length must be 1*DIGIT and appear once; lists (even of equal values)
  are refused rather than merged.
- Versions: 1.0 and 1.1 are served, a later 1.x is answered as 1.1, any other
  major version gets 505 (RFC 9110 6.2).
- The path of an origin- or absolute-form target is normalised here, once
  (``paths.normalise``: unreserved escapes decoded, dot segments resolved,
  encoded ``/``, ``\\`` and NUL refused); ``req.path`` and ``req.target`` hold
  the normalised form, the query as sent.

Bodies are read by :class:`LengthBody` and :class:`ChunkedBody`, incremental
readers over the same connection buffer.
"""

from __future__ import annotations

import re
from typing import Any

from protocols.http.wire import paths
from protocols.http.wire.errors import HttpError

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_VCHAR = rb"\x21-\x7e\x80-\xff"  # field-vchar: VCHAR / obs-text

VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
REQUEST_LINE = re.compile(rb"([" + _TCHAR + rb"]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
FIELD_LINE = rb"([" + _TCHAR + rb"]+):[ \t]*((?:[" + _VCHAR + rb"]+(?:[ \t]+[" + _VCHAR + rb"]+)*)?)[ \t]*\r\n"
FIELDS = re.compile(FIELD_LINE)
FIELD_BLOCK = re.compile(rb"(?:" + FIELD_LINE + rb")*")
TOKEN = re.compile(rb"[" + _TCHAR + rb"]+")
DIGITS = re.compile(rb"[0-9]{1,18}")
HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]{0,5})?")
ABSOLUTE_TARGET = re.compile(rb"([A-Za-z][A-Za-z0-9+\-.]*)://([^/?#@]*)([/?][\x21-\x22\x24-\x7e]*)?")
CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,15})"
    rb"(?:[ \t]*;[ \t]*[" + _TCHAR + rb"]+(?:[ \t]*=[ \t]*(?:[" + _TCHAR + rb"]+|\"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*\"))?)*"
    rb"\r\n")

KNOWN_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT",
                           b"OPTIONS", b"TRACE", b"PATCH"})
MAX_LEADING_CRLF = 8  # RFC 9112 2.2: ignore at least one empty line before a request
MAX_CHUNK_LINE = 4096
# A host name is at most 255 octets (RFC 1035 2.3.4), plus ":" and a port.  The
# Host is part of the cache key, so a longer one is refused rather than stored.
MAX_HOST = 255 + 6
# What a path needs normalising for (an escape, a dot segment, an empty segment):
# one compiled search is about three times cheaper than three ``in`` tests.
_UNNORMAL = re.compile(rb"%|/\.|//").search


def _reject_partial(buf: bytes, start: int, scan: int, limits: Any) -> None:
    """Reject early what an incomplete head can never turn into a valid one."""
    # Only bytes that arrived since the last look are checked (plus the one
    # before them, which may be the CR of a CRLF split across reads).
    lo = max(start, scan - 1)
    # Bare LF: every LF must follow a CR.  Bare CR: every CR must precede an LF
    # (a CR as the very last byte may still get its LF).
    pairs = buf.count(b"\r\n", lo)
    if buf.count(b"\n", max(start, scan)) != pairs:
        raise HttpError(400, "bare LF in request head")
    crs = buf.count(b"\r", lo) - pairs
    if crs > 1 or (crs == 1 and not buf.endswith(b"\r")):
        raise HttpError(400, "bare CR in request head")
    line_end = buf.find(b"\r\n", start)
    if line_end < 0:
        if len(buf) - start > limits.max_request_line:
            raise HttpError(414, "request line too long")
    elif line_end - start > limits.max_request_line:
        raise HttpError(414, "request line too long")
    elif len(buf) - line_end > limits.max_header_block:
        raise HttpError(431, "request header block too large")


def parse_head(buf: bytes, pos: int, scan: int, limits: Any, req: Any) -> int:
    """Parse one request head from ``buf[pos:]`` into ``req``.

    Returns the index just past the head, or ``-1`` when more input is needed
    (then ``req.scan_hint`` says where to resume the search).  Raises
    :class:`HttpError` for a request that must be refused.
    """
    # Empty lines before a request line are ignored (a few of them).
    skipped = 0
    while buf.startswith(b"\r\n", pos):
        pos += 2
        skipped += 1
        if skipped > MAX_LEADING_CRLF:
            raise HttpError(400, "too many empty lines before the request line")
    end = buf.find(b"\r\n\r\n", pos if scan - 3 < pos else scan - 3)
    if end < 0:
        _reject_partial(buf, pos, scan, limits)
        req.scan_hint = len(buf)
        return -1
    line_end = buf.find(b"\r\n", pos)  # == end for a head with no field lines
    block_start = line_end + 2
    if line_end - pos > limits.max_request_line:
        raise HttpError(414, "request line too long")
    if end + 2 - block_start > limits.max_header_block:
        raise HttpError(431, "request header block too large")

    # Request line: method SP target SP version, split rather than matched.
    parts = buf[pos:line_end].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, _diagnose_request_line(buf[pos:line_end]))
    method, target, version = parts
    # An origin-form target seen before: its bytes were checked, its path normalised.
    known = _TARGETS.get(target)
    if ((method not in KNOWN_METHODS and TOKEN.fullmatch(method) is None)
            or (known is None and (not target or 0 in target.translate(_TARGET_MAP)))):
        raise HttpError(400, _diagnose_request_line(buf[pos:line_end]))
    if version == b"HTTP/1.1":
        version = 11
    elif version == b"HTTP/1.0":
        version = 10
    else:
        m = VERSION.fullmatch(version)
        if m is None:
            raise HttpError(400, _diagnose_request_line(buf[pos:line_end]))
        if m.group(1) != b"1":
            raise HttpError(505, "only HTTP/1.x is served")
        version = 10 if m.group(2) == b"0" else 11

    host = None
    hosts = 0
    content_length = -1
    te = None
    keep_alive = version == 11
    expect = False
    pragma = None
    fields = []
    lnames = []
    if end > line_end:
        # Field lines, in one pass: one C-speed check of every byte of the
        # block (field-vchar, SP, HT, and CR LF only as the line ends), then
        # per line its name (a token, checked once per distinct spelling) and
        # its value (the rest, OWS stripped).
        block = buf[block_start:end]
        lines = block.split(b"\r\n")
        if block.translate(_FIELD_MAP).count(0) != 2 * len(lines) - 2:  # only the CR LF between lines
            raise HttpError(400, _diagnose_fields(block + b"\r\n"))
        if len(lines) > limits.max_headers:
            if FIELD_BLOCK.fullmatch(buf, block_start, end + 2) is None:  # a bad name is the 400 it was
                raise HttpError(400, _diagnose_fields(block + b"\r\n"))
            raise HttpError(431, "too many header fields")
    else:
        lines = ()
    # A refusal for a field's meaning waits until every line has been found
    # well-formed: a malformed head is a 400 whatever else it says.
    refuse = None
    for line in lines:
        name, colon, value = line.partition(b":")
        lname = _NAMES.get(name)
        if lname is None or not colon:
            if not colon or TOKEN.fullmatch(name) is None:
                raise HttpError(400, _diagnose_fields(block + b"\r\n"))
            lname = name.lower()
            if len(_NAMES) < 1024 and len(name) <= 64:  # the same few names arrive again and again
                _NAMES[name] = lname
        value = value.strip(b" \t")
        fields.append((name, value))
        lnames.append(lname)
        if lname not in _SPECIAL:
            continue
        if lname == b"host":
            hosts += 1
            host = value
        elif lname == b"content-length":
            if refuse is not None:
                pass  # the first refusal is the answer
            elif content_length >= 0:
                refuse = HttpError(400, "more than one Content-Length")
            elif DIGITS.fullmatch(value) is None:
                refuse = HttpError(400, "invalid Content-Length")
            else:
                content_length = int(value)
        elif lname == b"transfer-encoding":
            te = value if te is None else te + b"," + value
        elif lname == b"connection":
            for token in value.lower().split(b","):
                token = token.strip(b" \t")
                if token == b"close":
                    keep_alive = False
                    break
                if token == b"keep-alive" and version == 10:
                    keep_alive = True
        elif lname == b"expect":
            if value.lower() != b"100-continue" and refuse is None:
                refuse = HttpError(417, "unsupported expectation")
            expect = True
        elif lname == b"if-none-match":
            req.if_none_match = value if req.if_none_match is None else req.if_none_match + b", " + value
        elif lname == b"if-modified-since":
            req.if_modified_since = value
        elif lname == b"if-match":
            req.if_match = value if req.if_match is None else req.if_match + b", " + value
        elif lname == b"if-unmodified-since":
            req.if_unmodified_since = value
        elif lname == b"upgrade":
            req.upgrade = value if req.upgrade is None else req.upgrade + b", " + value
        elif lname == b"cache-control":
            # Kept raw; evaluated by the cache lookup only when present.
            req.cache_control = value if req.cache_control is None else req.cache_control + b", " + value
        elif lname == b"pragma":
            pragma = value
        elif lname == b"range":
            # Joined like a list: two Range lines make an invalid value, which is ignored.
            req.range = value if req.range is None else req.range + b", " + value
        elif lname == b"if-range":
            req.if_range = value if req.if_range is None else req.if_range + b", " + value
        elif lname == b"afpa-trace":
            req.trace_asked = value == b"1"
    if refuse is not None:
        raise refuse

    if pragma is not None and req.cache_control is None and b"no-cache" in pragma.lower():
        # RFC 9111 5.4: Pragma: no-cache counts only without Cache-Control.
        req.cache_control = b"no-cache"
    if hosts > 1:
        raise HttpError(400, "more than one Host")
    if hosts == 0 and version == 11:
        raise HttpError(400, "HTTP/1.1 request without Host")
    lhost = b""
    if host is not None:
        lhost = _GOOD_HOSTS.get(host)
        if lhost is None:
            if HOST.fullmatch(host) is None:
                raise HttpError(400, "invalid Host")
            if len(host) > MAX_HOST:
                raise HttpError(400, "Host too long")
            lhost = host.lower()
            if len(_GOOD_HOSTS) < 1024:  # the same few Host values arrive again and again
                _GOOD_HOSTS[host] = lhost

    chunked = False
    if te is not None:
        if version == 10:
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if content_length >= 0:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        codings = [c.strip(b" \t").lower() for c in te.split(b",")]
        if any(not TOKEN.fullmatch(c) for c in codings):
            raise HttpError(400, "invalid Transfer-Encoding")
        if codings[-1] != b"chunked":
            raise HttpError(400, "Transfer-Encoding does not end in chunked")
        if codings.count(b"chunked") > 1:
            raise HttpError(400, "chunked applied more than once")
        if len(codings) > 1:
            raise HttpError(501, "transfer coding not implemented")
        chunked = True

    # Request target (RFC 9112 3.2).
    if known is not None:
        target, path, query = known
    elif target[0] == 47:  # "/"; the request line allowed only visible ASCII
        if b"#" in target:
            raise HttpError(400, "fragment in request target")
        sent = target
        path, sep, query = target.partition(b"?")
        if _UNNORMAL(path) is not None:
            # One canonical path for routing, files, redirects, the cache key
            # and the backend (protocols/http/wire/paths.py); the query is kept as
            # sent.
            path = paths.normalise(path)
            target = path + sep + query
        if len(sent) <= 512:
            if len(_TARGETS) >= 4096:
                _TARGETS.clear()  # the ones asked for again come back soon
            _TARGETS[sent] = (target, path, query)
    elif target == b"*":
        if method != b"OPTIONS":
            raise HttpError(400, "asterisk-form target is for OPTIONS only")
        path, query = b"*", b""
    elif method == b"CONNECT":
        if HOST.fullmatch(target) is None or b":" not in target:
            raise HttpError(400, "invalid authority-form target")
        path, query = b"", b""
    else:
        am = ABSOLUTE_TARGET.fullmatch(target)
        if am is None:
            raise HttpError(400, "invalid request target")
        scheme, authority, rest = am.groups()
        if scheme.lower() not in (b"http", b"https") or not authority or HOST.fullmatch(authority) is None:
            raise HttpError(400, "invalid absolute-form target")
        if len(authority) > MAX_HOST:
            raise HttpError(400, "Host too long")
        # RFC 9112 3.2.2: the target's authority overrides Host.
        host = authority
        lhost = authority.lower()
        rest = rest or b"/"
        if rest[0] == 63:  # "?"
            rest = b"/" + rest
        path, sep, query = rest.partition(b"?")
        if _UNNORMAL(path) is not None:
            path = paths.normalise(path)
        target = path + sep + query

    req.method = method
    req.target = target
    req.path = path
    req.query = query
    req.version = version
    req.headers = fields
    req.lnames = lnames
    req.host = lhost
    req.keep_alive = keep_alive
    req.content_length = content_length
    req.chunked = chunked
    req.expect_continue = expect
    return end + 4


# Host values found valid, each with its lower-case form (the cache key's).
_GOOD_HOSTS: dict[bytes, bytes] = {}
# Origin-form targets as sent -> (target, path, query) as parsed and normalised.
_TARGETS: dict[bytes, tuple[bytes, bytes, bytes]] = {}
# Tables for ``translate`` that turn every byte a request target (visible ASCII)
# or a field line (field-vchar, SP, HT) may not hold into NUL (itself never
# allowed): one C loop checks every byte.
_TARGET_MAP = bytes(c if 0x21 <= c <= 0x7e else 0 for c in range(256))
_FIELD_MAP = bytes(c if c in (9, 32) or 0x21 <= c <= 0x7e or c >= 0x80 else 0 for c in range(256))
# Field names found to be tokens, each with its lower-case form (bounded, as
# _GOOD_HOSTS); the common ones from the start.
_NAMES: dict[bytes, bytes] = {}
for _name in (b"Host", b"User-Agent", b"Accept", b"Accept-Encoding", b"Accept-Language", b"Connection",
              b"Cache-Control", b"Pragma", b"Referer", b"Cookie", b"Authorization", b"Content-Length",
              b"Content-Type", b"Transfer-Encoding", b"If-None-Match", b"If-Modified-Since", b"Range",
              b"Upgrade-Insecure-Requests", b"Sec-Fetch-Site", b"Sec-Fetch-Mode", b"Sec-Fetch-Dest",
              b"Sec-Fetch-User", b"DNT", b"Origin", b"X-Forwarded-For", b"X-Requested-With"):
    for _spelling in (_name, _name.lower()):
        _NAMES[_spelling] = _name.lower()
_SPECIAL = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"expect",
                      b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since",
                      b"upgrade", b"cache-control", b"pragma", b"range", b"if-range", b"afpa-trace"})


def _diagnose_request_line(line: bytes) -> str:
    parts = line.split(b" ")
    if len(parts) != 3:
        return "request line is not 'method SP target SP version'"
    method, target, version = parts
    if not TOKEN.fullmatch(method):
        return "invalid method"
    if not re.fullmatch(rb"HTTP/[0-9]\.[0-9]", version):
        return "invalid HTTP version"
    return "invalid request target"


def _diagnose_fields(block: bytes) -> str:
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[0] in b" \t":
            return "obsolete line folding in header"
        name, colon, _ = line.partition(b":")
        if not colon:
            return "header line without a colon"
        if not TOKEN.fullmatch(name):
            return "invalid header name"
        if FIELDS.fullmatch(line + b"\r\n") is None:
            return "invalid character in header value"
    return "invalid header section"


class LengthBody:
    """A Content-Length body: consumes exactly ``remaining`` bytes."""

    __slots__ = ("remaining",)

    def __init__(self, length: int):
        self.remaining = length

    def read(self, buf: bytes, pos: int) -> tuple[int, list[bytes], bool]:
        """Consume from ``buf[pos:]``; returns (new pos, data pieces, finished)."""
        take = min(self.remaining, len(buf) - pos)
        self.remaining -= take
        data = [buf[pos:pos + take]] if take else []
        return pos + take, data, self.remaining == 0


class ChunkedBody:
    """A chunked body (RFC 9112 7.1), strictly: hex size with optional valid
    extensions, CRLF after every line and chunk, trailer fields validated and
    dropped."""

    __slots__ = ("remaining", "phase", "trailer_bytes", "limit")

    SIZE, DATA, DATA_END, TRAILER, DONE = range(5)

    def __init__(self, trailer_limit: int = 64 << 10):
        self.remaining = 0
        self.phase = self.SIZE
        self.trailer_bytes = 0
        self.limit = trailer_limit

    def read(self, buf: bytes, pos: int) -> tuple[int, list[bytes], bool]:
        """Consume from ``buf[pos:]``; returns (new pos, data pieces, finished).
        Raises :class:`HttpError` on a framing error."""
        out: list[bytes] = []
        n = len(buf)
        while pos < n:
            phase = self.phase
            if phase == self.DATA:
                take = min(self.remaining, n - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.phase = self.DATA_END
            elif phase == self.DATA_END:
                if n - pos < 2:
                    if buf[pos] != 13:
                        raise HttpError(400, "chunk data not followed by CRLF")
                    break
                if buf[pos] != 13 or buf[pos + 1] != 10:
                    raise HttpError(400, "chunk data not followed by CRLF")
                pos += 2
                self.phase = self.SIZE
            elif phase == self.SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    tail = buf[pos:]
                    if len(tail) > MAX_CHUNK_LINE or b"\n" in tail or b"\r" in tail[:-1]:
                        raise HttpError(400, "invalid chunk size line")
                    break
                m = CHUNK_LINE.fullmatch(buf, pos, eol + 2)
                if m is None or eol - pos > MAX_CHUNK_LINE:
                    raise HttpError(400, "invalid chunk size line")
                size = int(m.group(1), 16)
                pos = eol + 2
                if size == 0:
                    self.phase = self.TRAILER
                else:
                    self.remaining = size
                    self.phase = self.DATA
            elif phase == self.TRAILER:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    tail = buf[pos:]
                    if self.trailer_bytes + len(tail) > self.limit or b"\n" in tail or b"\r" in tail[:-1]:
                        raise HttpError(400, "invalid trailer section")
                    break
                if eol == pos:
                    pos += 2
                    self.phase = self.DONE
                    return pos, out, True
                self.trailer_bytes += eol + 2 - pos
                if self.trailer_bytes > self.limit or FIELDS.fullmatch(buf, pos, eol + 2) is None:
                    raise HttpError(400, "invalid trailer field")
                pos = eol + 2
            else:
                return pos, out, True
        return pos, out, self.phase == self.DONE


STATUS_LINE = re.compile(rb"HTTP/1\.([0-9]) ([1-9][0-9]{2}) ([\t \x21-\x7e\x80-\xff]*)")
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})
# Status lines found valid -> (version, status, reason); a backend sends the same few.
_STATUS_LINES: dict[bytes, tuple[int, int, bytes]] = {}


def connection_options(value: bytes) -> frozenset[bytes]:
    """The lower-case, non-empty tokens of one Connection field value
    (remembered: a backend says ``keep-alive`` on every answer)."""
    tokens = _CONNECTION_OPTIONS.get(value)
    if tokens is None:
        tokens = frozenset(t for t in (t.strip(b" \t").lower() for t in value.split(b",")) if t)
        if len(_CONNECTION_OPTIONS) < 256 and len(value) <= 256:
            _CONNECTION_OPTIONS[value] = tokens
    return tokens


_CONNECTION_OPTIONS: dict[bytes, frozenset[bytes]] = {}
# Field lines of responses found well-formed -> ((name, value), lower-case name):
# an origin repeats most of its lines (Server, Content-Type, Cache-Control, ...).
_RESPONSE_LINES: dict[bytes, tuple[tuple[bytes, bytes], bytes]] = {}


def parse_response_head(buf: bytes, pos: int, limit: int, resp: Any) -> int:
    """Parse a backend's response head from ``buf[pos:]`` into ``resp``.

    Returns the index past the head or -1 when more is needed.  Raises
    :class:`HttpError` (always 502: the backend, not the client, is at fault)
    for anything that must not be relayed or cached: a garbage status line,
    invalid or conflicting Content-Length, Content-Length with
    Transfer-Encoding, an invalid Transfer-Encoding or one applying chunked
    other than last, invalid fields, or a head over ``limit``.

    Transfer codings other than chunked are not undone: ``resp.codings`` names
    them (e.g. ``b"gzip"``), ``resp.chunked`` says whether chunked frames the
    body.  When chunked is not the final coding the body ends when the backend
    closes (RFC 9112 6.3), so ``resp.keep_alive`` is False.
    """
    end = buf.find(b"\r\n\r\n", pos)
    if end < 0:
        if len(buf) - pos > limit:
            raise HttpError(502, "backend response head too large")
        if len(buf) - pos >= 12 and not buf.startswith(b"HTTP/1.", pos):
            raise HttpError(502, "backend sent no HTTP/1.x status line")
        return -1
    if end - pos > limit:
        raise HttpError(502, "backend response head too large")
    line_end = buf.find(b"\r\n", pos)
    status_line = buf[pos:line_end]
    parsed = _STATUS_LINES.get(status_line)
    if parsed is None:
        m = STATUS_LINE.fullmatch(status_line)
        if m is None:
            raise HttpError(502, "invalid status line from backend")
        parsed = (10 if m.group(1) == b"0" else 11, int(m.group(2)), m.group(3))
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[status_line] = parsed
    version = parsed[0]
    fields: list = []
    lnames: list = []
    content_length = -1
    te = None
    keep_alive = version == 11
    refuse = None
    if end > line_end:
        # The request parser's one pass (parse_head): one C-speed check of every
        # byte (field-vchar, SP, HT, and CR LF only between lines), then per line
        # its name (a token, checked once per spelling) and value (OWS stripped).
        lines = buf[line_end + 2:end].split(b"\r\n")
        if buf[line_end + 2:end].translate(_FIELD_MAP).count(0) != 2 * len(lines) - 2:
            raise HttpError(502, "invalid header section from backend")
        for line in lines:
            known = _RESPONSE_LINES.get(line)
            if known is not None:
                field, lname = known
                value = field[1]
            else:
                name, colon, value = line.partition(b":")
                lname = _NAMES.get(name)
                if lname is None or not colon:
                    if not colon or TOKEN.fullmatch(name) is None:
                        raise HttpError(502, "invalid header section from backend")
                    lname = name.lower()
                    if len(_NAMES) < 1024 and len(name) <= 64:
                        _NAMES[name] = lname
                value = value.strip(b" \t")
                field = (name, value)
                if len(line) <= 128:
                    if len(_RESPONSE_LINES) >= 2048:
                        _RESPONSE_LINES.clear()  # the lines sent again come back soon
                    _RESPONSE_LINES[line] = (field, lname)
            fields.append(field)
            lnames.append(lname)
            if lname in _FRAMING:
                if lname == b"content-length":
                    # A refusal for a field's meaning waits until every line
                    # was found well-formed (a malformed head says so).
                    if refuse is not None:
                        pass
                    elif DIGITS.fullmatch(value) is None:
                        refuse = "invalid Content-Length from backend"
                    elif content_length >= 0 and int(value) != content_length:
                        refuse = "conflicting Content-Length from backend"
                    else:
                        content_length = int(value)
                elif lname == b"transfer-encoding":
                    te = value if te is None else te + b"," + value
                else:
                    tokens = connection_options(value)
                    if b"close" in tokens:
                        keep_alive = False
                    elif b"keep-alive" in tokens and version == 10:
                        keep_alive = True
    resp.version = version
    resp.status = parsed[1]
    resp.reason = parsed[2]
    resp.headers = fields
    resp.lnames = lnames
    if refuse is not None:
        raise HttpError(502, refuse)
    chunked = False
    others = b""
    if te is not None:
        if content_length >= 0:
            raise HttpError(502, "backend sent Content-Length with Transfer-Encoding")
        codings = [c.strip(b" \t").lower() for c in te.split(b",")]
        if any(not TOKEN.fullmatch(c) for c in codings):
            raise HttpError(502, "invalid Transfer-Encoding from backend")
        if b"chunked" in codings[:-1]:
            raise HttpError(502, "backend applied chunked before another coding or twice")
        chunked = codings[-1] == b"chunked"
        # "identity" (an old name for no coding at all) is nothing to pass on.
        others = b", ".join(c for c in (codings[:-1] if chunked else codings) if c != b"identity")
        if not chunked:
            keep_alive = False  # the body is delimited by the close
    resp.content_length = content_length
    resp.chunked = chunked
    resp.codings = others
    resp.keep_alive = keep_alive
    return end + 4
