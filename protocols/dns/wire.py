"""DNS wire format for the caching forwarder (RFC 1035, RFC 6891, RFC 2308), sans-IO.

Theory of operation
-------------------
A forwarder mostly moves bytes: a query comes in, the same question goes out
with a new ID, the answer comes back and is stored as wire bytes; a cache hit
replays those bytes with the client's ID, question case and aged TTLs.  So this
module never builds message objects on the request path.  It works on byte
offsets:

- :func:`parse_query` validates a query and returns a :class:`Query` holding
  offsets and the cache key.  The common shape (one question, no records, or
  one OPT record in the additional section) takes a straight-line path; any
  other shape is walked record by record.
- :func:`parse_response` checks that a reply really answers what was sent
  (ID, QR, opcode, and the question compared byte for byte, so DNS 0x20 case
  randomisation doubles as spoofing protection), validates every record
  (compression pointers must point strictly backwards, names at most 255
  octets, labels at most 63, records inside the message, rdlength consistent
  for the types whose rdata holds names or has a fixed size), works out the
  positive or negative (RFC 2308) lifetime, and keeps an :class:`Answer`: the
  wire without OPT/TSIG, ID 0, and the offset of every TTL.
- :func:`reply_from_answer` is the cache-hit path: one join of the client's
  ID and flags, the stored counts, the client's question name (its 0x20
  case), the rest of the stored wire with its TTLs aged (rebuilt at most once
  per entry per distinct age, i.e. once a second for a busy entry) and our
  OPT; or a TC=1 reply when the answer does not fit the client's UDP size.

Why not ``twisted.names.dns``
-----------------------------
Twisted's DNS library (already a dependency) is the field's wire library in
Twisted; the tests build and decode their messages with it, so this module
is checked against it.  The request path does not use it, because:

- measured on this machine (Python 3.11, Twisted 26.10; CPU time per call,
  best of 7, the machine shared with other work), ``Message().fromStr`` of a
  79-byte response holding a CNAME and two A records takes 24 µs and
  ``_EDNSMessage().fromStr`` of a 44-byte EDNS query 17 µs; this module's
  :func:`parse_response` takes 7 µs for the same response (validation and the
  stored :class:`Answer` included) and :func:`parse_query` 1.4 µs for the
  query; a cache-hit :func:`reply_from_answer` takes 0.5 µs;
- it returns objects, not offsets: a cache that replays stored bytes needs the
  offset of every TTL, which no DNS library exposes;
- EDNS lives in a private class (``_EDNSMessage``; the public ``Message``
  treats OPT as an ordinary record), and ``_EDNSMessage.toStr`` cuts every
  message at 512 octets whatever size it advertises, so it cannot build a
  reply for a client's UDP size.

Choices (following Unbound where the RFCs leave room)
-----------------------------------------------------
- Queries: shorter than a header or QR=1 are dropped (never answer a
  response); opcode other than QUERY gets NOTIMP; QDCOUNT != 1, a non-empty
  answer section, bad names, a compression pointer in the question, trailing
  bytes, more than one OPT, an OPT outside the additional section or not owned
  by the root, and malformed OPT options get FORMERR; EDNS version > 0 gets
  BADVERS (extended RCODE 16, RFC 6891 6.1.3).
- A client's UDP size below 512 counts as 512, and above
  :data:`MAX_UDP_SIZE` is capped; our own OPT advertises
  :data:`ADVERTISED_UDP_SIZE` (1232, the DNS flag day 2020 value).
- Stored answers keep the additional records that come before the OPT (or a
  TSIG) and drop the rest: OPT and TSIG belong to one message, and additional
  data is optional.
- A response without a question (some servers answer errors that way) does
  not prove it answers ours: it is a :class:`Mismatch`.
- TTLs with the top bit set count as 0 (RFC 2181 8).
"""

from __future__ import annotations

import struct
from typing import Any

import attrs

# RCODEs (RFC 1035 4.1.1, RFC 6891 9)
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16

# RR types and QTYPEs
A = 1
NS = 2
CNAME = 5
SOA = 6
PTR = 12
HINFO = 13
MX = 15
TXT = 16
AAAA = 28
SRV = 33
DNAME = 39
OPT = 41
TKEY = 249
TSIG = 250
IXFR = 251
AXFR = 252
MAILB = 253
MAILA = 254
ANY = 255

CLASS_IN = 1
CLASS_ANY = 255

# Header flag bits (the second 16-bit word)
QR = 0x8000
OPCODE_MASK = 0x7800
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
AD = 0x0020
CD = 0x0010
RCODE_MASK = 0x000F

