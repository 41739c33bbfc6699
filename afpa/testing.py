"""Run a protocol module's machine without sockets, for the module's own tests.

A module author tests states and tables the way afpa tests its HTTP module: a
real :class:`afpa.server.Server` on a fake clock, its connections on Twisted's
in-memory transports, bytes in and bytes out, nothing listening::

    from afpa.testing import MemoryServer

    def test_greeting():
        srv = MemoryServer(MODULE)
        c = srv.connect()
        assert c.received() == b"+OK quotes ready\\r\\n"
        c.send(b"QUIT\\r\\n")
        assert c.received() == b"+OK bye\\r\\n" and c.closed

The module need not be installed: the one given is registered beside the
installed ones (replacing an installed module of the same name).
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from afpa.config import Settings
from afpa.machine.modules import ProtocolModule, Registry
from afpa.net.helpers import InlineHelpers
from afpa.net.intrinsics import default_registry
from afpa.server import Server

START_TIME = 1_800_000_000.0  # a plausible "now" for the fake clock


@attrs.define(eq=False)
class MemoryConnection:
    """One client connection on an in-memory transport."""

    protocol: Any   # afpa.net.stream.MachineProtocol
    transport: StringTransport

    def send(self, data: bytes) -> None:
        """Bytes from the client (one read's worth)."""
        self.protocol.dataReceived(data)

    def received(self) -> bytes:
        """Everything the server wrote since the last call."""
        out = self.transport.value()
        self.transport.clear()
        return out

    @property
    def closed(self) -> bool:
        """Whether the server closed (or is closing) the connection."""
        return bool(self.transport.disconnecting or self.protocol.conn.closed)

    def hang_up(self) -> None:
        """The client goes away."""
        self.protocol.connectionLost(Failure(ConnectionDone()))

    @property
    def conn(self) -> Any:
        """The connection scope (:class:`afpa.machine.scopes.Connection`) its states see."""
        return self.protocol.conn


class MemoryServer:
    """A server running ``module`` (or the installed module ``Settings.module``
    names) on a :class:`~twisted.internet.task.Clock`, with helper work done
    inline.  ``settings`` are :class:`afpa.config.Settings` fields
    (``module_settings=``, ``table=``, ``idle_timeout=`` ...)."""

    def __init__(self, module: ProtocolModule | None = None, *, registry: Registry | None = None,
                 **settings: Any):
        self.registry = registry or default_registry()
        if module is not None:
            self.registry.modules[module.name] = module
            settings.setdefault("module", module.name)
        self.clock = Clock()
        self.clock.advance(START_TIME)
        self.settings = Settings(**settings)
        self.server = Server(self.settings, reactor=self.clock, helpers=InlineHelpers(),
                             registry=self.registry)

    @property
    def g(self) -> Any:
        """The module's global scope."""
        return self.server.g

    @property
    def cache(self) -> Any:
        """The runtime's cache store (:class:`afpa.cache.store.CacheStore`)."""
        return self.server.runtime.cache

    def connect(self) -> MemoryConnection:
        """Accept a client connection (a speaks-first module has already spoken)."""
        proto = self.server.factory().buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return MemoryConnection(proto, transport)

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, then run the server's once-a-second sweep
        (timeouts, the module's sweep)."""
        self.clock.advance(seconds)
        self.server.sweep()

    def counts(self) -> dict[str, int]:
        """How often each state of the client machine ran so far."""
        m = self.server.machine
        return {name: m.entries[st.index] for name, st in m.states.items()}
