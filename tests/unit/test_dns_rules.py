"""Local records, hosts files and per-domain forwarding rules of the DNS forwarder."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.names import dns

from protocols.dns import rules, wire

LINES = [
    "printer.lan A 192.168.1.5",
    "printer.lan 600 AAAA fd00::5",
    "mail.lan MX 10 mx.lan",
    'txt.lan TXT "hello world" second',
    "alias.lan CNAME printer.lan",
    "outside.lan CNAME www.example.com",
    "_ipp._tcp.lan IN SRV 0 5 631 printer.lan",
    "# a comment line",
    "",
]

HOSTS = """\
# /etc/hosts
127.0.0.1   localhost
192.168.1.7 nas.lan nas   # trailing comment
192.168.1.8 nas.lan
::1         localhost ip6-localhost
fd00::7     nas.lan
"""


@pytest.fixture
def local():
    records = rules.LocalRecords(LINES, where="dns.records")
    records.add_hosts(HOSTS, where="/etc/hosts")
    return records


def ask(records, name, qtype, *, id=77, edns=True, tcp=False, size=4096):
    if edns:
        data = dns._EDNSMessage(id=id, recDes=1, queries=[dns.Query(name, qtype)], maxSize=size).toStr()
    else:
        m = dns.Message(id=id, recDes=1)
        m.queries = [dns.Query(name, qtype)]
        data = m.toStr()
    q = wire.parse_query(data)
    out = records.answer(q, tcp)
    if out is None:
        return q, None, None
    m = dns._EDNSMessage()
    m.fromStr(out)
    return q, out, m


def test_a_record_authoritative_with_question_case_echoed(local):
    q, out, m = ask(local, b"PRINTER.Lan", dns.A)
    assert m.id == 77 and m.auth and m.answer and m.recDes and m.rCode == 0
    assert out[12 : 12 + len(q.qname)] == q.qname
    assert [(a.type, a.ttl, a.payload.dottedQuad()) for a in m.answers] == [(dns.A, 300, "192.168.1.5")]
    assert m.maxSize == 1232  # our OPT, since the query had one


def test_explicit_ttl_and_aaaa(local):
    _, _, m = ask(local, b"printer.lan", dns.AAAA)
    assert [(a.ttl, a.payload._address) for a in m.answers] == [(600, "fd00::5")]


def test_nodata_for_a_held_name_without_that_type(local):
    _, _, m = ask(local, b"printer.lan", dns.MX)
    assert m.rCode == 0 and m.auth and not m.answers


def test_unknown_name_is_not_answered(local):
    assert ask(local, b"other.lan", dns.A)[1] is None
    assert ask(local, b"sub.printer.lan", dns.A)[1] is None


def test_mx_txt_srv(local):
    _, _, m = ask(local, b"mail.lan", dns.MX)
    assert (m.answers[0].payload.preference, m.answers[0].payload.name) == (10, dns.Name(b"mx.lan"))
    _, _, m = ask(local, b"txt.lan", dns.TXT)
    assert m.answers[0].payload.data == [b"hello world", b"second"]
    _, _, m = ask(local, b"_ipp._tcp.lan", dns.SRV)
    p = m.answers[0].payload
    assert (p.priority, p.weight, p.port, p.target) == (0, 5, 631, dns.Name(b"printer.lan"))


def test_cname_followed_inside_local_data(local):
    _, _, m = ask(local, b"alias.lan", dns.A)
    assert [a.type for a in m.answers] == [dns.CNAME, dns.A]
    assert m.answers[1].name == dns.Name(b"printer.lan")
    _, _, m = ask(local, b"alias.lan", dns.CNAME)
    assert [a.type for a in m.answers] == [dns.CNAME]
    _, _, m = ask(local, b"outside.lan", dns.A)
    assert [a.type for a in m.answers] == [dns.CNAME]


def test_hosts_file_forward_and_reverse(local):
    _, _, m = ask(local, b"nas.lan", dns.A)
    assert sorted(a.payload.dottedQuad() for a in m.answers) == ["192.168.1.7", "192.168.1.8"]
    _, _, m = ask(local, b"nas", dns.A)
    assert [a.payload.dottedQuad() for a in m.answers] == ["192.168.1.7"]
    _, _, m = ask(local, b"7.1.168.192.in-addr.arpa", dns.PTR)
    assert [a.payload.name for a in m.answers] == [dns.Name(b"nas.lan")]
    _, _, m = ask(local, b"1.0.0.127.IN-ADDR.arpa", dns.PTR)
    assert [a.payload.name for a in m.answers] == [dns.Name(b"localhost")]
    v6 = ".".join("7" + "0" * 27 + "00df") + ".ip6.arpa"
    assert v6 == ipaddress.ip_address("fd00::7").reverse_pointer
    _, _, m = ask(local, v6.encode(), dns.PTR)
    assert [a.payload.name for a in m.answers] == [dns.Name(b"nas.lan")]
    _, _, m = ask(local, b"localhost", dns.AAAA)
    assert len(m.answers) == 1


def test_big_local_answer_truncates_over_udp():
    records = rules.LocalRecords([f"many.lan A 10.0.0.{i}" for i in range(1, 60)])
    _, _, m = ask(records, b"many.lan", dns.A, edns=False)
    assert m.trunc and not m.answers
    _, _, m = ask(records, b"many.lan", dns.A, edns=False, tcp=True)
    assert len(m.answers) == 59


@pytest.mark.parametrize(
    "line, problem",
    [
        ("printer.lan A 300.1.1.1", "bad address"),
        ("printer.lan A", "expected"),
        ("printer.lan WKS 1.2.3.4", "unsupported record type"),
        ("printer.lan MX ten mx.lan", "not a number"),
        ("a..lan A 1.2.3.4", "empty label"),
        ("printer.lan AAAA 1.2.3.4", "bad address"),
        ('txt.lan TXT "unclosed', "quotation"),
        ("alias.lan A 1.2.3.4", "CNAME"),
    ],
)
def test_bad_record_lines(line, problem):
    with pytest.raises(ValueError) as e:
        rules.LocalRecords(["alias.lan CNAME x.lan", "ok.lan A 1.2.3.4", line], where="afpa.toml: dns.records")
    msg = str(e.value)
    assert msg.startswith("afpa.toml: dns.records: line 3: ") and problem in msg and "\n" not in msg


@pytest.mark.parametrize(
    "text, problem", [("999.1.1.1 a.lan\n", "not an IP address"), ("\n10.0.0.1\n", "at least one name")]
)
def test_bad_hosts_lines(text, problem):
    records = rules.LocalRecords()
    with pytest.raises(ValueError) as e:
        records.add_hosts(text, where="/etc/hosts")
    assert str(e.value).startswith("/etc/hosts: line ") and problem in str(e.value)


def test_load_hosts_file(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("10.1.2.3 box.lan\n")
    records = rules.LocalRecords()
    records.load_hosts(str(path))
    assert b"\x03box\x03lan\x00" in records
    with pytest.raises(ValueError) as e:
        records.load_hosts(str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in str(e.value)


# --- forwarding ------------------------------------------------------------

DEFAULT = [("1.1.1.1", 53), ("9.9.9.9", 53)]


def key(name):
    return wire.encode_name(name) + b"\x00\x01\x00\x01"


def test_longest_suffix_on_label_boundaries():
    f = rules.Forwarding(
        DEFAULT,
        [rules.parse_rule("/corp.example/10.0.0.53#5353"), rules.parse_rule("/a.corp.example/10.0.0.54"),
         rules.parse_rule("/corp.example/10.0.0.55"), rules.parse_rule("/lan/")],
    )  # fmt: skip
    assert f.upstreams_for(key("x.corp.example")) == (("10.0.0.53", 5353), ("10.0.0.55", 53))
    assert f.upstreams_for(key("corp.example")) == (("10.0.0.53", 5353), ("10.0.0.55", 53))
    assert f.upstreams_for(key("b.A.Corp.example")) == (("10.0.0.54", 53),)
    assert f.upstreams_for(wire.encode_name("b.a.corp.EXAMPLE")) == (("10.0.0.54", 53),)
    assert f.upstreams_for(key("xcorp.example")) == tuple(DEFAULT)
    assert f.upstreams_for(key("example")) == tuple(DEFAULT)
    assert f.upstreams_for(key("printer.lan")) == ()  # local only: never forwarded
    assert f.upstreams_for(key(".")) == tuple(DEFAULT)


def test_no_rules_is_the_default():
    assert rules.Forwarding(DEFAULT, []).upstreams_for(key("anything.example")) == tuple(DEFAULT)


def test_parse_rules():
    assert rules.parse_rule("/corp.example/10.0.0.53") == ("corp.example", [("10.0.0.53", 53)])
    assert rules.parse_rule("/v6.example/fd00::53#5300") == ("v6.example", [("fd00::53", 5300)])
    assert rules.parse_rule("/lan/") == ("lan", [])
    assert rules.parse_rules("/a.example/b.example/10.0.0.1") == [
        ("a.example", [("10.0.0.1", 53)]),
        ("b.example", [("10.0.0.1", 53)]),
    ]


@pytest.mark.parametrize(
    "spec", ["corp.example/10.0.0.53", "/corp.example/dns.example", "/corp.example/10.0.0.53#0",
             "/corp.example/10.0.0.53#x", "//10.0.0.53", "/a..b/10.0.0.1", "/a/b/10.0.0.1", "/"],
)  # fmt: skip
def test_bad_rules(spec):
    with pytest.raises(ValueError) as e:
        rules.parse_rule(spec)
    assert spec in str(e.value) and "\n" not in str(e.value)
