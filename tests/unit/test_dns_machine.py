"""The DNS machine end to end on in-memory transports and a Clock: the datagram
driver, the cache fast path, negative caching, coalescing, spoofed answers,
timeouts and failover, serve-stale, TCP fallback and TCP clients."""

from __future__ import annotations

import os

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.names import dns

from afpa.config import Settings
from afpa.machine.modules import Registry
from afpa.net.datagram import DatagramEndpoint, OutboundDatagram
from afpa.net.helpers import InlineHelpers
from afpa.net.intrinsics import INTRINSICS
from afpa.server import Server
from protocols.dns.module import MODULE
from protocols.dns.settings import SETTINGS, DnsSettings
from tests import dnsmsg as m

CLIENT = ("127.0.0.9", 40000)
UP1, UP2 = ("10.0.0.1", 53), ("10.0.0.2", 53)


class FakeUDP:
    """The listening port's transport: what was sent back to whom."""

    def __init__(self):
        self.sent: list[tuple[bytes, tuple]] = []

    def write(self, data, addr):
        self.sent.append((data, addr))


class FakeSock:
    def __init__(self, host, port, on_data, on_error):
        self.peer = (host, port)
        self.on_data = on_data
        self.on_error = on_error
        self.sent: list[bytes] = []
        self.closed = False

    def send(self, data):
        self.sent.append(data)
        return True

    def write(self, data):
        self.sent.append(data)

    def close(self):
        self.closed = True


class Upstreams:
    """The outbound verbs, recorded: every socket a try opened."""

    def __init__(self):
        self.udp: list[FakeSock] = []
        self.tcp: list[FakeSock] = []

    def open_datagram(self, host, port, on_data, on_error):
        s = FakeSock(host, port, on_data, on_error)
        self.udp.append(s)
        return s

    def open_stream(self, host, port, on_data, on_lost):
        s = FakeSock(host, port, on_data, on_lost)
        self.tcp.append(s)
        return s


class DnsBox:
    """A DNS server on a Clock with one datagram listener and fake upstreams."""

    def __init__(self, tmp_path, **dns):
        dns.setdefault("upstreams", (UP1, UP2))
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        reg = Registry(intrinsics=dict(INTRINSICS))
        reg.register(MODULE)
        settings = Settings(module="dns", module_settings=SETTINGS.build(dns))
        self.server = Server(settings, reactor=self.clock, registry=reg, helpers=InlineHelpers())
        self.g = self.server.g
        self.up = Upstreams()
        self.g.open_datagram = self.up.open_datagram
        self.g.open_stream = self.up.open_stream
        self.udp = FakeUDP()
        self.endpoint = DatagramEndpoint(self.server)
        self.endpoint.transport = self.udp

    def ask(self, data: bytes, client=CLIENT) -> list[bytes]:
        """Send a datagram; the replies sent since."""
        before = len(self.udp.sent)
        self.endpoint.datagramReceived(data, client)
        return self.replies(before)

    def replies(self, since=0):
        return [d for d, _ in self.udp.sent[since:]]

    def answer_last(self, build, sock=None):
        """Answer the last upstream query with ``build(query_bytes) -> bytes``."""
        sock = sock or self.up.udp[-1]
        sock.on_data(build(sock.sent[-1]))

    def tcp_client(self):
        proto = self.server.factory().buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        return proto, t


@pytest.fixture
def box(tmp_path):
    return DnsBox(tmp_path)


def ttls(data):
    return [rr.ttl for rr in m.parse(data).answers]


def a_answer(name=b"example.com", ttl=300, address="192.0.2.1"):
    def build(q):
        sent_name = m.parse(q).queries[0].name.name
        return m.reply(q, answers=[m.a(sent_name, address, ttl)])
    return build


def test_miss_then_hit_with_lower_ttl(box):
    assert box.ask(m.query("example.com", qid=1)) == []  # parked: asked upstream
    [sock] = box.up.udp
    assert sock.peer == UP1
    box.answer_last(a_answer(ttl=300))
    [first] = box.replies()
    r = m.parse(first)
    assert r.id == 1 and r.answer and r.rCode == 0 and ttls(first) == [300]
    assert sock.closed
    box.clock.advance(100)
    [second] = box.ask(m.query("example.com", qid=2))
    assert m.parse(second).id == 2 and ttls(second) == [200]
    assert len(box.up.udp) == 1  # a hit: nobody asked
    # The runtime's counters saw both: per state, per transition and per request
    machine = box.server.machine
    assert machine.entries[machine.states["derive_cached_response"].index] == 2
    assert box.server.request_stats["dns"].by_class[1] == 2
    assert box.g.by_rcode[0] == 2 and sum(box.g.by_rcode) == 2
    assert box.server.runtime.cache.hits == 1


