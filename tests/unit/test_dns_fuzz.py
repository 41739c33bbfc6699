"""Property and fuzz tests: random and mutated bytes never make the DNS parsers raise anything but Malformed.

Hypothesis (already in the test extra) drives the properties and shrinks a
failure to a minimal message; a seeded loop of 20,000 mutations adds breadth
at little cost.  What is accepted must also be usable: replies built from an
accepted query or response parse again.
"""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.names import dns

from protocols.dns import wire
from protocols.dns.wire import Malformed


def _response(query: bytes, answers=(), authority=(), additional=(), rcode=0) -> bytes:
    q = dns.Message()
    q.fromStr(query)
    m = dns.Message(id=q.id, answer=True, recDes=True, recAv=True, rCode=rcode, maxSize=65535)
    m.queries = q.queries
    m.answers, m.authority = list(answers), list(authority)
    m.additional = list(additional) + [dns._OPTHeader(udpPayloadSize=1232, dnssecOK=True)]
    return m.toStr()


def _rr(name, payload, ttl=300):
    return dns.RRHeader(name, payload.TYPE, dns.IN, ttl, payload)


def _corpus():
    base = dns._EDNSMessage(id=4660, recDes=1, queries=[dns.Query(b"www.Example.com", dns.A)], maxSize=4096).toStr()
    plain = dns.Message(id=1, recDes=1)
    plain.queries = [dns.Query(b"example.org", dns.MX)]
    cookie = base[:-2] + struct.pack(">HHH", 12, 10, 8) + b"\x01" * 8
    with_ns = dns._EDNSMessage(id=7, queries=[dns.Query(b"example.com", dns.SOA)], maxSize=1232)
    soa = _rr(b"example.com", dns.Record_SOA(b"ns.example.com", b"admin.example.com", 1, 2, 3, 4, 60), 600)
    with_ns.authority = [soa]
    queries = [base, plain.toStr(), cookie, with_ns.toStr()]
    upstream = wire.build_upstream_query(wire.parse_query(base), 4660)
    responses = [
        _response(upstream, [
            _rr(b"www.example.com", dns.Record_CNAME(b"example.com"), 600),
            _rr(b"example.com", dns.Record_A("93.184.216.34"), 120),
            _rr(b"example.com", dns.Record_MX(10, b"mx.example.com")),
            _rr(b"example.com", dns.Record_SRV(1, 2, 3, b"t.example.com")),
            _rr(b"example.com", dns.Record_TXT(b"v=spf1 -all")),
        ], [_rr(b"example.com", dns.Record_NS(b"ns.example.com"))],
           [_rr(b"ns.example.com", dns.Record_AAAA("fd00::1"))]),
        _response(upstream, [], [soa], rcode=dns.ENAME),
        _response(upstream, [], [soa]),
    ]  # fmt: skip
    return queries, responses


QUERIES, RESPONSES = _corpus()
QUERY = wire.parse_query(QUERIES[0])
# The clients a stored answer is replayed to: the EDNS one that asked, and one without EDNS.
CLIENTS = [QUERY, wire.parse_query(QUERIES[0][:11] + b"\x00" + QUERIES[0][12 : QUERY.question_end])]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits: flip, set, insert, delete, truncate, duplicate a slice."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        i = rng.randrange(len(out) + 1)
        if kind == 0 and i < len(out):
            out[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and i < len(out):
            out[i] = rng.choice((0, 0xC0, 0x3F, 0x40, 0xFF, 0x29, rng.randrange(256)))
        elif kind == 2:
            out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == 3:
            del out[i : i + rng.randint(1, 8)]
        elif kind == 4:
            del out[i:]
        else:
            out[i:i] = out[rng.randrange(len(out) + 1) :][: rng.randint(1, 16)]
    return bytes(out)


def check_query(data: bytes) -> None:
    """parse_query accepts or raises Malformed; whatever it accepts can be answered and forwarded."""
    try:
        q = wire.parse_query(data)
    except Malformed as e:
        assert isinstance(e.reason, str) and "\n" not in e.reason
        reply = wire.error_reply_raw(data, e.rcode) if e.rcode is not None else None
        if reply is not None:
            assert reply[2] & 0x80 and reply[:2] == data[:2]
        return
    assert q.key[:-4] == q.qname.lower() and 512 <= q.udp_size <= wire.MAX_UDP_SIZE
    again = wire.parse_query(wire.build_upstream_query(q, 99))
    assert again.key == q.key and again.id == 99
    for reply in (wire.error_reply(q, wire.SERVFAIL), wire.minimal_any_reply(q)):
        assert reply[:2] == data[:2] and reply[12 : q.question_end] == data[12 : q.question_end]
    wire.refusal(q)
    wire.qname_text(q.qname)


def check_response(data: bytes, age: int = 3) -> None:
    """parse_response accepts or raises Malformed; what it keeps replays as a valid reply."""
    try:
        r = wire.parse_response(data, QUERY, 4660, QUERY.qname)
    except Malformed as e:
        assert isinstance(e.reason, str) and "\n" not in e.reason
        return
    for client in CLIENTS:
        for tcp in (False, True):
            out = wire.reply_from_answer(r.reply, client, age, tcp)
            if not tcp:
                assert len(out) <= client.udp_size
            back = wire.parse_response(out, client, client.id, client.qname)
            assert back.rcode & 0xF == r.rcode & 0xF


SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.binary(max_size=600))
def test_random_bytes_as_query(data):
    check_query(data)


@SETTINGS
@given(st.binary(max_size=600))
def test_random_bytes_as_response(data):
    check_response(data)


@SETTINGS
@given(st.sampled_from(QUERIES), st.randoms(use_true_random=False))
def test_mutated_queries(data, rng):
    check_query(mutate(data, rng))


@SETTINGS
@given(st.sampled_from(RESPONSES), st.randoms(use_true_random=False), st.integers(0, 1000))
def test_mutated_responses(data, rng, age):
    check_response(mutate(data, rng), age)


@SETTINGS
@given(st.sampled_from(RESPONSES), st.binary(min_size=1, max_size=40), st.integers(12, 400))
def test_spliced_responses(data, junk, at):
    """Arbitrary bytes written over part of a valid response (pointers, counts, lengths)."""
    check_response(data[:at] + junk + data[at + len(junk) :])


def test_seeded_mutation_loop():
    rng = random.Random(20261123)
    for i in range(20_000):
        if i % 2:
            check_query(mutate(rng.choice(QUERIES), rng))
        else:
            check_response(mutate(rng.choice(RESPONSES), rng))


def test_corpus_is_valid():
    for data in QUERIES:
        wire.parse_query(data)
    for data in RESPONSES:
        r = wire.parse_response(data, QUERY, 4660, QUERY.qname)
        assert r.answer is not None
