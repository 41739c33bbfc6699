"""DNS wire format: queries, upstream answers, cache-hit replies, checked against twisted.names.dns."""

from __future__ import annotations

import random
import struct

import pytest
from twisted.names import dns

from protocols.dns import wire
from protocols.dns.wire import Malformed, Mismatch


def make_query(name=b"www.example.com", qtype=dns.A, *, id=4660, edns=True, do=False, size=4096, rd=True,
               cd=False, options=()):  # fmt: skip
    if edns:
        m = dns._EDNSMessage(id=id, recDes=rd, checkingDisabled=cd, queries=[dns.Query(name, qtype)],
                             maxSize=size, dnssecOK=do)  # fmt: skip
        data = m.toStr()
        if options:  # (code, value) pairs into the OPT's rdata, which twisted writes last
            rdata = b"".join(struct.pack(">HH", code, len(value)) + value for code, value in options)
            data = data[:-2] + struct.pack(">H", len(rdata)) + rdata
        return data
    else:
        m = dns.Message(id=id, recDes=rd, checkingDisabled=cd)
        m.queries = [dns.Query(name, qtype)]
    return m.toStr()


def make_response(query_bytes, answers=(), authority=(), additional=(), *, rcode=0, edns=True, trunc=False,
                  aa=False):  # fmt: skip
    q = dns._EDNSMessage()
    q.fromStr(query_bytes)
    # A plain Message with the OPT added by hand: _EDNSMessage.toStr cuts every
    # message at 512 octets (it does not pass its maxSize on).
    m = dns.Message(id=q.id, answer=True, recDes=q.recDes, recAv=True, rCode=rcode, trunc=trunc, auth=aa,
                    maxSize=65535)  # fmt: skip
    m.queries = q.queries
    m.answers = list(answers)
    m.authority = list(authority)
    m.additional = list(additional) + ([dns._OPTHeader(udpPayloadSize=4096)] if edns else [])
    return m.toStr()


def rr(name, payload, ttl=300):
    return dns.RRHeader(name, payload.TYPE, dns.IN, ttl, payload)


def decode(data):
    m = dns._EDNSMessage()
    m.fromStr(data)
    return m


def soa(minimum=60, ttl=600):
    return rr(b"example.com", dns.Record_SOA(b"ns.example.com", b"admin.example.com", 1, 2, 3, 4, minimum), ttl)


CHAIN = [
    rr(b"www.example.com", dns.Record_CNAME(b"example.com"), 600),
    rr(b"example.com", dns.Record_A("93.184.216.34"), 120),
    rr(b"example.com", dns.Record_A("93.184.216.35"), 300),
]


def header(data):
    return struct.unpack(">HHHHHH", data[:12])


# --- queries ---------------------------------------------------------------


def test_parse_edns_query():
    data = make_query(b"WwW.Example.COM", dns.AAAA, do=True, size=1400)
    q = wire.parse_query(data)
    assert q.id == 4660 and q.rd and q.qtype == wire.AAAA and q.qclass == wire.CLASS_IN
    assert q.qname == b"\x03WwW\x07Example\x03COM\x00"
    assert q.key == b"\x03www\x07example\x03com\x00\x00\x1c\x00\x01"
    assert q.edns and q.do and q.udp_size == 1400
    assert q.question_end == 12 + len(q.qname) + 4
    assert wire.qname_text(q.qname) == "WwW.Example.COM."


def test_parse_plain_query_and_udp_size_clamps():
    q = wire.parse_query(make_query(edns=False, rd=False))
    assert not q.edns and q.udp_size == 512 and not q.rd and not q.do
    assert wire.parse_query(make_query(size=100)).udp_size == 512
    assert wire.parse_query(make_query(size=65000)).udp_size == wire.MAX_UDP_SIZE