def test_upstream_query_is_randomised_and_answer_keeps_client_case(box):
    box.ask(m.query("WwW.Example.COM", qid=7))
    sent = m.parse(box.up.udp[-1].sent[-1])
    assert sent.id != 7 or True  # random; checked below over many tries
    assert sent.queries[0].name.name.lower() == b"www.example.com"
    box.answer_last(a_answer())
    [reply] = box.replies()
    assert m.parse(reply).queries[0].name.name == b"WwW.Example.COM"
    ids, names = set(), set()
    for i in range(40):
        box.ask(m.query(f"host{i}.example.com"))
        q = m.parse(box.up.udp[-1].sent[-1])
        ids.add(q.id)
        names.add(q.queries[0].name.name)
    assert len(ids) > 30  # fresh random IDs
    assert any(n != n.lower() for n in names) and any(n != n.upper() for n in names)  # 0x20


def test_negative_answer_cached_for_soa_minimum(box):
    box.ask(m.query("nope.example.com", qid=3))
    box.answer_last(lambda q: m.reply(q, rcode=dns.ENAME, authority=[m.soa(b"example.com", 3600, 60)]))
    [r1] = box.replies()
    assert m.parse(r1).rCode == dns.ENAME
    box.clock.advance(30)
    [r2] = box.ask(m.query("nope.example.com", qid=4))
    assert m.parse(r2).rCode == dns.ENAME and m.parse(r2).id == 4
    assert [rr.ttl for rr in m.parse(r2).authority] == [30]
    assert len(box.up.udp) == 1
    box.clock.advance(31)  # past the SOA minimum: asked again
    box.ask(m.query("nope.example.com", qid=5))
    assert len(box.up.udp) == 2


def test_identical_queries_in_flight_are_coalesced(box):
    for qid in (11, 12, 13):
        assert box.ask(m.query("Busy.example.com", qid=qid), client=("127.0.0.9", 40000 + qid)) == []
    assert len(box.up.udp) == 1
    assert box.endpoint.inflight == 3
    box.answer_last(a_answer(b"busy.example.com"))
    replies = {m.parse(d).id: d for d in box.replies()}
    assert sorted(replies) == [11, 12, 13]
    assert all(ttls(d) == [300] for d in replies.values())
    assert {addr for _, addr in box.udp.sent} == {("127.0.0.9", 40011), ("127.0.0.9", 40012), ("127.0.0.9", 40013)}
    assert box.endpoint.inflight == 0 and box.g.flights == {}


def test_spoofed_answers_are_ignored(box):
    box.ask(m.query("bank.example.com", qid=21))
    sock = box.up.udp[-1]
    sent = sock.sent[-1]
    real = m.parse(sent)
    sock.on_data(m.reply(sent, qid=(real.id + 1) % 65536, answers=[m.a(b"bank.example.com", "6.6.6.6")]))
    sock.on_data(m.reply(sent, qname=b"bank.example.com" if real.queries[0].name.name != b"bank.example.com"
                         else b"BANK.example.com", answers=[m.a(b"bank.example.com", "6.6.6.6")]))
    sock.on_data(m.reply(sent, qtype=dns.AAAA))
    sock.on_data(b"\x00\x01")
    assert box.replies() == [] and box.g.ignored == 4
    box.answer_last(a_answer(b"bank.example.com", address="192.0.2.8"))
    [r] = box.replies()
    assert m.parse(r).answers[0].payload.dottedQuad() == "192.0.2.8"


def test_outbound_socket_ignores_other_sources():
    got = []
    p = OutboundDatagram("10.0.0.1", 53, got.append)
    p.datagramReceived(b"spoof", ("10.0.0.1", 5353))
    p.datagramReceived(b"spoof", ("10.6.6.6", 53))
    p.datagramReceived(b"real", ("10.0.0.1", 53))
    assert got == [b"real"]


