"""The runtime verbs (afpa/net/verbs.py) on in-memory transports: what a
protocol module can do to a client or outbound connection."""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from afpa.machine.scopes import Connection
from afpa.net import twisted_private, verbs
from afpa.net.outbound import Exchange
from tests.conftest import MemoryServer


class Outbound:
    """Stands for a connected outbound protocol (a pooled backend connection)."""

    def __init__(self, transport=None):
        self.transport = transport if transport is not None else StringTransport()


def outbound() -> tuple[Connection, StringTransport]:
    conn = Connection(None, None, None)
    proto = Outbound()
    verbs.attach(conn, proto)
    return conn, proto.transport


@pytest.fixture
def client(docroot):
    mem = MemoryServer(str(docroot))
    proto, t = mem.connect()
    return proto, t


# -- write, close, abort -------------------------------------------------------

def test_write_sends_bytes_in_order_to_a_client(client):
    proto, t = client
    verbs.write(proto.conn, [b"one ", b"two "])
    verbs.write(proto.conn, [b"three"])
    assert t.value() == b"one two three"


def test_write_to_an_outbound_connection(client):
    conn, t = outbound()
    verbs.write(conn, [b"GET / HTTP/1.1\r\n", b"\r\n"])
    assert t.value() == b"GET / HTTP/1.1\r\n\r\n"


def test_close_lets_written_bytes_out_and_abort_does_not_wait(client):
    proto, t = client
    verbs.write(proto.conn, [b"bye"])
    verbs.close(proto.conn)
    assert t.disconnecting and not t.disconnected and t.value() == b"bye"
    conn, bt = outbound()
    verbs.abort(conn)
    assert bt.disconnected  # StringTransport's mark of abortConnection


def test_verbs_on_a_detached_connection_do_nothing():
    conn, t = outbound()
    verbs.detach(conn)
    assert conn.transport is None and conn.sock is None
    verbs.close(conn)
    verbs.abort(conn)
    verbs.pause_reading(conn)
    verbs.resume_reading(conn)
    verbs.unpace(conn)
    assert not t.disconnecting and t.producerState == "producing"


# -- pause and resume reading ----------------------------------------------------

def test_pause_and_resume_reading_a_client(client):
    proto, t = client
    verbs.pause_reading(proto.conn)
    assert t.producerState == "paused" and proto.reading_paused
    verbs.resume_reading(proto.conn)
    assert t.producerState == "producing" and not proto.reading_paused


def test_pause_and_resume_reading_an_outbound_connection():
    conn, t = outbound()
    verbs.pause_reading(conn)
    assert t.producerState == "paused"
    verbs.resume_reading(conn)
    assert t.producerState == "producing"


# -- back-pressure between two connections ---------------------------------------

def test_pace_a_relayed_response_stops_reading_the_backend_while_the_client_is_full(client):
    proto, ct = client
    bconn, bt = outbound()
    verbs.pace(bconn, proto.conn)
    ct.producer.pauseProducing()  # the client's send buffer is full
    assert bt.producerState == "paused"
    ct.producer.resumeProducing()  # drained
    assert bt.producerState == "producing"
    verbs.unpace(proto.conn)
    assert ct.producer is None
    verbs.unpace(proto.conn)  # nothing paces it any more: no error


def test_pace_an_upload_stops_reading_the_client_while_the_backend_is_full(client):
    proto, ct = client
    bconn, bt = outbound()
    verbs.pace(proto.conn, bconn)
    bt.producer.pauseProducing()
    # Through the client's driver, which keeps account of its own pausing.
    assert ct.producerState == "paused" and proto.reading_paused
    bt.producer.resumeProducing()
    assert ct.producerState == "producing" and not proto.reading_paused
    verbs.unpace(bconn)
    assert bt.producer is None


# -- relaying (splice) --------------------------------------------------------------

def spliced(client):
    proto, ct = client
    conn = proto.conn
    conn.busy = True  # a state of the client machine is parked on the splice
    conn.inbuf, conn.inpos = b"GET /ws HTTP/1.1\r\n\r\nearly", 20
    bconn, bt = outbound()
    tunnel = verbs.splice_to(proto.server.reactor, conn, bconn, idle_timeout=60)
    return proto, ct, bt, tunnel


