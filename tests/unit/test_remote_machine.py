"""The backend machine on in-memory transports: connects are recorded by a
MemoryReactorClock and completed (or refused) by hand."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from afpa.config import Settings
from afpa.net.helpers import InlineHelpers
from afpa.server import Server
from tests.httpclient import parse_responses
from protocols.http.settings import http_settings


class Rig:
    """A server whose backend connections the test completes or refuses."""

    def __init__(self, root, **overrides):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_800_000_000)
        self.server = Server(http_settings(**{"root": str(root), "backend": "http://127.0.0.1:9", **overrides}),
                             reactor=self.reactor, helpers=InlineHelpers())
        self.made = 0

    def client(self):
        proto = self.server.factory().buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        return proto, t

    def pending(self) -> int:
        return len(self.reactor.tcpClients) - self.made

    def accept(self):
        """Complete the next connect: returns (backend protocol, its transport)."""
        factory = self.reactor.tcpClients[self.made][2]
        self.made += 1
        proto = factory.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        self.reactor.advance(0)
        return proto, t

    def refuse(self):
        factory = self.reactor.tcpClients[self.made][2]
        self.made += 1
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.reactor.advance(0)

    def later(self, seconds: float):
        self.reactor.advance(seconds)
        self.server.sweep()


GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


def _first_attempt_dies(rig):
    client, ct = rig.client()
    client.dataReceived(GET)
    backend, bt = rig.accept()
    assert bt.value().startswith(b"GET /x HTTP/1.1")
    backend.connectionLost(Failure(ConnectionDone()))  # closed without an answer: retried
    assert rig.pending() == 1
    return client, ct


def test_retry_whose_connect_is_refused_answers_502(docroot):
    rig = Rig(docroot)
    _, ct = _first_attempt_dies(rig)
    rig.refuse()
    [(status, _, body)] = parse_responses(ct.value())
    assert status == 502 and body == b"502 Bad Gateway: cannot connect to the backend\n"
    pool = next(iter(rig.server.g.pools.pools.values()))
    assert pool.failures == {"refused": 1} and pool.count == 0


def test_first_byte_timeout_applies_while_the_retry_connects(docroot):
    rig = Rig(docroot, backend_first_byte_timeout=5.0, backend_connect_timeout=3600.0)
    _, ct = _first_attempt_dies(rig)
    rig.later(7)
    [(status, _, _)] = parse_responses(ct.value())
    assert status == 504


def test_reset_ends_close_delimited_body_as_truncated(docroot):
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(GET)
    backend, _ = rig.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n\r\npart")
    backend.connectionLost(Failure(ConnectionRefusedError("reset")))  # any loss but a clean close
    assert not ct.value().endswith(b"0\r\n\r\n") and ct.disconnecting
    assert len(rig.server.runtime.cache) == 0
    # A clean close does end such a body.
    client, ct = rig.client()
    client.dataReceived(GET)
    backend, _ = rig.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n\r\nwhole")
    backend.connectionLost(Failure(ConnectionDone()))
    [(status, _, body)] = parse_responses(ct.value())
    assert (status, body) == (200, b"whole") and len(rig.server.runtime.cache) == 1


def test_queue_hands_connections_over_in_order(docroot):
    # Same URL from every client: coalescing off, so each one needs a connection.
    rig = Rig(docroot, backend_max_connections=1, backend_max_queue=1, backend_queue_timeout=5.0,
              coalesce_max_waiters=0)
    c1, t1 = rig.client()
    c1.dataReceived(GET)
    backend, bt = rig.accept()
    c2, t2 = rig.client()
    c2.dataReceived(GET)
    c3, t3 = rig.client()
    c3.dataReceived(GET)
    assert rig.pending() == 0  # the bound holds
    [(status, _, body)] = parse_responses(t3.value())  # the queue (1) was full
    assert status == 503 and body == b"503 Service Unavailable: backend busy\n"
    bt.clear()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert parse_responses(t1.value())[0][2] == b"ok"
    assert bt.value().startswith(b"GET /x")  # the waiter got the connection at once
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok2")
    assert parse_responses(t2.value())[0][2] == b"ok2"
    # A waiter whose time runs out gets a 503.
    c4, t4 = rig.client()
    c4.dataReceived(GET)  # takes the idle connection
    c5, t5 = rig.client()
    c5.dataReceived(GET)
    rig.later(7)
    assert parse_responses(t5.value())[0][0] == 503
    pool = next(iter(rig.server.g.pools.pools.values()))
    assert pool.failures == {"queue_full": 1, "queue_timeout": 1} and not pool.queue


def test_small_body_is_read_before_a_connection_is_taken(docroot):
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\nabc")
    assert rig.pending() == 0
    client.dataReceived(b"def")
    assert rig.pending() == 1
    _, bt = rig.accept()
    assert bt.value().endswith(b"\r\n\r\nabcdef")
    # A client that stops sending its body is answered 408 and holds nothing.
    client, ct = rig.client()
    client.dataReceived(b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\nab")
    rig.later(Settings().idle_timeout + 2)
    assert parse_responses(ct.value())[0][0] == 408 and rig.pending() == 0


def test_request_with_a_body_is_not_retried(docroot):
    """PUT is idempotent, but its body went to the dead connection and cannot be
    sent again: 502, no retry carrying a head that promises a body."""
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(b"PUT /u HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
    backend, bt = rig.accept()
    assert bt.value().endswith(b"\r\n\r\nhi")
    backend.connectionLost(Failure(ConnectionDone()))
    assert rig.pending() == 0
    assert parse_responses(ct.value())[0][0] == 502


def test_connect_cancelled_just_after_it_succeeded_frees_its_slot_once(docroot):
    rig = Rig(docroot, backend_first_byte_timeout=5.0)
    _, ct = _first_attempt_dies(rig)
    factory = rig.reactor.tcpClients[rig.made][2]
    late = factory.buildProtocol(None)  # connected, but the Deferred has not fired yet
    late.makeConnection(StringTransport())
    rig.reactor.rightNow += 7  # time passes before the Deferred's call runs:
    rig.server.sweep()          # the first-byte deadline cancels the connect
    assert parse_responses(ct.value())[0][0] == 504
    pool = next(iter(rig.server.g.pools.pools.values()))
    assert pool.count == 1  # the late connection still holds its slot ...
    late.connectionLost(Failure(ConnectionDone()))
    assert pool.count == 0  # ... until it closes


EARLY_HINTS = (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n"
               b"Connection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\r\n")


def test_early_hints_are_relayed_rewritten_and_never_stored(docroot):
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(GET)
    backend, _ = rig.accept()
    backend.dataReceived(EARLY_HINTS)
    # The hint reaches the client at once, before the final answer exists.
    [(status, headers, _)] = parse_responses(ct.value())
    assert status == 103 and headers["link"] == "</style.css>; rel=preload"
    assert "x-hop" not in headers and "keep-alive" not in headers and "connection" not in headers
    assert headers["via"] == "1.1 afpa" and "cache-status" not in headers
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 2\r\n\r\nok")
    [hint, (status, headers, body)] = parse_responses(ct.value())
    assert hint[0] == 103 and (status, body) == (200, b"ok")
    assert "link" not in headers and "stored" in headers["cache-status"]
    # The stored answer is the 200 alone: a hit carries no hint.
    client, ct = rig.client()
    client.dataReceived(GET)
    [(status, headers, body)] = parse_responses(ct.value())
    assert (status, body) == (200, b"ok") and headers["cache-status"].startswith("afpa; hit")


def test_interim_responses_not_for_http10_clients_nor_a_second_100(docroot):
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(b"GET /x HTTP/1.0\r\nHost: t\r\n\r\n")
    backend, bt = rig.accept()
    backend.dataReceived(EARLY_HINTS + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    [(status, _, body)] = parse_responses(ct.value())
    assert (status, body) == (200, b"ok")
    # afpa answered Expect: 100-continue itself; the backend's own 100 is dropped.
    client, ct = rig.client()
    client.dataReceived(b"POST /u HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    bt.clear()
    client.dataReceived(b"hi")  # goes out on the kept-alive backend connection
    assert bt.value().startswith(b"POST /u") and b"expect" not in bt.value().lower()
    backend.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
                         b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert [r[0] for r in parse_responses(ct.value())] == [100, 102, 201]


def test_interim_flood_is_bounded(docroot):
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(GET)
    backend, _ = rig.accept()
    backend.dataReceived(EARLY_HINTS * 50 + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    statuses = [r[0] for r in parse_responses(ct.value())]
    assert statuses == [103] * 10 + [200]


NO_STORE = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nCache-Control: no-store\r\n\r\nhello")


def test_pass_through_bursts_reuse_every_backend_connection(docroot):
    # 40 clients at once (more than the old default of 32 idle connections):
    # each pass-through burst after the first is served on the connections
    # the first one opened; none is closed and reopened.  Coalescing off: each
    # request of a burst needs a connection at once.
    rig = Rig(docroot, coalesce_max_waiters=0)
    clients = [rig.client() for _ in range(40)]
    backends = []
    for burst in range(3):
        for c, t in clients:
            t.clear()
            c.dataReceived(GET)
        if burst == 0:
            backends = [rig.accept() for _ in clients]
        assert rig.pending() == 0
        for b, bt in backends:
            assert bt.value().startswith(b"GET /x HTTP/1.1")
            bt.clear()
            b.dataReceived(NO_STORE)
        for _, t in clients:
            [(status, _, body)] = parse_responses(t.value())
            assert (status, body) == (200, b"hello")
    assert len(rig.reactor.tcpClients) == 40
    assert not any(bt.disconnecting for _, bt in backends)
    pool = next(iter(rig.server.g.pools.pools.values()))
    assert (pool.opened, pool.reused, len(pool.idle)) == (40, 80, 40)


def test_sequential_pass_through_requests_share_one_backend_connection(docroot):
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(GET)
    backend, bt = rig.accept()
    for _ in range(5):
        assert bt.value().startswith(b"GET /x HTTP/1.1")
        bt.clear()
        backend.dataReceived(NO_STORE)
        client.dataReceived(GET)
    assert rig.pending() == 0 and len(rig.reactor.tcpClients) == 1 and not bt.disconnecting
    assert [r[2] for r in parse_responses(ct.value())] == [b"hello"] * 5