def test_timeouts_fail_over_then_servfail(tmp_path):
    box = DnsBox(tmp_path, timeout=2.0, tries=1)
    box.ask(m.query("slow.example.com", qid=31))
    assert [s.peer for s in box.up.udp] == [UP1]
    box.clock.advance(2.0)
    assert [s.peer for s in box.up.udp] == [UP1, UP2] and box.up.udp[0].closed
    assert box.replies() == []
    box.clock.advance(2.0)
    [r] = box.replies()
    assert m.parse(r).rCode == dns.ESERVER and m.parse(r).id == 31
    assert box.g.flights == {} and box.endpoint.inflight == 0
    machine = box.server.machine
    edge = machine.edges.index(("derive_remote_response", "timeout", "next_upstream"))
    assert machine.transitions[edge] == 2


def test_servfail_from_upstream_tries_the_next_one(tmp_path):
    box = DnsBox(tmp_path, tries=1)
    box.ask(m.query("x.example.com", qid=41))
    box.answer_last(lambda q: m.reply(q, rcode=dns.ESERVER))
    assert box.replies() == [] and box.up.udp[-1].peer == UP2
    box.answer_last(a_answer(b"x.example.com"))
    [r] = box.replies()
    assert m.parse(r).rCode == 0


def test_serve_stale_when_upstreams_fail(tmp_path):
    box = DnsBox(tmp_path, serve_stale=True, timeout=1.0, tries=1)
    box.ask(m.query("old.example.com", qid=51))
    box.answer_last(a_answer(b"old.example.com", ttl=10))
    box.clock.advance(20)  # expired
    box.ask(m.query("old.example.com", qid=52))
    assert len(box.up.udp) == 2  # stale entries are refreshed first
    box.clock.advance(1.0)
    box.clock.advance(1.0)
    r = box.replies()[-1]
    assert m.parse(r).id == 52 and m.parse(r).rCode == 0 and ttls(r) == [30]


def test_no_stale_without_serve_stale(tmp_path):
    box = DnsBox(tmp_path, timeout=1.0, tries=1)
    box.ask(m.query("old.example.com", qid=51))
    box.answer_last(a_answer(b"old.example.com", ttl=10))
    box.clock.advance(20)
    box.ask(m.query("old.example.com", qid=52))
    box.clock.advance(1.0)
    box.clock.advance(1.0)
    assert m.parse(box.replies()[-1]).rCode == dns.ESERVER


def test_truncated_udp_answer_falls_back_to_tcp(box):
    box.ask(m.query("big.example.com", dns.TXT, qid=61, edns=4096))
    box.answer_last(lambda q: m.reply(q, trunc=True))
    [tcp] = box.up.tcp
    assert tcp.peer == UP1
    sent = m.unframe(tcp.sent[-1])[0]
    big = [m.txt(m.parse(sent).queries[0].name.name, b"x" * 200) for _ in range(10)]
    framed = m.frame(m.reply(sent, answers=big))
    tcp.on_data(framed[:7])  # in pieces, as TCP may deliver it
    assert box.replies() == []
    tcp.on_data(framed[7:])
    [r] = box.replies()
    assert len(m.parse(r).answers) == 10 and not m.parse(r).trunc
    # A client with a small UDP size gets TC=1 from the cache; over TCP the whole answer
    [small] = box.ask(m.query("big.example.com", dns.TXT, qid=62))
    assert m.parse(small).trunc and m.parse(small).answers == []
    proto, t = box.tcp_client()
    proto.dataReceived(m.frame(m.query("big.example.com", dns.TXT, qid=63)))
    [whole] = m.unframe(t.value())
    assert m.parse(whole).id == 63 and len(m.parse(whole).answers) == 10


def test_tcp_clients_pipelined_and_split(box):
    box.ask(m.query("example.com", qid=1))
    box.answer_last(a_answer())
    proto, t = box.tcp_client()
    two = m.frame(m.query("example.com", qid=71)) + m.frame(m.query("example.com", qid=72))
    proto.dataReceived(two[:5])
    assert t.value() == b""
    proto.dataReceived(two[5:])
    assert [m.parse(r).id for r in m.unframe(t.value())] == [71, 72]
    assert not t.disconnecting