def test_splice_relays_both_ways_after_replaying_unread_input(client):
    proto, ct, bt, tunnel = spliced(client)
    assert bt.value() == b"early"  # what the client sent ahead is replayed first
    proto.dataReceived(b" more")
    assert bt.value() == b"early more"
    tunnel.data(b"from the server")
    assert ct.value() == b"from the server"
    # Back-pressure both ways: each side is the other's producer.
    assert ct.producer is bt and bt.producer is ct


def test_splice_server_closing_closes_the_client_after_its_bytes(client):
    proto, ct, bt, tunnel = spliced(client)
    done = []
    tunnel.done.addCallback(done.append)
    tunnel.data(b"last words")
    tunnel.lost(Failure(ConnectionDone()))
    assert ct.value() == b"last words" and ct.disconnecting and not ct.disconnected
    assert ct.producer is None and done == ["spliced"]


def test_splice_client_closing_closes_the_server_side(client):
    proto, ct, bt, tunnel = spliced(client)
    proto.connectionLost(Failure(ConnectionDone()))
    assert bt.disconnecting and not bt.disconnected


# -- outbound exchanges -------------------------------------------------------------

def test_exchange_is_made_but_not_started():
    class Machine:
        name, start = "m", "s0"

    ex = verbs.exchange(None, Machine(), req="r", peer="http://b:1")
    assert isinstance(ex, Exchange) and ex.conn.req == "r" and ex.conn.peer == "http://b:1"
    assert not ex.done.called and ex.conn.transport is None


# -- direct socket writes (the Twisted-private path) ----------------------------

class Socket:
    """Takes ``room`` bytes, then nothing (EAGAIN)."""

    def __init__(self, room: int):
        self.room, self.data = room, b""

    def send(self, data):
        return self.sendmsg([data])

    def sendmsg(self, bufs):
        data = b"".join(bytes(b) for b in bufs)
        if not self.room:
            raise BlockingIOError
        n = min(self.room, len(data))
        self.room -= n
        self.data += data[:n]
        return n


class TcpLike(StringTransport):
    """A StringTransport showing the send-buffer state a TCP transport keeps."""

    dataBuffer, offset, connected = b"", 0, True

    def __init__(self, sock):
        super().__init__()
        self.socket = sock

    @property
    def _tempDataLen(self) -> int:
        return len(self.value())


@pytest.fixture
def private_path():
    """The private path on (whatever the installed Twisted), restored afterwards."""
    saved = twisted_private.ENABLED, twisted_private._WHY
    twisted_private.set_enabled(True)
    yield
    twisted_private.ENABLED, twisted_private._WHY = saved


def test_attach_gives_direct_writes_only_on_the_private_path(private_path):
    sock = Socket(100)
    conn = Connection(None, None, None)
    verbs.attach(conn, Outbound(TcpLike(sock)))
    assert conn.sock is sock
    twisted_private.set_enabled(False)
    verbs.attach(conn, Outbound(TcpLike(sock)))
    assert conn.sock is None
    verbs.write(conn, [b"through the transport"])
    assert conn.transport.value() == b"through the transport" and sock.data == b""


def test_a_direct_write_never_overtakes_bytes_the_transport_holds(private_path):
    sock = Socket(4)
    conn = Connection(None, None, None)
    verbs.attach(conn, Outbound(TcpLike(sock)))
    verbs.write(conn, [b"abcd", b"efgh"])  # the socket takes 4, the transport queues the rest
    sock.room = 100  # the socket has room again before the transport flushed
    verbs.write(conn, [b"ijkl"])
    assert sock.data == b"abcd" and conn.transport.value() == b"efghijkl"


def test_the_startup_line_names_the_path(private_path, monkeypatch):
    assert "Twisted privates" in twisted_private.describe()
    twisted_private.set_enabled(False)
    assert "public API only" in twisted_private.describe()
    monkeypatch.setenv("AFPA_NO_TWISTED_PRIVATES", "1")
    assert twisted_private._decide() == (False, "AFPA_NO_TWISTED_PRIVATES is set")
    monkeypatch.delenv("AFPA_NO_TWISTED_PRIVATES")
    monkeypatch.setattr(twisted_private.twisted, "__version__", "99.1.0")
    on, why = twisted_private._decide()
    assert not on and "99.1.0 is outside the verified" in why
