"""DNS messages for the tests, built and read with ``twisted.names.dns`` (an
independent implementation, so the module's own wire code is not checked
against itself)."""

from __future__ import annotations

import struct

from twisted.names import dns


def query(name: str | bytes, qtype: int = dns.A, qid: int = 0x1234, *, edns: int | None = None,
          rd: bool = True) -> bytes:
    """A query; ``edns``: the client's UDP size in an OPT record."""
    m = dns.Message(id=qid, recDes=int(rd))
    m.queries = [dns.Query(name, qtype)]
    data = m.toStr()
    if edns is not None:
        # one OPT record: root owner, type 41, class = UDP size, ttl 0, rdlength 0
        data = data[:10] + struct.pack(">H", 1) + data[12:] + b"\x00" + struct.pack(">HHIH", 41, edns, 0, 0)
    return data


def parse(data: bytes) -> dns.Message:
    """A reply (or query) as a Message."""
    m = dns.Message()
    m.fromStr(data)
    return m


def reply(to: bytes, *, answers=(), authority=(), rcode: int = 0, trunc: bool = False,
          qid: int | None = None, qname: bytes | None = None, qtype: int | None = None) -> bytes:
    """An upstream's reply to the query ``to`` (its ID and question, as sent,
    unless overridden).  ``answers``/``authority``: RRHeaders."""
    q = parse(to)
    m = dns.Message(id=q.id if qid is None else qid, answer=1, recDes=q.recDes, recAv=1, rCode=rcode,
                    trunc=int(trunc), maxSize=65535)
    question = q.queries[0]
    m.queries = [dns.Query(question.name.name if qname is None else qname,
                           question.type if qtype is None else qtype, question.cls)]
    m.answers = list(answers)
    m.authority = list(authority)
    return m.toStr()


def a(name: bytes, address: str, ttl: int = 300) -> dns.RRHeader:
    return dns.RRHeader(name, dns.A, dns.IN, ttl, dns.Record_A(address, ttl))


def soa(zone: bytes, ttl: int = 3600, minimum: int = 60) -> dns.RRHeader:
    return dns.RRHeader(zone, dns.SOA, dns.IN, ttl,
                        dns.Record_SOA(b"ns." + zone, b"admin." + zone, 1, 3600, 600, 86400, minimum, ttl))


def txt(name: bytes, text: bytes, ttl: int = 300) -> dns.RRHeader:
    return dns.RRHeader(name, dns.TXT, dns.IN, ttl, dns.Record_TXT(text, ttl=ttl))


def unframe(data: bytes) -> list[bytes]:
    """Length-framed TCP messages -> messages."""
    out, pos = [], 0
    while pos + 2 <= len(data):
        n = struct.unpack_from(">H", data, pos)[0]
        out.append(data[pos + 2:pos + 2 + n])
        pos += 2 + n
    return out


def frame(msg: bytes) -> bytes:
    return struct.pack(">H", len(msg)) + msg