def test_remembered_parse_gives_each_query_its_own_id_and_refuses_what_parse_refuses():
    memo: dict = {}
    first = make_query(b"WwW.Example.COM", dns.AAAA, do=True, size=1400)
    again = struct.pack(">H", 99) + first[2:]  # the same question under another ID
    for data in (first, again, again):
        assert wire.parse_query_memo(data, memo) == wire.parse_query(data)
    assert wire.parse_query_memo(again, memo).id == 99 and len(memo) == 1
    bad = first[:-3]
    for _ in range(2):  # malformed every time: never remembered
        with pytest.raises(Malformed):
            wire.parse_query_memo(bad, memo)
    assert len(memo) == 1
    for i in range(wire.QUERY_MEMO + 5):  # bounded: starts over when full
        wire.parse_query_memo(make_query(f"n{i}.example".encode()), memo)
    assert len(memo) <= wire.QUERY_MEMO


def test_query_with_edns_option_and_authority_record_takes_the_walk():
    cookie = (10, b"\x01" * 8)
    q = wire.parse_query(make_query(options=[cookie], do=True))
    assert q.edns and q.do and q.udp_size == 4096
    # An IXFR-style query with an SOA in authority, OPT after it.
    m = dns._EDNSMessage(id=7, queries=[dns.Query(b"example.com", dns.A)], maxSize=1232)
    m.authority = [soa()]
    q = wire.parse_query(m.toStr())
    assert q.edns and q.udp_size == 1232 and q.key == b"\x07example\x03com\x00\x00\x01\x00\x01"


@pytest.mark.parametrize("data", [b"", b"\x00" * 11, b"\x12\x34\x81\x00" + b"\x00" * 8])
def test_short_or_response_is_dropped(data):
    with pytest.raises(Malformed) as e:
        wire.parse_query(data)
    assert e.value.rcode is None
    assert wire.error_reply_raw(data, wire.FORMERR) is None


def test_response_with_a_question_is_never_answered():
    data = make_response(make_query(), CHAIN)
    with pytest.raises(Malformed) as e:
        wire.parse_query(data)
    assert e.value.rcode is None


def test_other_opcode_is_notimp():
    m = dns.Message(id=99, opCode=dns.OP_STATUS, recDes=1)
    m.queries = [dns.Query(b"example.com")]
    data = m.toStr()
    with pytest.raises(Malformed) as e:
        wire.parse_query(data)
    assert e.value.rcode == wire.NOTIMP
    reply = decode(wire.error_reply_raw(data, e.value.rcode))
    assert reply.id == 99 and reply.answer and reply.rCode == wire.NOTIMP and reply.opCode == dns.OP_STATUS


def _edit(data, offset, new):
    return data[:offset] + new + data[offset + len(new) :]


Q = make_query(edns=False)
QE = make_query()
QNAME_END = 12 + len(b"\x03www\x07example\x03com\x00")
OPT_AT = QNAME_END + 4
A_RECORD = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x01\x02\x03\x04"