MIN_UDP_SIZE = 512
MAX_UDP_SIZE = 4096
"""Cap on the UDP size a client may ask for: a bigger reply would be fragmented."""
ADVERTISED_UDP_SIZE = 1232
"""The UDP size in our own OPT records (DNS flag day 2020: no fragmentation)."""
MAX_NAME = 255
MAX_LABEL = 63

_HDR = struct.Struct(">HHHHHH")
_ID_FLAGS = struct.Struct(">HH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_QTAIL = struct.Struct(">HH")
_RR = struct.Struct(">HHIH")  # type, class, ttl, rdlength after the owner name
_OPT_BODY = struct.Struct(">HBBHH")  # udp size, ext rcode, version, flags, rdlength
_Q_OPT = struct.Struct(">HHBHHBBHH")  # qtype, qclass, then an OPT: owner, type, _OPT_BODY
_SOA_TAIL = struct.Struct(">IIIII")

_OPT_DO_BIT = 0x8000


class Malformed(Exception):
    """A message that cannot be used.

    ``rcode`` is what to answer (FORMERR, NOTIMP, BADVERS), or None when the
    message must be dropped without an answer; ``reason`` is one line for the log.
    """

    def __init__(self, rcode: int | None, reason: str) -> None:
        super().__init__(reason)
        self.rcode = rcode
        self.reason = reason


class Mismatch(Malformed):
    """A message that is not the answer to the query we sent (ignore it, keep waiting)."""

    def __init__(self, reason: str) -> None:
        super().__init__(None, reason)


@attrs.define(slots=True)
class Query:
    """A validated query: the raw message and what the forwarder needs from it.

    ``qname`` is the question name in wire form exactly as received (case kept);
    ``key`` is the lowercased name plus QTYPE and QCLASS (the cache key);
    ``question_end`` the offset just after the question.
    """

    data: bytes
    id: int
    flags: int
    qname: bytes
    qtype: int
    qclass: int
    key: bytes
    question_end: int
    edns: bool = False
    udp_size: int = MIN_UDP_SIZE
    do: bool = False

    @property
    def rd(self) -> bool:
        """Recursion desired."""
        return bool(self.flags & RD)

    @property
    def cd(self) -> bool:
        """Checking disabled (RFC 4035 3.2.2)."""
        return bool(self.flags & CD)


@attrs.define(slots=True)
class Answer:
    """What the cache stores for a key: a reply ready to replay.

    ``wire`` has ID 0, the question, and the answer/authority/additional
    records without OPT or TSIG, counts fixed up; ``ttl_offsets`` are the
    offsets of every record's 4-byte TTL in ``wire``; ``ttl`` how many seconds
    it stays fresh; ``negative`` is true for NXDOMAIN and NODATA.

    The other fields are derived from ``wire`` for the hit path: the header
    flags, the counts as stored and with one more additional record (our OPT),
    where the question name ends, and the part after the question name with
    every TTL aged by ``aged_by`` seconds (rebuilt when a hit comes with
    another age, so at most once a second for a busy entry; an entry that has
    been hit holds about twice its wire size).
    """

    wire: bytes
    ttl_offsets: tuple[int, ...]
    ttl: int
    rcode: int
    negative: bool
    flags: int = attrs.field(init=False)
    arcount: int = attrs.field(init=False)
    counts: bytes = attrs.field(init=False)
    counts_edns: bytes = attrs.field(init=False)
    qname_end: int = attrs.field(init=False)
    aged_by: int = attrs.field(init=False)
    aged_rest: bytes = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        wire = self.wire
        _id, self.flags, qd, an, ns, self.arcount = _HDR.unpack_from(wire)
        self.counts = wire[4:12]
        self.counts_edns = _HDR.pack(0, 0, qd, an, ns, self.arcount + 1)[4:]
        pos = 12
        while wire[pos]:
            pos += wire[pos] + 1
        self.qname_end = pos + 1
        self.aged_by = -1  # built on the first hit: entries never hit cost no copy
        self.aged_rest = b""

    def age(self, age: int) -> bytes:
        """The wire after the question name with every TTL lowered by ``age`` (not below 0)."""
        if age != self.aged_by:
            base = self.qname_end
            rest = bytearray(self.wire[base:])
            if age > 0:
                for off in self.ttl_offsets:
                    t = _U32.unpack_from(rest, off - base)[0] - age
                    _U32.pack_into(rest, off - base, t if t > 0 else 0)
            self.aged_rest = bytes(rest)
            self.aged_by = age
        return self.aged_rest

    def rest_with_ttl(self, ttl: int) -> bytes:
        """The wire after the question name with every TTL set to ``ttl`` (not memoised)."""
        base = self.qname_end
        rest = bytearray(self.wire[base:])
        for off in self.ttl_offsets:
            _U32.pack_into(rest, off - base, ttl)
        return bytes(rest)


@attrs.define(slots=True)
class Response:
    """An upstream's answer to our query.

    ``answer`` is what may be cached (None when it may not: SERVFAIL, REFUSED,
    NOTIMP, FORMERR, TC set, a negative answer without SOA, or a lifetime of
    0); ``reply`` is always set and is what to send the clients waiting now.
    """

    rcode: int
    truncated: bool
    answer: Answer | None
    reply: Answer


# --- queries ---------------------------------------------------------------


def parse_query(data: bytes) -> Query:
    """Validate a query and return its :class:`Query`; raise :class:`Malformed`."""
    n = len(data)
    if n < 12:
        raise Malformed(None, "shorter than a DNS header")
    qid, flags, qdcount, ancount, nscount, arcount = _HDR.unpack_from(data)
    if flags & (QR | OPCODE_MASK) or qdcount != 1:
        if flags & QR:
            raise Malformed(None, "QR=1: a response, not a query")
        if flags & OPCODE_MASK:
            raise Malformed(NOTIMP, f"opcode {(flags & OPCODE_MASK) >> 11} not implemented")
        raise Malformed(FORMERR, f"{qdcount} questions (exactly one expected)")
    # The question name: plain labels only (a pointer here could only point at
    # the header or at itself).
    i = 12
    try:
        length = data[12]
        while length:
            if length > MAX_LABEL:
                if length >= 0xC0:
                    raise Malformed(FORMERR, "compression pointer in the question")
                raise Malformed(FORMERR, "bad label length in the question")
            i += length + 1
            length = data[i]
    except IndexError:
        raise Malformed(FORMERR, "truncated question") from None
    qend = i + 1
    if qend > 12 + MAX_NAME:
        raise Malformed(FORMERR, "question name longer than 255 octets")
    qe = qend + 4
    qname = data[12:qend]
    if not (ancount | nscount):
        if arcount == 1:
            if qe + 11 <= n:
                # The usual EDNS query: question then one OPT owned by the root.
                qtype, qclass, owner, rtype, size, _ext, version, oflags, rdlen = _Q_OPT.unpack_from(data, qend)
                end = qe + 11 + rdlen
                if owner == 0 and rtype == OPT and end == n:
                    if rdlen:
                        _check_options(data, qe + 11, end)
                    if version:
                        raise Malformed(BADVERS, f"EDNS version {version}")
                    return Query(
                        data, qid, flags, qname, qtype, qclass, qname.lower() + data[qend:qe], qe, True,
                        MIN_UDP_SIZE if size < MIN_UDP_SIZE else MAX_UDP_SIZE if size > MAX_UDP_SIZE else size,
                        oflags >= _OPT_DO_BIT,
                    )  # fmt: skip
        elif not arcount and qe == n:
            qtype, qclass = _QTAIL.unpack_from(data, qend)
            return Query(data, qid, flags, qname, qtype, qclass, qname.lower() + data[qend:qe], qe)
    # Anything else, including every error past the question name.
    return _parse_query_slow(data, qid, flags, qname, qend, ancount, nscount, arcount)


QUERY_MEMO = 4096
"""How many distinct queries :func:`parse_query_memo` remembers (then it starts over)."""
MEMO_MAX_QUERY = 512
"""Only queries up to this size are remembered: at most 2 MiB of memo."""


def parse_query_memo(data: bytes, memo: dict) -> Query:
    """:func:`parse_query` remembering what it found per query: the same bytes
    after the ID always parse the same way, so a query seen before (what a busy
    cache answers) skips the checks and the key building.  ``memo`` is the
    caller's dict; at :data:`QUERY_MEMO` entries it is cleared (random names
    cost one parse each, as without it).  Malformed queries are not remembered."""
    fields = memo.get(data[2:])
    if fields is not None:
        return Query(data, (data[0] << 8) | data[1], *fields)
    q = parse_query(data)
    if len(data) > MEMO_MAX_QUERY:
        return q  # a long query (TCP allows 64 KiB) is parsed each time: the memo stays small
    if len(memo) >= QUERY_MEMO:
        memo.clear()
    memo[data[2:]] = (q.flags, q.qname, q.qtype, q.qclass, q.key, q.question_end, q.edns, q.udp_size, q.do)
    return q


def _parse_query_slow(
    data: bytes, qid: int, flags: int, qname: bytes, qend: int, ancount: int, nscount: int, arcount: int
) -> Query:
    """Any query shape other than question (+ one OPT): walk every record."""
    n = len(data)
    qe = qend + 4
    if qe > n:
        raise Malformed(FORMERR, "truncated question")
    qtype, qclass = _QTAIL.unpack_from(data, qend)
    key = qname.lower() + data[qend:qe]
    if ancount:
        raise Malformed(FORMERR, "answer records in a query")
    pos = qe
    edns = False
    udp_size = MIN_UDP_SIZE
    do = False
    for idx in range(nscount + arcount):
        pos, nlen = _skip_name(data, pos)
        if pos + 10 > n:
            raise Malformed(FORMERR, "truncated record")
        rtype, rclass, ttl, rdlen = _RR.unpack_from(data, pos)
        start = pos + 10
        pos = start + rdlen
        if pos > n:
            raise Malformed(FORMERR, "record data runs past the end")
        if rtype == OPT:
            if idx < nscount:
                raise Malformed(FORMERR, "OPT record outside the additional section")
            if edns:
                raise Malformed(FORMERR, "more than one OPT record")
            if nlen != 1:
                raise Malformed(FORMERR, "OPT record not owned by the root")
            if rdlen:
                _check_options(data, start, pos)
            if (ttl >> 16) & 0xFF:
                raise Malformed(BADVERS, f"EDNS version {(ttl >> 16) & 0xFF}")
            edns = True
            udp_size = min(max(rclass, MIN_UDP_SIZE), MAX_UDP_SIZE)
            do = bool(ttl & _OPT_DO_BIT)
        else:
            _check_rdata(data, rtype, start, pos)
    if pos != n:
        raise Malformed(FORMERR, "trailing bytes after the last record")
    return Query(data, qid, flags, qname, qtype, qclass, key, qe, edns, udp_size, do)


def _check_options(data: bytes, pos: int, end: int) -> None:
    """EDNS options are (code, length, value) and must fill the rdata exactly."""
    while pos < end:
        if pos + 4 > end:
            raise Malformed(FORMERR, "truncated EDNS option")
        pos += 4 + _U16.unpack_from(data, pos + 2)[0]
    if pos != end:
        raise Malformed(FORMERR, "EDNS option runs past the OPT record")


def _skip_name(data: bytes, pos: int, known: dict[int, int] | None = None) -> tuple[int, int]:
    """Validate the (possibly compressed) name at ``pos``.

    Returns the offset just after the name as written and the length of the
    name once decompressed.  Every pointer must point strictly before the start
    of the label sequence it ends, and past the header, so following pointers
    always ends (no loops, no forward pointers).

    ``known`` (responses) maps the offset of every label of the names validated
    so far to the length of the name from there, and this name's labels are
    added to it.  A pointer must then land on one of them: a pointer into other
    bytes (a TTL, say) would decode differently once the cache rewrites those
    bytes, so such a message is refused rather than stored.
    """
    n = len(data)
    end = -1
    total = 0
    limit = pos
    labels: list[tuple[int, int]] = []  # (offset, length of the name before it) of literal labels
    while True:
        if pos >= n:
            raise Malformed(FORMERR, "name runs past the end")
        length = data[pos]
        if length == 0:
            total += 1
            if known is not None:
                for at, before in labels:
                    known[at] = total - before
            return (pos + 1 if end < 0 else end), total
        if length <= MAX_LABEL:
            if end < 0:
                labels.append((pos, total))
            total += length + 1
            if total >= MAX_NAME:
                raise Malformed(FORMERR, "name longer than 255 octets")
            pos += length + 1
        elif length >= 0xC0:
            if pos + 1 >= n:
                raise Malformed(FORMERR, "truncated compression pointer")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if end < 0:
                end = pos + 2
            if target >= limit or target < 12:
                raise Malformed(FORMERR, "compression pointer not pointing back into the message")
            if known is not None:
                rest = known.get(target)
                if rest is None:
                    raise Malformed(FORMERR, "compression pointer to something that is not a name")
                total += rest
                if total > MAX_NAME:
                    raise Malformed(FORMERR, "name longer than 255 octets")
                for at, before in labels:
                    known[at] = total - before
                return end, total
            limit = pos = target
        else:
            raise Malformed(FORMERR, "unknown label type")


def _check_rdata(data: bytes, rtype: int, start: int, end: int, known: dict[int, int] | None = None) -> None:
    """Check rdata whose size is fixed or which holds names (the rest is opaque)."""
    if rtype == A:
        if end - start != 4:
            raise Malformed(FORMERR, "A record rdata is not 4 octets")
    elif rtype == AAAA:
        if end - start != 16:
            raise Malformed(FORMERR, "AAAA record rdata is not 16 octets")
    elif rtype in (CNAME, NS, PTR, DNAME):
        if _skip_name(data, start, known)[0] != end:
            raise Malformed(FORMERR, "rdlength does not match the name in the rdata")
    elif rtype == MX:
        if end - start < 3 or _skip_name(data, start + 2, known)[0] != end:
            raise Malformed(FORMERR, "rdlength does not match the MX rdata")
    elif rtype == SRV:
        if end - start < 7 or _skip_name(data, start + 6, known)[0] != end:
            raise Malformed(FORMERR, "rdlength does not match the SRV rdata")
    elif rtype == SOA:
        if end - start < 22:
            raise Malformed(FORMERR, "SOA rdata too short")
        p = _skip_name(data, start, known)[0]
        if p >= end or _skip_name(data, p, known)[0] + 20 != end:
            raise Malformed(FORMERR, "rdlength does not match the SOA rdata")


def refusal(query: Query) -> int | None:
    """The RCODE a forwarder answers itself instead of forwarding, or None to forward.

    Like Unbound (checked against Unbound 1.17 here: dnsmasq forwards these):
    zone transfers (AXFR, IXFR) are REFUSED; QTYPEs that only make sense
    inside a message or are obsolete (OPT, TKEY, TSIG, MAILA, MAILB, the meta
    range 128-248) get FORMERR.  ANY is not refused: answer it with
    :func:`minimal_any_reply`.
    """
    qtype = query.qtype
    if (qtype < 128 and qtype != OPT) or qtype > 255:
        return None
    if qtype in (AXFR, IXFR):
        return REFUSED
    if qtype == ANY:
        return None
    return FORMERR


def _opt(udp_size: int, do: bool, ext_rcode: int = 0) -> bytes:
    return b"\x00\x00\x29" + _OPT_BODY.pack(udp_size, ext_rcode, 0, _OPT_DO_BIT if do else 0, 0)


_OPT_REPLY = _opt(ADVERTISED_UDP_SIZE, False)
_OPT_REPLY_DO = _opt(ADVERTISED_UDP_SIZE, True)


def build_upstream_query(
    query: Query, new_id: int, udp_size: int = ADVERTISED_UDP_SIZE, *, qname: bytes | None = None
) -> bytes:
    """The query to send upstream: the client's question under ``new_id``.

    ``qname`` replaces the question name's case (see :func:`randomize_case`);
    it must be the same name.  RD, CD and AD are copied; our own OPT always
    goes with it (the upstream may answer bigger than 512 octets; the client
    gets TC when its own size is smaller), with the client's DO bit.
    """
    return b"".join((
        _HDR.pack(new_id, query.flags & (RD | CD | AD), 1, 0, 0, 1),
        query.qname if qname is None else qname,
        query.data[query.question_end - 4 : query.question_end],
        _opt(udp_size, query.do),
    ))  # fmt: skip


def randomize_case(qname: bytes, rng: Any) -> bytes:
    """DNS 0x20 (draft-vixie-dnsext-dns0x20): each letter of the name in random case.

    ``rng`` is a ``random.Random`` (or anything with ``getrandbits``).  Length
    octets are at most 63, below every letter, so they are never touched.
    """
    # As integers: the bits where lower and upper case differ are the 0x20
    # bits of the letters; flip a random subset of them in the upper-case name.
    n = len(qname)
    upper = int.from_bytes(qname.upper())
    letters = upper ^ int.from_bytes(qname.lower())
    return (upper ^ (rng.getrandbits(8 * n) & letters)).to_bytes(n)


# --- names -----------------------------------------------------------------

_SPECIAL = frozenset(b'.\\"();@$ ')


def qname_text(qname: bytes) -> str:
    """The presentation form of an uncompressed wire name ("www.example.com.").

    Dots and other special characters inside labels are escaped with a
    backslash, bytes outside printable ASCII as ``\\DDD`` (RFC 1035 5.1).
    """
    labels = []
    pos = 0
    while pos < len(qname) and qname[pos]:
        length = qname[pos]
        label = qname[pos + 1 : pos + 1 + length]
        parts = []
        for b in label:
            if b in _SPECIAL:
                parts.append("\\" + chr(b))
            elif 0x21 <= b <= 0x7E:
                parts.append(chr(b))
            else:
                parts.append(f"\\{b:03d}")
        labels.append("".join(parts))
        pos += 1 + length
    return ".".join(labels) + "." if labels else "."


def encode_name(text: str) -> bytes:
    """The wire form of a name written as text; raise ValueError when it is not one.

    A trailing dot is optional; ``\\.`` and ``\\DDD`` escapes are understood;
    non-ASCII labels are encoded with IDNA.
    """
    if text in ("", "."):
        return b"\x00"
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise ValueError(f"cannot encode name {text!r}: {e}") from None
    labels: list[bytes] = []
    cur = bytearray()
    i = 0
    ended = False
    while i < len(text):
        ch = text[i]
        if ch == ".":
            if not cur:
                raise ValueError(f"empty label in name {text!r}")
            labels.append(bytes(cur))
            cur = bytearray()
            ended = True
            i += 1
            continue
        ended = False
        if ch == "\\":
            if text[i + 1 : i + 4].isdigit() and len(text[i + 1 : i + 4]) == 3:
                value = int(text[i + 1 : i + 4])
                if value > 255:
                    raise ValueError(f"bad escape in name {text!r}")
                cur.append(value)
                i += 4
                continue
            if i + 1 >= len(text):
                raise ValueError(f"name {text!r} ends with a backslash")
            ch = text[i + 1]
            i += 1
        cur.append(ord(ch))
        i += 1
    if cur:
        labels.append(bytes(cur))
    elif not ended:
        raise ValueError(f"bad name {text!r}")
    out = bytearray()
    for label in labels:
        if len(label) > MAX_LABEL:
            raise ValueError(f"label longer than 63 octets in name {text!r}")
        out.append(len(label))
        out += label
    out.append(0)
    if len(out) > MAX_NAME:
        raise ValueError(f"name {text!r} is longer than 255 octets")
    return bytes(out)


# --- responses -------------------------------------------------------------


def parse_response(
    data: bytes,
    query: Query,
    sent_id: int,
    sent_qname: bytes,
    *,
    min_ttl: int = 0,
    max_ttl: int = 86400,
    neg_max_ttl: int = 3600,
) -> Response:
    """Check an upstream's reply to the query sent as ``sent_id``/``sent_qname``.

    Raise :class:`Mismatch` when it does not answer that query (so the caller
    keeps waiting for the real one), :class:`Malformed` when it is badly formed.
    """
    n = len(data)
    if n < 12:
        raise Malformed(None, "response shorter than a DNS header")
    rid, flags, qdcount, ancount, nscount, arcount = _HDR.unpack_from(data)
    if rid != sent_id:
        raise Mismatch(f"response ID {rid} is not {sent_id}")
    if not flags & QR:
        raise Mismatch("QR=0: a query, not a response")
    if (flags ^ query.flags) & OPCODE_MASK:
        raise Mismatch("response opcode differs from the query's")
    if qdcount != 1:
        raise Mismatch(f"{qdcount} questions in the response")
    qend = 12 + len(sent_qname)
    qe = qend + 4
    if data[12:qend] != sent_qname:
        if qe > n:
            raise Malformed(None, "truncated question in the response")
        raise Mismatch("response question differs from the one sent")
    if qe > n:
        raise Malformed(None, "truncated question in the response")
    if data[qend:qe] != query.key[-4:]:
        raise Mismatch("response QTYPE or QCLASS differs from the query's")
    rcode = flags & RCODE_MASK
    if flags & TC:
        # Counts may not match what is there; the caller retries over TCP.
        wire = _HDR.pack(0, flags, 1, 0, 0, 0) + data[12:qe]
        reply = Answer(wire, (), 0, rcode, False)
        return Response(rcode, True, None, reply)

    qtype = query.qtype
    offsets: list[int] = []
    ttls: list[int] = []
    answer_min = -1
    has_data = qtype == ANY
    soa_neg = -1
    cut = -1
    kept_ar = 0
    ext_rcode = 0
    saw_opt = False
    zeroed = False
    first_ar = ancount + nscount
    # Names validated so far, by offset: every suffix of the question to start
    # with, since owner names mostly point into it.
    known = {}
    left = len(sent_qname)
    at = 12
    while left > 1:
        known[at] = left
        step = data[at] + 1
        at += step
        left -= step
    known[at] = 1
    pos = qe
    for idx in range(first_ar + arcount):
        start = pos
        if pos + 1 < n and data[pos] >= 0xC0 and (((data[pos] & 0x3F) << 8) | data[pos + 1]) in known:
            # A pointer straight to a name already checked: the usual owner.
            nlen = known[((data[pos] & 0x3F) << 8) | data[pos + 1]]
            pos += 2
        else:
            pos, nlen = _skip_name(data, pos, known)
        if pos + 10 > n:
            raise Malformed(None, "truncated record")
        rtype, _rclass, ttl, rdlen = _RR.unpack_from(data, pos)
        rstart = pos + 10
        rend = rstart + rdlen
        if rend > n:
            raise Malformed(None, "record data runs past the end")
        if rtype == OPT or rtype == TSIG:
            if idx < first_ar:
                raise Malformed(None, "OPT or TSIG record outside the additional section")
            if rtype == OPT:
                if saw_opt:
                    raise Malformed(None, "more than one OPT record")
                if nlen != 1:
                    raise Malformed(None, "OPT record not owned by the root")
                saw_opt = True
                ext_rcode = ttl >> 24
                if rdlen:
                    _check_options(data, rstart, rend)
            if cut < 0:
                cut = start
        else:
            if rtype == A:
                if rdlen != 4:
                    raise Malformed(None, "A record rdata is not 4 octets")
            else:
                _check_rdata(data, rtype, rstart, rend, known)
            if ttl & 0x80000000:
                ttl = 0
                zeroed = True
            if cut < 0:
                offsets.append(pos + 4)
                ttls.append(ttl)
                if idx >= first_ar:
                    kept_ar += 1
            if idx < ancount:
                if answer_min < 0 or ttl < answer_min:
                    answer_min = ttl
                if rtype == qtype:
                    has_data = True
            elif idx < first_ar and rtype == SOA and soa_neg < 0:
                soa_neg = min(ttl, _SOA_TAIL.unpack_from(data, rend - 20)[4])
        pos = rend
    if ext_rcode:
        rcode |= ext_rcode << 4
    if cut < 0:
        cut = pos  # anything after the last record is not kept

    # Lifetime: positive from the answer records, negative per RFC 2308 3/5.
    ttl = 0
    negative = False
    cacheable = False
    if rcode == NOERROR and has_data:
        ttl = min(max(answer_min, min_ttl), max_ttl)
        cacheable = ttl > 0
        if min_ttl <= min(ttls) and max(ttls) <= max_ttl:
            new_ttls = ttls
        else:
            new_ttls = [min(max(t, min_ttl), max_ttl) for t in ttls]
    elif rcode == NXDOMAIN or rcode == NOERROR:
        negative = True
        if soa_neg >= 0:
            ttl = min(soa_neg, neg_max_ttl)
            if answer_min >= 0:
                ttl = min(ttl, answer_min)  # a CNAME chain ending in nothing
            cacheable = ttl > 0
        new_ttls = [min(t, ttl) for t in ttls]
    else:
        new_ttls = ttls

    buf = bytearray(data[:cut])
    _HDR.pack_into(buf, 0, 0, flags, 1, ancount, nscount, kept_ar)
    if new_ttls is not ttls or zeroed:
        for off, t in zip(offsets, new_ttls):
            _U32.pack_into(buf, off, t)
    stored = Answer(bytes(buf), tuple(offsets), ttl, rcode, negative)
    return Response(rcode, False, stored if cacheable else None, stored)


# --- replies ---------------------------------------------------------------

# Flags a replayed answer keeps: QR, opcode, AA, AD, rcode (and TC only if the
# stored reply itself is a truncated one).  RD and CD come from the query.  RA is
# always set: a forwarder offers recursion whatever its upstream said (as
# dnsmasq does), so dig does not warn that recursion is unavailable.
_KEEP = QR | OPCODE_MASK | AA | TC | AD | RCODE_MASK
_RD_CD = RD | CD
_NOT_AD = 0xFFFF & ~AD


def reply_from_answer(answer: Answer, query: Query, age: int, tcp: bool) -> bytes:
    """The cache-hit reply: ``answer`` replayed for ``query``, ``age`` seconds after it was stored.

    The query's ID, RD and CD bits and question case are copied in, every TTL
    is lowered by ``age`` (not below 0), an OPT goes with it when the query had
    one; over UDP a reply bigger than the client's size becomes a TC=1 reply
    with just the question.  AD is cleared unless the client asked with DO or
    AD (RFC 6840 5.8).
    """
    qflags = query.flags
    flags = (answer.flags & _KEEP) | RA | (qflags & _RD_CD)
    if not (query.do or qflags & AD):
        flags &= _NOT_AD
    rest = answer.aged_rest if age == answer.aged_by else answer.age(age)
    if query.edns:
        opt = _OPT_REPLY_DO if query.do else _OPT_REPLY
        if not tcp and len(answer.wire) + 11 > query.udp_size:
            return _HDR.pack(query.id, flags | TC, 1, 0, 0, 1) + query.data[12 : query.question_end] + opt
        return b"".join((_ID_FLAGS.pack(query.id, flags), answer.counts_edns, query.qname, rest, opt))
    if not tcp and len(answer.wire) > MIN_UDP_SIZE:
        return _HDR.pack(query.id, flags | TC, 1, 0, 0, 0) + query.data[12 : query.question_end]
    return b"".join((_ID_FLAGS.pack(query.id, flags), answer.counts, query.qname, rest))


STALE_TTL = 30
"""The TTL of records served stale (RFC 8767 4: 30 seconds is recommended)."""


def stale_reply(answer: Answer, query: Query, tcp: bool, ttl: int = STALE_TTL) -> bytes:
    """Like :func:`reply_from_answer` for an expired answer served stale (RFC 8767).

    Every TTL is set to ``ttl`` rather than aged (which would give 0).  Not
    the hit path: nothing is memoised.
    """
    qflags = query.flags
    flags = (answer.flags & _KEEP) | RA | (qflags & _RD_CD)
    if not (query.do or qflags & AD):
        flags &= _NOT_AD
    opt = (_OPT_REPLY_DO if query.do else _OPT_REPLY) if query.edns else b""
    limit = query.udp_size if query.edns else MIN_UDP_SIZE
    if not tcp and len(answer.wire) + len(opt) > limit:
        return _HDR.pack(query.id, flags | TC, 1, 0, 0, 1 if opt else 0) + query.data[12 : query.question_end] + opt
    counts = answer.counts_edns if opt else answer.counts
    return b"".join((_ID_FLAGS.pack(query.id, flags), counts, query.qname, answer.rest_with_ttl(ttl), opt))


def error_reply(query: Query, rcode: int) -> bytes:
    """A reply with ``rcode`` and the question echoed (and an OPT when the query had one)."""
    flags = QR | RA | (query.flags & (OPCODE_MASK | RD | CD)) | (rcode & RCODE_MASK)
    head = _HDR.pack(query.id, flags, 1, 0, 0, 1 if query.edns else 0) + query.data[12 : query.question_end]
    if query.edns:
        return head + _opt(ADVERTISED_UDP_SIZE, query.do, rcode >> 4)
    return head


def error_reply_raw(data: bytes, rcode: int) -> bytes | None:
    """A header-only reply with ``rcode`` to a message :func:`parse_query` refused.

    None when it must not be answered (shorter than a header, or QR=1).  An
    extended RCODE (BADVERS) is carried by an OPT record (RFC 6891 6.1.3).
    """
    if len(data) < 12:
        return None
    qid, flags = _ID_FLAGS.unpack_from(data)
    if flags & QR:
        return None
    flags = QR | RA | (flags & (OPCODE_MASK | RD | CD)) | (rcode & RCODE_MASK)
    if rcode > RCODE_MASK:
        return _HDR.pack(qid, flags, 0, 0, 0, 1) + _opt(ADVERTISED_UDP_SIZE, False, rcode >> 4)
    return _HDR.pack(qid, flags, 0, 0, 0, 0)


_RFC8482_RDATA = b"\x07RFC8482\x00"


def minimal_any_reply(query: Query, ttl: int = 3600) -> bytes:
    """The RFC 8482 4.2 answer to an ANY query: one HINFO record ("RFC8482", "")."""
    flags = QR | RA | (query.flags & (RD | CD))
    head = _HDR.pack(query.id, flags, 1, 1, 0, 1 if query.edns else 0)
    record = b"\xc0\x0c" + _RR.pack(HINFO, query.qclass, ttl, len(_RFC8482_RDATA)) + _RFC8482_RDATA
    out = head + query.data[12 : query.question_end] + record
    if query.edns:
        out += _OPT_REPLY_DO if query.do else _OPT_REPLY
    return out


# --- TCP framing (RFC 1035 4.2.2, RFC 7766) --------------------------------


def frame(msg: bytes) -> bytes:
    """``msg`` with its two-octet length prefix, for TCP."""
    if len(msg) > 0xFFFF:
        raise ValueError("DNS message longer than 65535 octets")
    return _U16.pack(len(msg)) + msg


def unframe(buf: bytes) -> tuple[list[bytes], bytes]:
    """Split TCP stream bytes into whole messages and the incomplete remainder."""
    msgs: list[bytes] = []
    pos = 0
    n = len(buf)
    while pos + 2 <= n:
        end = pos + 2 + _U16.unpack_from(buf, pos)[0]
        if end > n:
            break
        msgs.append(bytes(buf[pos + 2 : end]))
        pos = end
    return msgs, bytes(buf[pos:])