@pytest.mark.parametrize("bad", [
    b"", b"\x00", b"\x12\x34\x01\x00\x00\x01",  # truncated headers
    os.urandom(3) + b"\x80" + os.urandom(40),  # a response (QR=1)
    m.query("example.com")[:-3],  # truncated question
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",  # pointer loop
])
def test_malformed_datagrams_never_stop_it(box, bad):
    box.ask(bad)
    for r in box.replies():
        assert m.parse(r).rCode in (dns.EFORMAT, dns.ENOTIMP)
    box.ask(m.query("example.com", qid=81))
    assert len(box.up.udp) == 1  # the good query went on


def test_random_datagrams_fuzz(box):
    rnd = __import__("random").Random(8)
    for _ in range(300):
        box.ask(bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 80))))
    for r in box.replies():
        assert m.parse(r).answer  # only replies, never echoed queries
    before = len(box.up.udp)
    box.ask(m.query("still.example.com", qid=91))
    assert len(box.up.udp) == before + 1


def test_malformed_tcp_input_then_good_query(box):
    box.ask(m.query("example.com", qid=1))
    box.answer_last(a_answer())
    proto, t = box.tcp_client()
    proto.dataReceived(m.frame(b"\x00\x01garbage") + m.frame(b"") + m.frame(m.query("example.com", qid=95)))
    replies = m.unframe(t.value())
    assert m.parse(replies[-1]).id == 95 and ttls(replies[-1]) == [300]


def test_a_state_that_raises_is_answered_servfail_and_counted(box):
    class Broken:
        default = (UP1,)

        def upstreams_for(self, _name):
            raise RuntimeError("boom")

    box.g.forwarding = Broken()
    [r] = box.ask(m.query("example.com", qid=99))
    assert m.parse(r).rCode == dns.ESERVER and m.parse(r).id == 99
    machine = box.server.machine
    assert machine.errors[machine.states["derive_miss_response"].index] == 1
    box.g.forwarding = type("F", (), {"default": (UP1,), "upstreams_for": lambda self, n: (UP1,)})()
    box.ask(m.query("example.com", qid=100))
    assert len(box.up.udp) == 1