@pytest.mark.parametrize(
    "data, why",
    [
        (_edit(Q, 4, b"\x00\x00"), "no question"),
        (_edit(Q, 4, b"\x00\x02") + Q[12:], "two questions"),
        (Q[:12] + b"\xc0\x0c\x00\x01\x00\x01", "pointer in the question"),
        (Q[:12] + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", "label of 64"),
        (Q[:12] + b"\x3fa" + b"a" * 60 + b"\x00\x00\x01\x00\x01", "label longer than the message"),
        (Q[:12] + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01", "name of 257 octets"),
        (Q + b"\x00", "trailing byte"),
        (_edit(Q, 6, b"\x00\x01") + A_RECORD, "answer record in a query"),
        (_edit(QE, 10, b"\x00\x02") + QE[OPT_AT:], "two OPT records"),
        (_edit(_edit(QE, 10, b"\x00\x00"), 8, b"\x00\x01"), "OPT in authority"),
        (_edit(QE, OPT_AT, b"\x01a\x00") + b"", "OPT owner not the root"),
        (QE[:-2] + b"\x00\x04\x00\x0a\x00\x08", "option longer than the OPT"),
        (QE[:-2] + b"\x00\x03\x00\x0a\x00", "truncated option"),
        (QE[:-1], "truncated OPT"),
    ],
)
def test_formerr(data, why):
    with pytest.raises(Malformed) as e:
        wire.parse_query(data)
    assert e.value.rcode == wire.FORMERR, why
    assert e.value.reason and "\n" not in e.value.reason
    reply = decode(wire.error_reply_raw(data, e.value.rcode))
    assert reply.rCode == wire.FORMERR and reply.answer and reply.id == 4660 and not reply.queries


def test_edns_version_1_is_badvers():
    data = bytearray(QE)
    data[OPT_AT + 6] = 1  # the version octet of the OPT TTL
    with pytest.raises(Malformed) as e:
        wire.parse_query(bytes(data))
    assert e.value.rcode == wire.BADVERS
    reply = wire.error_reply_raw(bytes(data), wire.BADVERS)
    assert header(reply)[1] & 0xF == 0 and header(reply)[5] == 1
    assert reply[-11:-8] == b"\x00\x00\x29" and reply[-6] == 1  # extended rcode 1 << 4 = 16


def _prefix_cases():
    cookie = (10, b"\x01" * 8)
    m = dns._EDNSMessage(id=7, queries=[dns.Query(b"example.com", dns.A)], maxSize=1232)
    m.authority = [soa()]
    return [Q, QE, make_query(options=[cookie]), m.toStr()]


@pytest.mark.parametrize("data", _prefix_cases())
def test_every_prefix_of_a_query_is_malformed(data):
    wire.parse_query(data)
    for i in range(len(data)):
        with pytest.raises(Malformed):
            wire.parse_query(data[:i])


def test_build_upstream_query():
    q = wire.parse_query(make_query(b"Example.com", dns.MX, do=True, cd=True, size=512))
    sent = wire.randomize_case(q.qname, random.Random(5))
    out = wire.build_upstream_query(q, 777, qname=sent)
    m = decode(out)
    assert m.id == 777 and m.recDes and m.checkingDisabled and m.dnssecOK and m.maxSize == 1232
    assert not m.answer and m.opCode == dns.OP_QUERY
    assert m.queries == [dns.Query(b"example.com", dns.MX)]
    again = wire.parse_query(out)
    assert again.qname == sent and again.key == q.key
    plain = wire.parse_query(make_query(edns=False, rd=False))
    m = decode(wire.build_upstream_query(plain, 1, 1400))
    assert not m.recDes and not m.dnssecOK and m.maxSize == 1400 and m.id == 1


def test_randomize_case():
    name = wire.encode_name("www-1.Example.com")
    rng = random.Random(1)
    seen = {wire.randomize_case(name, rng) for _ in range(50)}
    assert len(seen) > 10
    for s in seen:
        assert s.lower() == name.lower() and len(s) == len(name)
    digits = wire.encode_name("123.456")
    assert wire.randomize_case(digits, rng) == digits


@pytest.mark.parametrize(
    "text, wire_name",
    [
        ("www.example.com.", b"\x03www\x07example\x03com\x00"),
        ("www.example.com", b"\x03www\x07example\x03com\x00"),
        (".", b"\x00"),
        ("a\\.b.c", b"\x03a.b\x01c\x00"),
        ("a\\032b", b"\x03a b\x00"),
        ("bücher.example", b"\x0dxn--bcher-kva\x07example\x00"),
    ],
)
def test_names(text, wire_name):
    assert wire.encode_name(text) == wire_name
    assert wire.encode_name(wire.qname_text(wire_name)) == wire_name


@pytest.mark.parametrize("bad", ["a..b", "a" * 64 + ".com", ".".join(["abcdefgh"] * 29), "a\\"])
def test_bad_names(bad):
    with pytest.raises(ValueError):
        wire.encode_name(bad)


# --- responses -------------------------------------------------------------


def exchange(query_bytes, answers=(), authority=(), additional=(), sent_id=4660, **kw):
    q = wire.parse_query(query_bytes)
    data = make_response(wire.build_upstream_query(q, sent_id), answers, authority, additional, **{
        k: v for k, v in kw.items() if k in ("rcode", "trunc", "edns", "aa")})  # fmt: skip
    limits = {k: v for k, v in kw.items() if k in ("min_ttl", "max_ttl", "neg_max_ttl")}
    return q, data, wire.parse_response(data, q, sent_id, q.qname, **limits)


def test_positive_answer_ttl_is_the_chain_minimum_and_offsets_point_at_ttls():
    q, data, r = exchange(QE, CHAIN)
    assert r.rcode == wire.NOERROR and not r.truncated and r.answer is r.reply
    a = r.answer
    assert a.ttl == 120 and not a.negative and a.rcode == 0
    assert [struct.unpack_from(">I", a.wire, off)[0] for off in a.ttl_offsets] == [600, 120, 300]
    assert header(a.wire) == (0, header(data)[1], 1, 3, 0, 0)  # OPT gone, ID 0
    assert b"\x00\x00\x29" not in a.wire[-11:]


def test_ttl_clamps():
    _, _, r = exchange(QE, CHAIN, max_ttl=100)
    assert r.answer.ttl == 100
    assert all(struct.unpack_from(">I", r.answer.wire, o)[0] <= 100 for o in r.answer.ttl_offsets)
    _, _, r = exchange(QE, [rr(b"www.example.com", dns.Record_A("1.2.3.4"), 5)], min_ttl=60)
    assert r.answer.ttl == 60
    _, _, r = exchange(QE, [rr(b"www.example.com", dns.Record_A("1.2.3.4"), 0)])
    assert r.answer is None and r.reply.ttl == 0
    _, _, r = exchange(QE, [rr(b"www.example.com", dns.Record_A("1.2.3.4"), 2**31 + 5)])
    assert r.answer is None  # a TTL with the top bit set counts as 0 (RFC 2181 8)
    assert struct.unpack_from(">I", r.reply.wire, r.reply.ttl_offsets[0])[0] == 0


def test_additional_before_opt_kept_after_dropped():
    glue = rr(b"ns.example.com", dns.Record_A("10.0.0.1"))
    q = wire.parse_query(QE)
    data = make_response(wire.build_upstream_query(q, 1), CHAIN, [], [glue])  # OPT after the glue
    r = wire.parse_response(data, q, 1, q.qname)
    assert header(r.answer.wire)[5] == 1 and len(r.answer.ttl_offsets) == 4
    # The same with the OPT written first: the glue after it is dropped.
    opt = data[-11:]
    body = data[: -11 - len(glue_bytes := _rr_bytes(data, 3))]
    moved = _edit(body, 10, b"\x00\x02") + opt + glue_bytes
    r2 = wire.parse_response(moved, q, 1, q.qname)
    assert header(r2.answer.wire)[5] == 0 and len(r2.answer.ttl_offsets) == 3
    assert r2.answer.wire == b"\x00\x00" + body[2:10] + b"\x00\x00" + body[12:]


def _rr_bytes(data, index):
    """The bytes of the index-th record after the question (all owners compressed or plain)."""
    pos = 12
    while data[pos]:
        pos += data[pos] + 1
    pos += 5
    for i in range(index + 1):
        start = pos
        while data[pos] and data[pos] < 0xC0:
            pos += data[pos] + 1
        pos += 2 if data[pos] >= 0xC0 else 1
        pos += 10 + struct.unpack_from(">H", data, pos + 8)[0]
    return data[start:pos]


def test_negative_answers_per_rfc2308():
    _, _, r = exchange(QE, [], [soa(minimum=60, ttl=600)], rcode=dns.ENAME)
    assert r.rcode == wire.NXDOMAIN and r.answer.negative and r.answer.ttl == 60
    _, _, r = exchange(QE, [], [soa(minimum=7200, ttl=900)])
    assert r.rcode == wire.NOERROR and r.answer.negative and r.answer.ttl == 900  # NODATA
    _, _, r = exchange(QE, [], [soa(minimum=86400, ttl=86400)], rcode=dns.ENAME, neg_max_ttl=1800)
    assert r.answer.ttl == 1800
    assert struct.unpack_from(">I", r.answer.wire, r.answer.ttl_offsets[0])[0] == 1800
    _, _, r = exchange(QE, [], [], rcode=dns.ENAME)
    assert r.answer is None and r.reply.rcode == wire.NXDOMAIN  # no SOA: not cached
    _, _, r = exchange(QE, CHAIN[:1], [soa(minimum=900, ttl=900)])
    assert r.answer.negative and r.answer.ttl == 600  # CNAME to nothing


@pytest.mark.parametrize("rcode", [dns.ESERVER, dns.EREFUSED, dns.ENOTIMP, dns.EFORMAT])
def test_errors_are_not_cached_but_relayed(rcode):
    _, _, r = exchange(QE, [], [soa()], rcode=rcode)
    assert r.answer is None and r.rcode == rcode and r.reply.rcode == rcode


def test_truncated_upstream_answer():
    q, data, r = exchange(QE, CHAIN, trunc=True)
    assert r.truncated and r.answer is None
    out = decode(wire.reply_from_answer(r.reply, q, 0, False))
    assert out.trunc and not out.answers and out.queries == [dns.Query(b"www.example.com")]


def test_mismatches():
    q = wire.parse_query(QE)
    sent = wire.randomize_case(q.qname, random.Random(3))
    assert sent != q.qname
    good = make_response(wire.build_upstream_query(q, 42, qname=sent), CHAIN)
    wire.parse_response(good, q, 42, sent)
    with pytest.raises(Mismatch):
        wire.parse_response(good, q, 43, sent)  # ID
    with pytest.raises(Mismatch):
        wire.parse_response(good, q, 42, q.qname)  # the question's case differs from what was sent
    with pytest.raises(Mismatch):
        wire.parse_response(_edit(good, 2, bytes([good[2] & 0x7F])), q, 42, sent)  # QR=0
    with pytest.raises(Mismatch):
        wire.parse_response(_edit(good, 2, bytes([good[2] | 0x10])), q, 42, sent)  # opcode 2
    qe = 12 + len(sent)
    with pytest.raises(Mismatch):
        wire.parse_response(_edit(good, qe, b"\x00\x1c"), q, 42, sent)  # AAAA, not A
    with pytest.raises(Mismatch):
        wire.parse_response(_edit(good, 4, b"\x00\x00"), q, 42, sent)  # no question
    other = make_response(make_query(b"www.example.org", id=42), CHAIN)
    with pytest.raises(Mismatch):
        wire.parse_response(other, q, 42, sent)


def _answer_with(record: bytes):
    q = wire.parse_query(QE)
    head = struct.pack(">HHHHHH", 1, 0x8180, 1, 1, 0, 0) + q.qname + b"\x00\x01\x00\x01"
    return q, head + record


@pytest.mark.parametrize(
    "record, why",
    [
        (b"\xc0\x21" + b"\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x01\x02\x03\x04", "pointer to itself"),
        (b"\xc0\x30" + b"\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x01\x02\x03\x04", "forward pointer"),
        (b"\xc0\x02" + b"\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x01\x02\x03\x04", "pointer into the header"),
        (b"\x01a\xc0\x21" + b"\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x01\x02\x03\x04", "loop through a label"),
        (b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x01\x02\x03\x04", "label of 64"),
        (b"\x80\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x01\x02\x03\x04", "reserved label type"),
        ((b"\x3f" + b"a" * 63) * 3 + b"\x3ea" + b"a" * 61 + A_RECORD, "name over 255 octets through a pointer"),
        (b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x05\x01\x02\x03\x04\x05", "A with 5 octets"),
        (b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x08\x01\x02\x03\x04", "rdata past the end"),
        (b"\xc0\x0c\x00\x05\x00\x01\x00\x00\x00\x3c\x00\x02\x01a\x00", "CNAME rdlength short"),
        (b"\xc0\x0c\x00\x05\x00\x01\x00\x00\x00\x3c\x00\x05\x01a\x00\x00\x00", "CNAME rdlength long"),
        (b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00", "OPT in the answer section"),
    ],
)
def test_malformed_responses(record, why):
    q, data = _answer_with(record)
    with pytest.raises(Malformed) as e:
        wire.parse_response(data, q, 1, q.qname)
    assert not isinstance(e.value, Mismatch), why


def test_every_prefix_of_a_response_is_malformed():
    q = wire.parse_query(QE)
    upstream = wire.build_upstream_query(q, 1)
    for data in (
        make_response(upstream, CHAIN, [soa()], [rr(b"ns.example.com", dns.Record_A("10.0.0.9"))]),
        make_response(upstream, [], [soa()], rcode=dns.ENAME),
    ):
        wire.parse_response(data, q, 1, q.qname)
        for i in range(len(data)):
            with pytest.raises(Malformed):
                wire.parse_response(data[:i], q, 1, q.qname)


# --- replies ---------------------------------------------------------------


def test_cache_hit_reply_copies_id_rd_case_and_ages_ttls():
    _, _, r = exchange(QE, CHAIN)
    client = wire.parse_query(make_query(b"wWw.eXample.CoM", id=999, do=True))
    out = wire.reply_from_answer(r.answer, client, 30, False)
    m = decode(out)
    assert m.id == 999 and m.answer and m.recDes and m.recAv and m.rCode == 0 and not m.trunc
    assert out[12 : 12 + len(client.qname)] == client.qname
    assert [a.ttl for a in m.answers] == [570, 90, 270]
    assert m.answers[0].payload.name == dns.Name(b"eXample.CoM")  # compressed against the question
    assert [a.payload.dottedQuad() for a in m.answers[1:]] == ["93.184.216.34", "93.184.216.35"]
    assert m.maxSize == 1232 and m.dnssecOK
    # Older than a record's TTL: that TTL is 0, not negative; the age memo follows the age.
    m = decode(wire.reply_from_answer(r.answer, client, 200, False))
    assert [a.ttl for a in m.answers] == [400, 0, 100]
    m = decode(wire.reply_from_answer(r.answer, client, 0, True))
    assert [a.ttl for a in m.answers] == [600, 120, 300]


def test_stale_reply_sets_every_ttl_to_30():
    _, _, r = exchange(QE, CHAIN)
    client = wire.parse_query(make_query(b"WWW.example.com", id=12))
    out = wire.stale_reply(r.answer, client, False)
    m = decode(out)
    assert m.id == 12 and [a.ttl for a in m.answers] == [30, 30, 30]
    assert out[12 : 12 + len(client.qname)] == client.qname
    # The memoised hit rendering is untouched.
    assert [a.ttl for a in decode(wire.reply_from_answer(r.answer, client, 10, False)).answers] == [590, 110, 290]


def test_cache_hit_reply_without_edns_and_with_rd_clear():
    _, _, r = exchange(QE, CHAIN)
    client = wire.parse_query(make_query(edns=False, rd=False, id=5))
    out = wire.reply_from_answer(r.answer, client, 1, False)
    assert header(out)[5] == 0 and not header(out)[1] & wire.RD
    m = dns.Message()
    m.fromStr(out)
    assert m.id == 5 and len(m.answers) == 3 and not m.additional


def test_big_answer_truncated_over_udp_whole_over_tcp():
    many = [rr(b"www.example.com", dns.Record_A(f"10.0.{i // 250}.{i % 250}")) for i in range(60)]
    _, _, r = exchange(QE, many)
    assert len(r.answer.wire) > 512
    small = wire.parse_query(make_query(edns=False))
    out = decode(wire.reply_from_answer(r.answer, small, 0, False))
    assert out.trunc and not out.answers and out.queries == [dns.Query(b"www.example.com")]
    assert len(decode(wire.reply_from_answer(r.answer, small, 0, True)).answers) == 60
    big = wire.parse_query(make_query(size=4096))
    out = decode(wire.reply_from_answer(r.answer, big, 0, False))
    assert not out.trunc and len(out.answers) == 60
    edns_small = wire.parse_query(make_query(size=512))
    out = decode(wire.reply_from_answer(r.answer, edns_small, 0, False))
    assert out.trunc and not out.answers and out.maxSize == 1232


def test_error_reply_echoes_question():
    q = wire.parse_query(make_query(b"Odd.Example", id=31, do=True))
    m = decode(wire.error_reply(q, wire.SERVFAIL))
    assert m.id == 31 and m.rCode == wire.SERVFAIL and m.answer and m.dnssecOK
    assert m.queries == [dns.Query(b"odd.example")]
    assert wire.error_reply(q, wire.SERVFAIL)[12 : 12 + len(q.qname)] == q.qname
    plain = wire.parse_query(make_query(edns=False))
    assert header(wire.error_reply(plain, wire.REFUSED))[5] == 0


def test_minimal_any_reply():
    q = wire.parse_query(make_query(qtype=dns.ALL_RECORDS, id=8))
    m = decode(wire.minimal_any_reply(q))
    assert m.id == 8 and m.rCode == 0 and len(m.answers) == 1
    a = m.answers[0]
    assert a.type == dns.HINFO and a.ttl == 3600 and a.payload.cpu == b"RFC8482" and a.payload.os == b""
    assert a.name == dns.Name(b"www.example.com")


@pytest.mark.parametrize(
    "qtype, rcode",
    [(dns.A, None), (dns.ALL_RECORDS, None), (dns.AXFR, wire.REFUSED), (dns.IXFR, wire.REFUSED),
     (dns.MAILA, wire.FORMERR), (dns.OPT, wire.FORMERR), (dns.TSIG, wire.FORMERR), (200, wire.FORMERR),
     (dns.SSHFP, None), (65280, None)],
)  # fmt: skip
def test_refusal(qtype, rcode):
    assert wire.refusal(wire.parse_query(make_query(qtype=qtype))) == rcode


def test_tcp_framing():
    a, b = make_query(id=1), make_query(id=2)
    stream = wire.frame(a) + wire.frame(b)
    assert wire.unframe(stream) == ([a, b], b"")
    for cut in range(len(stream)):
        msgs, rest = wire.unframe(stream[:cut])
        assert b"".join(wire.frame(m) for m in msgs) + rest == stream[:cut]
    with pytest.raises(ValueError):
        wire.frame(b"x" * 65536)


def test_replies_from_the_cache_offer_recursion_whatever_the_upstream_said():
    # An upstream that answers without RA (an authoritative server) must not make
    # the forwarder's own replies say recursion is unavailable (dig warns then).
    q, data, _ = exchange(QE, CHAIN)
    flags = struct.unpack_from(">H", data, 2)[0] & ~wire.RA
    stored = wire.parse_response(data[:2] + struct.pack(">H", flags) + data[4:], q, 4660, q.qname).answer
    for reply in (wire.reply_from_answer(stored, q, 0, tcp=False), wire.stale_reply(stored, q, tcp=False)):
        assert header(reply)[1] & wire.RA


def test_compression_pointer_into_a_ttl_is_refused():
    # A pointer that lands on a TTL rather than a name would decode differently
    # once the cache lowers that TTL: the stored reply would be corrupt.
    q = wire.parse_query(make_query(b"www.example.com", edns=False))
    question = q.data[12:]
    ans1 = b"\xc0\x0c" + struct.pack(">HHIH", dns.A, 1, 300, 4) + b"\x5d\xb8\xd8\x22"
    ttl_at = 12 + len(question) + 2 + 4  # where the first answer's TTL starts
    ans2 = struct.pack(">H", 0xC000 | ttl_at) + struct.pack(">HHIH", dns.TXT, 1, 300, 2) + b"\x01x"
    head = struct.pack(">HHHHHH", 4660, 0x8180, 1, 2, 0, 0)
    with pytest.raises(Malformed, match="not a name"):
        wire.parse_response(head + question + ans1 + ans2, q, 4660, q.qname)
    # The same pointer to the question's name is fine.
    ok = struct.pack(">H", 0xC00C) + ans2[2:]
    assert wire.parse_response(head + question + ans1 + ok, q, 4660, q.qname).answer is not None


def test_query_memo_keeps_only_short_queries():
    memo = {}
    short = make_query(b"www.example.com", edns=False)
    wire.parse_query_memo(short, memo)
    assert len(memo) == 1
    # The same question with 600 octets of EDNS padding (option 12): parsed, not kept.
    padding = struct.pack(">HH", 12, 600) + bytes(600)
    opt = b"\x00" + struct.pack(">HHIH", wire.OPT, 1232, 0, len(padding)) + padding
    long = short[:10] + struct.pack(">H", 1) + short[12:] + opt
    assert len(long) > wire.MEMO_MAX_QUERY
    assert wire.parse_query_memo(long, memo).edns
    assert len(memo) == 1
