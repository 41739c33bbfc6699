"""One connection per request on real loopback sockets: accept, answer, close.

A closing answer on a plain TCP connection is closed inside the read event
that answered it when its transport holds nothing (twisted_private.close_now):
the client gets every byte and then an orderly FIN, never a reset, and the
server's connection bookkeeping runs exactly once.  Accepted sockets take
TCP_NODELAY from the listening socket (checked once per listener), with the
per-connection setsockopt as the fallback.  The public path (privates off)
closes through Twisted's loseConnection as before.

The Twisted transport here is a real ``tcp.Server`` on a connected socket; its
reactor only records which descriptors it watches, and the test calls the
transport's handlers the way the reactor would.
"""

from __future__ import annotations

import gc
import select
import socket
import weakref

import pytest
from twisted.internet import main, tcp
from twisted.python.failure import Failure

from afpa.net import twisted_private
from afpa.ops.metrics import Collector
from tests.conftest import MemoryServer

REQUEST = b"GET /hello.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


class FDSet:
    """What a reactor is asked to watch (the transport's reactor)."""

    def __init__(self):
        self.readers: set = set()
        self.writers: set = set()
        self.writes_asked = 0

    def addReader(self, fd):  # noqa: N802 - Twisted's names
        self.readers.add(fd)

    def removeReader(self, fd):  # noqa: N802
        self.readers.discard(fd)

    def addWriter(self, fd):  # noqa: N802
        self.writers.add(fd)
        self.writes_asked += 1

    def removeWriter(self, fd):  # noqa: N802
        self.writers.discard(fd)


@pytest.fixture
def privates():
    """Switch the private path for connections made in the test; restored after."""
    was = twisted_private.enabled()
    yield twisted_private.set_enabled
    twisted_private.set_enabled(was)


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


class Accepted:
    """A client socket and the server's side of it, made into a connection of ``mem``."""

    def __init__(self, mem: MemoryServer, listener: socket.socket, factory=None):
        self.client = socket.create_connection(listener.getsockname(), timeout=5)
        skt, addr = listener.accept()
        self.fds = FDSet()
        self.lost = 0
        server = mem.server
        real_lost = server.connection_lost

        def counted(proto):
            self.lost += 1
            real_lost(proto)

        server.connection_lost = counted
        self.factory = factory if factory is not None else server.factory()
        self.proto = self.factory.buildProtocol(None)
        self.transport = tcp.Server(skt, self.proto, addr, None, 0, self.fds)
        self.proto.makeConnection(self.transport)

    def request(self, data: bytes = REQUEST) -> None:
        """Send ``data`` and let the transport read it, as the reactor would."""
        self.client.sendall(data)
        assert select.select([self.transport.socket], [], [], 5)[0], "request did not arrive"
        assert self.transport.doRead() is None

    def read_to_eof(self) -> bytes:
        """Everything the server sent, up to its FIN (a reset raises)."""
        got = b""
        while True:
            chunk = self.client.recv(65536)
            if not chunk:
                return got
            got += chunk

    def close(self) -> None:
        self.client.close()
        if hasattr(self.transport, "socket"):
            self.transport.socket.close()


def _open_gauge(server) -> float:
    for family in Collector(server).collect():
        if family.name == "afpa_connections_open":
            return family.samples[0].value
    raise AssertionError("no afpa_connections_open")


def test_closing_answer_closes_in_its_read_event_with_a_fin(docroot, listener, privates):
    privates(True)
    mem = MemoryServer(str(docroot))
    a = Accepted(mem, listener)
    try:
        assert mem.server.connections == {a.proto} and _open_gauge(mem.server) == 1
        a.request()
        # Closed now: no wait for a write event, nothing watched any more.
        assert a.fds.writes_asked == 0 and not a.fds.readers and not a.fds.writers
        assert not hasattr(a.transport, "socket")
        a.client.settimeout(2)
        raw = a.read_to_eof()  # a reset would raise ConnectionResetError here
        assert raw.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close\r\n" in raw
        assert raw.endswith(b"\r\n\r\nhello world\n")
        assert a.lost == 1 and a.proto.conn.closed
        assert not mem.server.connections and not mem.server.live and _open_gauge(mem.server) == 0
        assert mem.server.connections_total == 1
    finally:
        a.close()