def test_local_records_and_refusals(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("192.168.1.5 nas.lan nas\n")
    box = DnsBox(tmp_path, local_records=("router.lan A 192.168.1.1",), hosts_files=(str(hosts),),
                 servers=("/lan/",))
    [r] = box.ask(m.query("Router.LAN", qid=5))
    assert m.parse(r).answers[0].payload.dottedQuad() == "192.168.1.1" and m.parse(r).auth
    [r] = box.ask(m.query("nas.lan", qid=6))
    assert m.parse(r).answers[0].payload.dottedQuad() == "192.168.1.5"
    [r] = box.ask(m.query("other.lan", qid=7))  # a local-only domain: never forwarded
    assert m.parse(r).rCode == dns.ENAME
    [r] = box.ask(m.query("example.com", dns.AXFR, qid=8))
    assert m.parse(r).rCode == dns.EREFUSED
    [r] = box.ask(m.query("example.com", dns.ALL_RECORDS, qid=9))
    assert m.parse(r).answers[0].type == dns.HINFO  # RFC 8482
    assert box.up.udp == []


def test_settings_check_and_flags():
    with pytest.raises(ValueError, match="nothing to answer with"):
        SETTINGS.build({})
    s = SETTINGS.build({"upstreams": ["9.9.9.9", "[::1]:5353", "127.0.0.1:53"]})
    assert s.upstreams == (("9.9.9.9", 53), ("::1", 5353), ("127.0.0.1", 53))
    with pytest.raises(ValueError, match="dns.upstreams"):
        SETTINGS.build({"upstreams": ["dns.example"]})
    with pytest.raises(ValueError, match="dns.servers"):
        SETTINGS.build({"upstreams": ["9.9.9.9"], "servers": ["corp/10.0.0.1"]})
    assert DnsSettings().serve_stale is False


def test_access_log_line(tmp_path):
    log = tmp_path / "access.log"
    box = DnsBox(tmp_path)
    box.server.access_log = None
    from afpa.ops.accesslog import AccessLog
    box.server.access_log = AccessLog(str(log), box.server.access_format.line)
    box.ask(m.query("example.com", qid=1))
    box.answer_last(a_answer())
    box.ask(m.query("example.com", qid=2))
    box.server.access_log.flush()
    lines = log.read_text().splitlines()
    assert [ln.split()[1:7] for ln in lines] == [
        ["127.0.0.9", "udp", "example.com.", "A", "NOERROR", "miss"],
        ["127.0.0.9", "udp", "example.com.", "A", "NOERROR", "hit"]]


def test_admin_purge_and_ban_by_name(box):
    for name in ("www.example.com", "a.www.example.com", "example.org"):
        box.ask(m.query(name, qid=1))
        box.answer_last(a_answer(name.encode()))
    cache = box.server.runtime.cache
    assert len(cache) == 3
    from afpa.ops.admin import cache_write
    assert cache_write(box.server, "purge", {"host": "WWW.example.com"})["purged"] == 1
    assert len(cache) == 2
    assert cache_write(box.server, "ban", {"host": "example.com"})["purged"] == 1  # a.www.example.com
    assert len(cache) == 1
    box.ask(m.query("example.org", qid=2))
    assert len(box.up.udp) == 3  # still a hit
    with pytest.raises(Exception, match="no tags"):
        cache_write(box.server, "tag", {"tags": ["x"]})


def test_traced_queries_record_their_state_path(box):
    box.server.set_trace_all(True)
    box.server.datagram_endpoints.append(box.endpoint)
    box.server.set_trace_all(False)
    box.server.set_trace_all(True)
    events = []
    box.server.traced = lambda conn, req, now: events.append((req.trace.compact(), req.cache_status))
    box.ask(m.query("example.com", qid=1))
    box.answer_last(a_answer())
    box.ask(m.query("example.com", qid=2))
    paths = [p for p, _ in events]
    assert [s for _, s in events] == ["miss", "hit"]
    assert "derive_remote_response" in paths[0] and "store_answer" in paths[0]
    assert paths[1].startswith("derive_request") and "derive_cached_response" in paths[1]


def test_waiters_get_the_answer_when_the_asking_tcp_client_left(box):
    proto, t = box.tcp_client()
    proto.dataReceived(m.frame(m.query("gone.example.com", qid=1)))
    assert box.ask(m.query("gone.example.com", qid=2)) == []  # waits for the TCP client's query
    proto.connectionLost(None)
    box.answer_last(a_answer(b"gone.example.com"))
    [r] = box.replies()
    assert m.parse(r).id == 2 and ttls(r) == [300]
    assert len(box.server.runtime.cache) == 1 and box.g.flights == {}


def test_waiters_ask_themselves_when_the_asking_tcp_client_left_and_its_try_failed(tmp_path):
    box = DnsBox(tmp_path, tries=1, timeout=1.0)
    proto, t = box.tcp_client()
    proto.dataReceived(m.frame(m.query("gone.example.com", qid=1)))
    box.ask(m.query("gone.example.com", qid=2))
    proto.connectionLost(None)
    box.clock.advance(1.0)  # the left client's try times out
    assert len(box.up.udp) == 2 and box.replies() == []  # the waiter asked again itself
    box.answer_last(a_answer(b"gone.example.com"))
    [r] = box.replies()
    assert m.parse(r).id == 2


def test_tries_share_one_timer_and_each_expires_at_its_own_deadline():
    from protocols.dns.scopes import Deadlines

    clock = Clock()
    expired = []

    class Item:
        def __init__(self, name):
            self.name = name

        def expired(self):
            expired.append((self.name, clock.seconds()))

    d = Deadlines(clock, clock.seconds)
    a, b, c = Item("a"), Item("b"), Item("c")
    d.add(a, 2.0)
    clock.advance(0.5)
    d.add(b, 2.5)
    clock.advance(0.5)
    d.add(c, 3.0)
    assert len(clock.getDelayedCalls()) == 1
    d.discard(a)  # answered: never expires
    clock.advance(1.0)
    assert expired == []
    clock.advance(0.5)
    assert expired == [("b", 2.5)]
    clock.advance(0.5)
    assert expired == [("b", 2.5), ("c", 3.0)] and clock.getDelayedCalls() == []


def test_drivers_of_answered_misses_are_reused(box):
    for i in range(5):
        box.ask(m.query(f"r{i}.example.com", qid=i))
        box.answer_last(a_answer(f"r{i}.example.com".encode()))
    assert len(box.replies()) == 5 and box.endpoint.inflight == 0
    drivers = {id(d) for d in box.endpoint.idle} | {id(box.endpoint.spare)}
    assert len(drivers) <= 2  # one spare, one reused after each answer
    box.ask(m.query("r1.example.com", qid=99))  # a hit on a reused driver
    assert m.parse(box.replies()[-1]).id == 99
