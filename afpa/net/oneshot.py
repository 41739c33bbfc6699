"""A short outbound stream: connect, write, read until done, close.

The runtime verb for a module that asks another server one thing over TCP and
needs no pool (DNS's TCP fallback after a truncated UDP answer).  Events reach
the module as plain callbacks that its state turns into outcomes: ``on_data``
with each piece received, ``on_lost`` once, when the connection failed or
closed (after :meth:`OneShot.close` too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import ClientFactory, Protocol


class OneShot(Protocol):
    """One outbound TCP exchange; :meth:`write` before the connection is made
    is sent once it is."""

    def __init__(self, on_data: Callable[[bytes], None], on_lost: Callable[[str], None]):
        self.on_data = on_data
        self.on_lost = on_lost
        self.pending: list[bytes] = []
        self.ended = False
        self.connector: Any = None

    def connectionMade(self) -> None:  # noqa: N802
        if self.ended:
            self.transport.abortConnection()
            return
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        if self.pending:
            self.transport.writeSequence(self.pending)
            self.pending = []

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if not self.ended:
            self.on_data(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self._lost("closed")

    def _lost(self, why: str) -> None:
        if not self.ended:
            self.ended = True
            self.on_lost(why)

    def write(self, data: bytes) -> None:
        """Send ``data`` (queued until the connection is made)."""
        if self.ended:
            return
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.write(data)

    def close(self) -> None:
        """End the exchange now (no ``on_lost`` call after this)."""
        self.ended = True
        if self.transport is not None:
            self.transport.abortConnection()
        elif self.connector is not None:
            self.connector.stopConnecting()


class _Factory(ClientFactory):
    noisy = False

    def __init__(self, proto: OneShot):
        self.proto = proto

    def buildProtocol(self, addr: Any) -> OneShot:  # noqa: N802
        return self.proto

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:  # noqa: N802
        self.proto._lost("connect failed")


def open_stream(reactor: Any, host: str, port: int, on_data: Callable[[bytes], None],
                on_lost: Callable[[str], None], connect_timeout: float = 5.0) -> OneShot:
    """Connect to ``host:port``; returns the exchange at once (write to it now)."""
    proto = OneShot(on_data, on_lost)
    try:
        proto.connector = reactor.connectTCP(host, port, _Factory(proto), timeout=connect_timeout)
    except Exception:  # e.g. a malformed address: a failed exchange, not a crash
        reactor.callLater(0, proto._lost, "connect failed")
    return proto