def test_public_path_closes_after_a_write_event(docroot, listener, privates):
    privates(False)
    mem = MemoryServer(str(docroot))
    a = Accepted(mem, listener)
    try:
        a.request()
        # Every byte goes through the transport, which closes on a write event.
        assert a.fds.writers == {a.transport} and mem.server.live == {a.proto}
        for _ in range(10):  # the reactor's write events, until the transport closes
            why = a.transport.doWrite()
            if why:
                break
        assert why is main.CONNECTION_DONE and not mem.server.connections
        a.transport.connectionLost(Failure(why))
        a.client.settimeout(2)
        raw = a.read_to_eof()
        assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"hello world\n")
        assert a.lost == 1 and not mem.server.live and _open_gauge(mem.server) == 0
    finally:
        a.close()


def test_close_outside_the_read_event_waits_for_the_write_event(docroot, listener, privates):
    # A drain closes an idle connection from outside its read event: the
    # descriptor number must not be freed while a stale event may name it.
    privates(True)
    mem = MemoryServer(str(docroot))
    a = Accepted(mem, listener)
    try:
        mem.server.drain(5)
        assert a.transport.disconnecting and a.fds.writers == {a.transport} and hasattr(a.transport, "socket")
        assert a.transport.doWrite() is main.CONNECTION_DONE
        a.transport.connectionLost(Failure(main.CONNECTION_DONE))
        a.client.settimeout(2)
        assert a.read_to_eof() == b""
        assert a.lost == 1 and not mem.server.live
    finally:
        a.close()


def test_pipelined_requests_then_close_all_answered(docroot, listener, privates):
    privates(True)
    mem = MemoryServer(str(docroot))
    a = Accepted(mem, listener)
    try:
        a.request(REQUEST.replace(b"Connection: close\r\n", b"") + REQUEST)
        a.client.settimeout(2)
        raw = a.read_to_eof()
        assert raw.count(b"HTTP/1.1 200 ") == 2 and raw.endswith(b"hello world\n")
        assert a.lost == 1 and not mem.server.live
    finally:
        a.close()


@pytest.mark.parametrize("on", [True, False])
def test_a_closed_connection_is_freed_at_once(docroot, listener, privates, on):
    # No reference cycle is left behind: the protocol, its Connection and its
    # transport go as soon as the last reference does, not at the garbage
    # collector's next pass (which, one connection per request, would run
    # over and over).
    privates(on)
    mem = MemoryServer(str(docroot))
    a = Accepted(mem, listener)
    a.request()
    if not on:
        while not a.transport.doWrite():
            pass
        a.transport.connectionLost(Failure(main.CONNECTION_DONE))
    a.client.settimeout(2)
    assert a.read_to_eof().endswith(b"hello world\n")
    refs = [weakref.ref(x) for x in (a.proto, a.proto.conn, a.transport)]
    was = gc.isenabled()
    gc.disable()
    try:
        del mem.server.connection_lost  # the counting wrapper holds the Accepted
        a.close()
        del a
        assert [r() for r in refs] == [None, None, None]
    finally:
        if was:
            gc.enable()


class _Port:
    def __init__(self, sock):
        self.socket = sock


def test_accepted_sockets_take_nodelay_from_the_listener(docroot, listener, privates, monkeypatch):
    privates(True)
    mem = MemoryServer(str(docroot))
    factory = mem.server.factory()
    assert mem.server.listening_on(_Port(listener), factory) is not None
    assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert factory.nodelay_inherited is None  # to be checked on the first connection
    calls = []
    monkeypatch.setattr(tcp.Server, "setTcpNoDelay", lambda self, on: calls.append(on))
    accepted = [Accepted(mem, listener, factory) for _ in range(2)]
    try:
        assert factory.nodelay_inherited is True and calls == []
        for a in accepted:
            assert a.transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        for a in accepted:
            a.close()


