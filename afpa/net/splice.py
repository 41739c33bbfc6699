"""Splicing a client connection to a server connection (Derive Deferred Response,
and protocol upgrades such as WebSocket).

Once spliced, afpa only relays bytes, like TUX or kHTTPd handing a connection to
Apache: the bytes already read from the client are replayed to the server, then
each side's input is written to the other.  Back-pressure holds both ways, as in
``twisted.protocols.portforward``: each transport is registered as the other's
producer, so a side that does not read stops the other side being read.

Two verbs (modules reach them through :mod:`afpa.net.verbs`): :func:`splice` connects to a server first (a deferred route), and
:func:`splice_to` joins a connection a module already has open (a backend that
agreed to switch protocols); the module then hands that connection's events to
the returned :class:`Tunnel` (its ``data``/``lost`` methods).

While spliced, the client connection's events go to the tunnel: it is the
waiter on the client's driver (:attr:`afpa.machine.driver.Driver.waiter`) and
takes ``input`` (relayed), ``peer_closed`` (the server side is closed too) and
``timeout`` (idle both ways for ``idle_timeout``: both sides are closed).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientCreator, Protocol

from afpa.machine.modules import INPUT, PEER_CLOSED, TIMEOUT
from afpa.machine.scopes import WORK


class Tunnel:
    """Bytes both ways between a client connection (``conn``) and a server
    transport; ``done`` fires with ``"spliced"`` once the server side is gone.
    A tunnel idle in both directions for ``idle_timeout`` seconds is closed by
    the server's sweep (the client connection carries the deadline)."""

    def __init__(self, conn: Any, reactor: Any, idle_timeout: float, done: Deferred | None = None):
        self.conn = conn
        self.done: Deferred = done if done is not None else Deferred()
        self.seconds = reactor.seconds
        self.idle_timeout = idle_timeout
        self.transport: Any = None

    def _touch(self) -> None:
        self.conn.arm(self.seconds() + self.idle_timeout, WORK)

    def attach(self, transport: Any) -> None:
        """Start relaying between the client and ``transport``."""
        self.transport = transport
        conn = self.conn
        if conn.closed:
            transport.loseConnection()
            return
        client = conn.transport
        # The client connection's events (and its deadline) are the tunnel's now.
        if conn.driver is not None:
            conn.driver.waiter = self
        self._from_client()  # replay what was read, including anything since
        self._touch()
        client.registerProducer(transport, True)
        transport.registerProducer(client, True)
        if conn.driver is not None:
            conn.driver.resume_reading()

    def deliver(self, word: str) -> None:
        """An event of the client connection (see the module docstring)."""
        if word == INPUT:
            self._from_client()
        elif word == PEER_CLOSED:
            self.transport.loseConnection()
        elif word == TIMEOUT:
            if not self.conn.closed:
                self.conn.transport.loseConnection()
            self.transport.loseConnection()

    def _from_client(self) -> None:
        conn = self.conn
        data = conn.inbuf[conn.inpos:]
        conn.inpos = len(conn.inbuf)
        if data:
            self.transport.write(data)
            self._touch()

    def data(self, data: bytes) -> None:
        """Bytes from the server: to the client."""
        self.conn.transport.write(data)
        self._touch()

    def lost(self, reason: Any = None) -> None:
        """The server side closed: close the client too."""
        conn = self.conn
        if not conn.closed:
            if conn.transport.producer is not None:
                conn.transport.unregisterProducer()
            conn.transport.loseConnection()
        if not self.done.called:
            self.done.callback("spliced")


class _ServerSide(Protocol):
    def __init__(self, tunnel: Tunnel):
        self.tunnel = tunnel

    def connectionMade(self) -> None:
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self.tunnel.attach(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.data(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.tunnel.lost(reason)


def splice(reactor: Any, conn: Any, host: str, port: int, timeout: float,
           idle_timeout: float = 3600.0) -> Deferred:
    """Connect to ``host:port``, replay ``conn``'s unread input and splice the two;
    close both when no byte has passed either way for ``idle_timeout`` seconds.

    The Deferred fires with ``"spliced"`` once either side has closed, or fails
    (with the connect error) when the server cannot be reached.
    """
    tunnel = Tunnel(conn, reactor, idle_timeout)
    done = tunnel.done
    creator = ClientCreator(reactor, _ServerSide, tunnel)
    d = creator.connectTCP(host, port, timeout=timeout)
    d.addErrback(lambda failure: done.errback(failure) if not done.called else None)
    return done


def splice_to(reactor: Any, conn: Any, outbound: Any, idle_timeout: float = 3600.0) -> Tunnel:
    """Splice client ``conn`` with the connected ``outbound`` connection (a
    connection scope, see ``afpa.net.verbs.attach``): replay ``conn``'s unread
    input to it, then relay both ways until either side closes.

    The caller routes the outbound connection's events to the returned tunnel
    (``tunnel.data(bytes)``, ``tunnel.lost(reason)``); ``tunnel.done`` fires
    with ``"spliced"`` once the outbound side is gone (closing the client with it).
    """
    tunnel = Tunnel(conn, reactor, idle_timeout)
    tunnel.attach(outbound.transport)
    return tunnel
