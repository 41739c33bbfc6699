"""The backend machine (``http-backend.toml`` run by ``afpa.net.outbound.Exchange``)
and the splice, on in-memory transports with a Clock: no sockets, no processes.

The tests look only at what the ends see: the bytes written to the backend's
transport, what the client receives, which transports are closed, and whether a
second request opens a new backend connection.  How the machine gets there (its
states and outcome words) is free to change.  ``tests/unit/test_remote_machine.py``
covers retries, the connection queue, interim responses and small bodies; this
file covers the ordinary exchange, pooling, failures mid-way and the splice.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from tests.httpclient import parse_responses
from tests.unit import test_remote_machine
from tests.unit.test_remote_machine import GET

CLEAN = Failure(ConnectionDone())
RESET = Failure(ConnectionLost("reset by peer"))


class Wire(StringTransport):
    """A StringTransport that behaves like a socket when it is closed: the
    protocol hears ``connectionLost`` on the reactor's next turn (a clean close
    after ``loseConnection``, an abort after ``abortConnection``), once, and only
    if the test did not end the connection itself first."""

    def __init__(self, reactor):
        super().__init__(lenient=True)  # a real transport lets a closing one be paused
        self.reactor = reactor
        self.protocol = None
        self.ended = False

    def loseConnection(self):
        super().loseConnection()
        self._end(Failure(ConnectionDone()))

    def abortConnection(self):
        super().abortConnection()
        self._end(Failure(ConnectionAborted()))

    def _end(self, reason):
        if self.protocol is not None and not self.ended:
            self.ended = True
            self.reactor.callLater(0, self.protocol.connectionLost, reason)

    def gone(self, reason):
        """The other end closed (or reset) the connection."""
        if not self.ended:
            self.ended = True
            self.disconnecting = True
            self.protocol.connectionLost(reason)


class Rig(test_remote_machine.Rig):
    """The backend-machine rig of test_remote_machine, on :class:`Wire` transports."""

    def client(self):
        proto = self.server.factory().buildProtocol(None)
        t = Wire(self.reactor)
        proto.makeConnection(t)
        t.protocol = proto
        return proto, t

    def accept(self):
        factory = self.reactor.tcpClients[self.made][2]
        self.made += 1
        proto = factory.buildProtocol(None)
        t = Wire(self.reactor)
        proto.makeConnection(t)
        t.protocol = proto
        self.reactor.advance(0)
        return proto, t

    def later(self, seconds: float):
        super().later(seconds)
        self.reactor.advance(0)  # what the sweep closed is heard as closed


def pool_of(rig: Rig):
    return next(iter(rig.server.g.pools.pools.values()))


def head_of(raw: bytes) -> tuple[str, dict[str, str]]:
    """Request line and fields (lower-cased names) of the request head in ``raw``."""
    head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    fields: dict[str, str] = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return head[0], fields


# -- forwarding -----------------------------------------------------------------------

def test_request_is_forwarded_with_hop_by_hop_fields_removed(docroot):
    rig = Rig(docroot)
    client, _ = rig.client()
    client.dataReceived(b"GET /x?q=1 HTTP/1.1\r\nHost: t\r\nAccept: text/plain\r\n"
                        b"Connection: x-hop, keep-alive\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
                        b"X-Forwarded-For: 6.6.6.6\r\n\r\n")
    assert rig.pending() == 1
    _, bt = rig.accept()
    line, fields = head_of(bt.value())
    assert line == "GET /x?q=1 HTTP/1.1"
    assert bt.value().endswith(b"\r\n\r\n")  # no body, nothing after the head
    assert fields["host"] == "t" and fields["accept"] == "text/plain"
    assert fields["via"] == "1.1 afpa"
    # The client is no trusted proxy: its X-Forwarded-For is replaced, not extended.
    assert fields["x-forwarded-for"] == "192.168.1.1"
    assert "x-hop" not in fields and "keep-alive" not in fields and "connection" not in fields


def test_request_body_streams_to_the_backend_as_it_arrives(docroot):
    rig = Rig(docroot, buffer_body=4)
    client, ct = rig.client()
    client.dataReceived(b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 12\r\n\r\nfirst")
    _, bt = rig.accept()
    line, fields = head_of(bt.value())
    assert line == "POST /u HTTP/1.1" and fields["content-length"] == "12"
    assert bt.value().endswith(b"\r\n\r\nfirst")
    client.dataReceived(b"-se")
    client.dataReceived(b"cond")
    assert bt.value().endswith(b"\r\n\r\nfirst-second")
    assert ct.value() == b""  # nothing answered before the backend does


# -- relaying -------------------------------------------------------------------------

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-App: 7\r\nContent-Length: 11\r\n\r\nhello world"


def test_response_head_and_body_relayed_as_they_arrive(docroot):
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(GET)
    backend, bt = rig.accept()
    backend.dataReceived(RESPONSE[:-6])  # head and part of the body
    assert ct.value().startswith(b"HTTP/1.1 200 OK\r\n") and ct.value().endswith(b"hello")
    backend.dataReceived(RESPONSE[-6:])
    [(status, headers, body)] = parse_responses(ct.value())
    assert (status, body) == (200, b"hello world")
    assert headers["content-type"] == "text/plain" and headers["x-app"] == "7"
    assert headers["via"] == "1.1 afpa"
    assert not ct.disconnecting


def test_response_fed_one_byte_at_a_time(docroot):
    """Chunked, split into single bytes by the network: the client gets the same body."""
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(GET)
    backend, bt = rig.accept()
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nCache-Control: max-age=60\r\n\r\n"
           b"6\r\nhello \r\n5;ext=1\r\nworld\r\n0\r\nTrailer: x\r\n\r\n")
    for i in range(len(raw)):
        backend.dataReceived(raw[i:i + 1])
    [(status, _, body)] = parse_responses(ct.value())
    assert (status, body) == (200, b"hello world")
    # Stored whole: the same URL again is a hit that never reaches the backend.
    client, ct = rig.client()
    client.dataReceived(GET)
    [(status, headers, body)] = parse_responses(ct.value())
    assert (status, body) == (200, b"hello world") and headers["cache-status"].startswith("afpa; hit")
    assert rig.pending() == 0


def test_bodiless_answers_end_at_their_head(docroot):
    """204 and 304 have no body whatever they claim; the connection is reused after them."""
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
    backend, bt = rig.accept()
    backend.dataReceived(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
    bt.clear()
    client.dataReceived(b"GET /b HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"v\"\r\n\r\n")
    assert bt.value().startswith(b"GET /b ")  # same backend connection
    backend.dataReceived(b"HTTP/1.1 304 Not Modified\r\nETag: \"v\"\r\nContent-Length: 50\r\n\r\n")
    assert [r[0] for r in parse_responses(ct.value())] == [204, 304]
    assert rig.pending() == 0 and not ct.disconnecting


# -- keep-alive and the pool ------------------------------------------------------------

def test_keep_alive_connection_goes_back_to_the_pool_and_is_reused(docroot):
    rig = Rig(docroot)
    c1, t1 = rig.client()
    c1.dataReceived(b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n")
    backend, bt = rig.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
    assert parse_responses(t1.value())[0][2] == b"one"
    assert not bt.disconnecting
    bt.clear()
    # Another client: its request goes out on the pooled connection, no connect.
    c2, t2 = rig.client()
    c2.dataReceived(b"GET /two HTTP/1.1\r\nHost: t\r\n\r\n")
    assert rig.pending() == 0
    assert head_of(bt.value())[0] == "GET /two HTTP/1.1"
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
    assert parse_responses(t2.value())[0][2] == b"two"
    pool = pool_of(rig)
    assert (pool.opened, pool.reused, pool.count) == (1, 1, 1)


def test_connection_close_from_the_backend_is_not_pooled(docroot):
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n")
    backend, bt = rig.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\none")
    assert parse_responses(ct.value())[0][2] == b"one"
    assert bt.disconnecting
    assert not ct.disconnecting  # the client's own connection goes on
    client.dataReceived(b"GET /two HTTP/1.1\r\nHost: t\r\n\r\n")
    assert rig.pending() == 1  # a new backend connection


def test_pooled_connection_closed_by_the_backend_is_not_used_again(docroot):
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n")
    backend, bt = rig.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
    bt.gone(CLEAN)  # closed while idle in the pool
    assert pool_of(rig).count == 0
    client.dataReceived(b"GET /two HTTP/1.1\r\nHost: t\r\n\r\n")
    assert rig.pending() == 1
    backend, bt = rig.accept()
    assert head_of(bt.value())[0] == "GET /two HTTP/1.1"
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
    assert [r[2] for r in parse_responses(ct.value())] == [b"one", b"two"]


# -- failures mid-way -------------------------------------------------------------------

def test_backend_reset_mid_body_cuts_the_client(docroot):
    """The head went out already: the client cannot get an error page, so its
    connection is cut short of the promised length; nothing is stored and the
    dead connection is not pooled."""
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(GET)
    backend, bt = rig.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 100\r\n\r\npartial")
    bt.gone(RESET)
    raw = ct.value()
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"partial")
    assert ct.disconnecting
    assert len(rig.server.runtime.cache) == 0
    assert pool_of(rig).count == 0
    # The next client is served on a new connection.
    client, ct = rig.client()
    client.dataReceived(GET)
    backend, bt = rig.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert parse_responses(ct.value())[0][2] == b"ok"


def test_backend_reset_mid_chunked_body_sends_no_last_chunk(docroot):
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(GET)
    backend, bt = rig.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\npart\r\n")
    bt.gone(CLEAN)  # even a clean close: the body did not end
    assert ct.disconnecting
    assert not ct.value().endswith(b"0\r\n\r\n")  # a client must not take it as complete


def test_first_byte_timeout_answers_504_and_drops_the_connection(docroot):
    rig = Rig(docroot, backend_first_byte_timeout=5.0)
    client, ct = rig.client()
    client.dataReceived(GET)
    backend, bt = rig.accept()
    assert bt.value().startswith(b"GET /x ")
    rig.later(3)
    assert ct.value() == b""  # not yet
    rig.later(3)
    [(status, _, _)] = parse_responses(ct.value())
    assert status == 504
    assert bt.disconnecting  # a late answer must never be read as the next request's
    assert pool_of(rig).count == 0
    client, ct = rig.client()
    client.dataReceived(GET)
    assert rig.pending() == 1


def test_backend_idle_mid_body_cuts_the_client(docroot):
    rig = Rig(docroot, backend_idle_timeout=5.0, backend_first_byte_timeout=60.0)
    client, ct = rig.client()
    client.dataReceived(GET)
    backend, bt = rig.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    rig.later(7)
    assert ct.value().endswith(b"abc") and ct.disconnecting
    assert bt.disconnecting


def test_client_gone_mid_body_closes_the_backend_connection(docroot):
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(GET)
    backend, bt = rig.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
    ct.gone(RESET)
    backend.dataReceived(b"more")  # arrives for nobody
    assert bt.disconnecting  # the rest of the body is not worth reading
    rig.reactor.advance(0)
    assert pool_of(rig).count == 0


# -- the splice ---------------------------------------------------------------------------

def deferred_rig(root, **overrides) -> Rig:
    """A server whose default route hands connections to a local server."""
    return Rig(root, backend=None, defer="http://127.0.0.1:9", **overrides)


def test_splice_replays_the_request_and_relays_both_ways(docroot):
    rig = deferred_rig(docroot)
    client, ct = rig.client()
    client.dataReceived(GET + b"early")
    assert rig.pending() == 1
    server, st = rig.accept()
    assert st.value() == GET + b"early"  # the raw bytes, not a rewritten request
    client.dataReceived(b"ping")
    assert st.value().endswith(b"earlyping")
    server.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nfrom the server")
    server.dataReceived(b" and more")
    assert ct.value() == b"HTTP/1.1 200 OK\r\n\r\nfrom the server and more"  # afpa adds nothing
    # Back-pressure: each side is the other's producer.
    assert ct.producer is st and st.producer is ct
    assert not ct.disconnecting and not st.disconnecting


def test_splice_server_close_closes_the_client_after_its_bytes(docroot):
    rig = deferred_rig(docroot)
    client, ct = rig.client()
    client.dataReceived(GET)
    server, st = rig.accept()
    server.dataReceived(b"last words")
    st.gone(CLEAN)
    assert ct.value() == b"last words" and ct.disconnecting


def test_splice_client_close_closes_the_server(docroot):
    rig = deferred_rig(docroot)
    client, ct = rig.client()
    client.dataReceived(GET)
    server, st = rig.accept()
    client.dataReceived(b"bye")
    ct.gone(CLEAN)
    assert st.value().endswith(b"bye") and st.disconnecting
    st.gone(CLEAN)


def test_splice_client_gone_before_the_server_answers_the_connect(docroot):
    rig = deferred_rig(docroot)
    client, ct = rig.client()
    client.dataReceived(GET)
    ct.gone(CLEAN)
    server, st = rig.accept()
    assert st.disconnecting  # nobody to relay for


def test_splice_unreachable_server_is_502(docroot):
    rig = deferred_rig(docroot)
    client, ct = rig.client()
    client.dataReceived(GET)
    rig.refuse()
    [(status, _, _)] = parse_responses(ct.value())
    assert status == 502 and ct.disconnecting


def test_splice_idle_in_both_directions_is_closed(docroot):
    rig = deferred_rig(docroot, tunnel_idle_timeout=30.0)
    client, ct = rig.client()
    client.dataReceived(GET)
    server, st = rig.accept()
    rig.later(20)
    server.dataReceived(b"tick")  # traffic keeps it open
    rig.later(20)
    assert not ct.disconnecting
    rig.later(15)
    assert ct.disconnecting


WS = (b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
SWITCH = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


def test_upgrade_splices_the_backend_connection_both_ways(docroot):
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(WS)
    backend, bt = rig.accept()
    line, fields = head_of(bt.value())
    assert line == "GET /ws HTTP/1.1" and fields["upgrade"] == "websocket"
    bt.clear()
    backend.dataReceived(SWITCH + b"hello")  # the backend speaks first, in the same segment
    raw = ct.value()
    assert raw.startswith(b"HTTP/1.1 101 ") and raw.endswith(b"\r\n\r\nhello")
    client.dataReceived(b"ping")
    assert bt.value() == b"ping"
    backend.dataReceived(b"pong")
    assert ct.value().endswith(b"hellopong")
    ct.gone(CLEAN)
    assert bt.disconnecting
    rig.reactor.advance(0)
    assert pool_of(rig).count == 0  # a switched connection never goes back to the pool


def test_upgrade_backend_close_closes_the_client(docroot):
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(WS)
    backend, bt = rig.accept()
    backend.dataReceived(SWITCH)
    backend.dataReceived(b"goodbye")
    bt.gone(CLEAN)
    assert ct.value().endswith(b"goodbye") and ct.disconnecting
    assert pool_of(rig).count == 0