def test_nodelay_set_per_connection_when_not_inherited(docroot, listener, privates):
    privates(True)
    mem = MemoryServer(str(docroot))
    factory = mem.server.factory()
    factory.nodelay_inherited = None  # as if the listener had it, but it does not
    a = Accepted(mem, listener, factory)
    b = Accepted(mem, listener, factory)
    try:
        assert factory.nodelay_inherited is False
        for x in (a, b):
            assert x.transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        a.close()
        b.close()


def test_public_path_leaves_the_listener_alone(docroot, listener, privates):
    privates(False)
    mem = MemoryServer(str(docroot))
    factory = mem.server.factory()
    mem.server.listening_on(_Port(listener), factory)
    assert not listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    a = Accepted(mem, listener, factory)
    try:
        assert factory.nodelay_inherited is False
        assert a.transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        a.close()


# -- the accept loop, on a real (private, never installed) epoll reactor -------------

@pytest.fixture
def epoll_reactor():
    from twisted.internet.epollreactor import EPollReactor
    r = EPollReactor()
    yield r
    r.removeAll()
    r.waker.connectionLost(None)
    r._poller.close()


def _serve_burst(mem: MemoryServer, reactor, port, n: int) -> list[bytes]:
    """``n`` clients connect at once (one accept wakeup takes them all), each
    sends a closing request; the reactor turns until every one has read to EOF."""
    addr = port.getHost()
    clients = [socket.create_connection((addr.host, addr.port), timeout=5) for _ in range(n)]
    got = [b""] * n
    open_ = set(range(n))
    peers = []
    try:
        for _ in range(50):
            reactor.iterate(0.02)
            if len(mem.server.connections) == n and not peers:
                peers = sorted(p.conn.peer for p in mem.server.connections)
                for c in clients:
                    c.sendall(REQUEST)
            for i in list(open_):
                if select.select([clients[i]], [], [], 0)[0]:
                    chunk = clients[i].recv(65536)
                    got[i] += chunk
                    if not chunk:
                        open_.discard(i)
            if not open_:
                break
        assert not open_, "some clients got no EOF"
        assert peers == sorted("%s:%d" % c.getsockname()[:2] for c in clients)
    finally:
        for c in clients:
            c.close()
    return got


@pytest.mark.parametrize("how", ["listen", "adopt"])
@pytest.mark.parametrize("on", [True, False])
def test_accept_loop_serves_a_burst_of_connections(docroot, privates, epoll_reactor, how, on):
    privates(on)
    mem = MemoryServer(str(docroot))
    factory = mem.server.factory()
    bound = None
    if how == "listen":
        port = twisted_private.listen_tcp(epoll_reactor, 0, factory, 50, "127.0.0.1")
    else:  # a listener bound elsewhere (a worker's supervisor)
        bound = socket.socket()
        bound.bind(("127.0.0.1", 0))
        bound.listen(50)
        bound.setblocking(False)
        port = twisted_private.adopt_stream_port(epoll_reactor, bound.fileno(), socket.AF_INET, factory)
    mem.server.listening_on(port, factory)
    try:
        # The lean accept loop on the private path, Twisted's own otherwise.
        assert (port.transport is not tcp.Server) is on and isinstance(port, tcp.Port)
        got = _serve_burst(mem, epoll_reactor, port, 5)
        for raw in got:
            assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"\r\n\r\nhello world\n")
        assert mem.server.connections_total == 5
        assert not mem.server.connections and not mem.server.live and _open_gauge(mem.server) == 0
        assert factory.nodelay_inherited is on
    finally:
        port.stopListening()
        epoll_reactor.iterate(0)
        if bound is not None:
            bound.close()


