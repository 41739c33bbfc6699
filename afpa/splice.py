"""Splicing a client connection to a local server (Derive Deferred Response).

Once spliced, afpa only relays bytes, like TUX or kHTTPd handing a connection to
Apache: the bytes already read from the client are replayed to the server, then
each side's input is written to the other.  Back-pressure holds both ways, as in
``twisted.protocols.portforward``: each transport is registered as the other's
producer, so a side that does not read stops the other side being read.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientCreator, Protocol


class _ServerSide(Protocol):
    def __init__(self, conn: Any, done: Deferred, reactor: Any, idle_timeout: float):
        self.conn = conn
        self.done = done
        self.seconds = reactor.seconds
        self.idle_timeout = idle_timeout

    def _touch(self) -> None:
        # A tunnel idle in both directions for idle_timeout is closed by the sweep.
        self.conn.deadline_kind = "tunnel"
        self.conn.deadline = self.seconds() + self.idle_timeout

    def connectionMade(self) -> None:
        conn = self.conn
        if conn.closed:
            self.transport.loseConnection()
            return
        client = conn.transport
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        conn.sink = self._from_client
        self._from_client()  # replay what was read, including anything since
        self._touch()
        conn.on_lost = lambda _reason: self.transport.loseConnection()
        client.registerProducer(self.transport, True)
        self.transport.registerProducer(client, True)
        if conn.driver is not None:
            conn.driver.resume_reading()

    def _from_client(self) -> None:
        conn = self.conn
        data = conn.inbuf[conn.inpos:]
        conn.inpos = len(conn.inbuf)
        if data:
            self.transport.write(data)
            self._touch()

    def dataReceived(self, data: bytes) -> None:
        self.conn.transport.write(data)
        self._touch()

    def connectionLost(self, reason: Any = None) -> None:
        conn = self.conn
        if not conn.closed:
            if conn.transport.producer is not None:
                conn.transport.unregisterProducer()
            conn.transport.loseConnection()
        if not self.done.called:
            self.done.callback("spliced")


def splice(reactor: Any, conn: Any, host: str, port: int, timeout: float,
           idle_timeout: float = 3600.0) -> Deferred:
    """Connect to ``host:port``, replay ``conn``'s unread input and splice the two;
    close both when no byte has passed either way for ``idle_timeout`` seconds.

    The Deferred fires with ``"spliced"`` once either side has closed, or fails
    (with the connect error) when the server cannot be reached.
    """
    done: Deferred = Deferred()
    creator = ClientCreator(reactor, _ServerSide, conn, done, reactor, idle_timeout)
    d = creator.connectTCP(host, port, timeout=timeout)
    d.addErrback(lambda failure: done.errback(failure) if not done.called else None)
    return done