def test_lean_transport_describes_itself(docroot, privates, epoll_reactor):
    privates(True)
    mem = MemoryServer(str(docroot))
    port = twisted_private.listen_tcp(epoll_reactor, 0, mem.server.factory(), 50, "127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    try:
        for _ in range(50):
            epoll_reactor.iterate(0.02)
            if mem.server.connections:
                break
        (proto,) = mem.server.connections
        t = proto.transport
        assert t.logPrefix().startswith("MachineProtocol,0,127.0.0.1")
        assert repr(t) == f"<MachineProtocol #0 on {port.getHost().port}>"
        assert t.getPeer().port == client.getsockname()[1]
    finally:
        client.close()
        port.stopListening()
        epoll_reactor.iterate(0)


def test_request_waiting_at_accept_is_answered_without_the_poller(docroot, privates, epoll_reactor):
    # Clients that sent their request before the server accepted them (as
    # under load): each is read, answered and closed in the accept event; its
    # socket is never handed to the poller.
    privates(True)
    mem = MemoryServer(str(docroot))
    factory = mem.server.factory()
    port = twisted_private.listen_tcp(epoll_reactor, 0, factory, 50, "127.0.0.1")
    watched = []
    real_add = epoll_reactor.addReader

    def add(reader):
        watched.append(reader)
        real_add(reader)

    epoll_reactor.addReader = add
    clients = [socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5) for _ in range(4)]
    try:
        for c in clients:
            c.sendall(REQUEST)
        # The requests are in the server's socket buffers before it accepts.
        for _ in range(50):
            epoll_reactor.iterate(0.02)
            if mem.server.connections_total == 4:
                break
        for c in clients:
            c.settimeout(2)
            raw = b""
            while chunk := c.recv(65536):
                raw += chunk
            assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"hello world\n")
        assert watched == [] and not mem.server.live and _open_gauge(mem.server) == 0
    finally:
        for c in clients:
            c.close()
        port.stopListening()
        epoll_reactor.iterate(0)


def test_client_gone_before_accept_is_tidied_up(docroot, privates, epoll_reactor):
    privates(True)
    mem = MemoryServer(str(docroot))
    port = twisted_private.listen_tcp(epoll_reactor, 0, mem.server.factory(), 50, "127.0.0.1")
    lost = []
    real_lost = mem.server.connection_lost
    mem.server.connection_lost = lambda proto: (lost.append(proto), real_lost(proto))
    try:
        socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5).close()
        for _ in range(50):
            epoll_reactor.iterate(0.02)
            if lost:
                break
        assert len(lost) == 1 and mem.server.connections_total == 1
        assert not mem.server.connections and not mem.server.live
    finally:
        port.stopListening()
        epoll_reactor.iterate(0)


def test_one_accept_wakeup_takes_a_bounded_batch(docroot, privates, epoll_reactor):
    # Each accepted connection may be answered in the accept event itself: a
    # burst of them must not keep the reactor from everything else for long.
    privates(True)
    mem = MemoryServer(str(docroot))
    port = twisted_private.listen_tcp(epoll_reactor, 0, mem.server.factory(), 200, "127.0.0.1")
    n = twisted_private.ACCEPT_BATCH + 8
    clients = [socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5) for _ in range(n)]
    try:
        for c in clients:
            c.sendall(REQUEST)
        port.doRead()  # one wakeup of the listener
        assert mem.server.connections_total == twisted_private.ACCEPT_BATCH
        port.doRead()
        assert mem.server.connections_total == n
        for c in clients:
            c.settimeout(2)
            raw = b""
            while chunk := c.recv(65536):
                raw += chunk
            assert raw.endswith(b"hello world\n")
    finally:
        for c in clients:
            c.close()
        port.stopListening()
        epoll_reactor.iterate(0)
