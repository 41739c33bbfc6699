"""Datagram transports: the module's machine run once per datagram (UDP).

A stream connection runs its machine once per request parsed from a byte
stream; a datagram listener runs it once per datagram received.  Each datagram
gets a connection scope (:class:`DatagramConnection`) naming its peer, with the
datagram in ``conn.inbuf``, and a fresh request scope; the machine runs from its
start state to ``@done``/``@close`` exactly as on a stream (the same
:class:`~afpa.machine.driver.Driver`, counters, access log and traces).

The answer goes back as one datagram through the ordinary verb: the Send Engine
(``afpa.send_engine``) writes ``req.head`` to ``conn.transport``, which for a
datagram is a :class:`Reply` bound to the peer's address, so a module's send
state is the same for both transports and never sees a Twisted transport.

Fast path: a datagram answered without parking (a cache hit) reuses the
listener's one spare driver and connection scope: no Deferred, no timer, no
allocation beyond the request scope.  A datagram whose machine parks on a
Deferred (a miss) keeps its driver; the next datagram gets a new spare, so any
number of datagrams are in flight at once, each with its own scopes.

Outbound datagrams (:func:`open_datagram`): a module that asks another server
(DNS forwarding upstream) gets a fresh connected UDP socket per exchange, so
every query leaves from a new ephemeral port (RFC 5452) and the kernel drops
datagrams from any other address or port.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import attrs
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from afpa.machine.driver import Driver
from afpa.machine.scopes import Connection
from afpa.net.twisted_private import datagram_socket

log = Logger(namespace="afpa.net.datagram")


class Reply:
    """What a datagram connection's ``transport`` is: writes go back to the peer
    as one datagram.

    It is also the connection's ``sock``: the Send Engine hands a reply to
    :meth:`send` (one ``sendto``, no joining, no queue) the way it hands a
    stream response straight to a TCP socket, since a datagram transport never
    holds bytes back (the class attributes below say so to the engine's push).
    """

    __slots__ = ("sendto", "addr")

    # What the Send Engine's direct push reads of a transport: nothing queued.
    _tempDataLen = 0
    dataBuffer = b""
    connected = True
    disconnecting = False

    def __init__(self, sendto: Callable[[bytes, Any], Any], addr: tuple[str, int]):
        self.sendto = sendto  # the port socket's sendto, or the port's write
        self.addr = addr

    def send(self, data: bytes) -> int:
        """Send ``data`` to the peer as one datagram; returns its length (a
        datagram is sent whole or lost: errors are the peer's loss)."""
        try:
            self.sendto(data, self.addr)
        except OSError as exc:  # e.g. EMSGSIZE, ENOBUFS, EAGAIN: nothing to retry on UDP
            log.debug("datagram to {addr} not sent: {exc}", addr=self.addr, exc=exc)
        except Exception as exc:  # noqa: BLE001 - Twisted's write: MessageLengthError and the like
            log.debug("datagram to {addr} not sent: {exc}", addr=self.addr, exc=exc)
        return len(data)

    def write(self, data: bytes) -> None:
        """Send ``data`` to the peer as one datagram."""
        self.send(data)

    def sendmsg(self, data: list[bytes]) -> int:
        """Send the pieces as one datagram."""
        return self.send(b"".join(data))

    def writeSequence(self, data: list[bytes]) -> None:  # noqa: N802 - the transport interface
        """Send the pieces as one datagram."""
        self.send(data[0] if len(data) == 1 else b"".join(data))

    def getPeer(self) -> Any:  # noqa: N802
        """The peer (host, port), as a transport would give it."""
        return _Addr(*self.addr)

    def loseConnection(self) -> None:  # noqa: N802 - nothing to close on a datagram
        """A datagram has no connection to close."""

    abortConnection = loseConnection  # noqa: N815


def _sender(port: Any) -> Callable[[bytes, Any], Any]:
    """How replies leave through listening ``port``: its socket's ``sendto`` when
    the Twisted privates are in use, else the port's own ``write``."""
    sock = datagram_socket(port)
    return sock.sendto if sock is not None else port.write


@attrs.define(slots=True, frozen=True)
class _Addr:
    host: str
    port: int


@attrs.define(slots=True, eq=False)
class DatagramConnection(Connection):
    """The connection scope of one datagram: ``addr`` is the peer ``(host, port)``,
    ``inbuf`` the datagram."""

    kind: ClassVar[str] = "datagram"
    addr: tuple[str, int] = ("", 0)


class DatagramDriver(Driver):
    """Runs the machine for one datagram at a time (reused while nothing parks)."""

    answer_fn = None

    def __init__(self, endpoint: DatagramEndpoint):
        self.endpoint = endpoint
        self.g = endpoint.server.g
        self.seconds = endpoint.seconds
        self.parked = False
        reply = Reply(_sender(endpoint.transport), ("", 0))
        self.conn = DatagramConnection(reply, None, None, sock=reply)
        self.conn.driver = self
        self.conn.listener = "datagram"
        self.make_request: Any = None

    # -- driver hooks ---------------------------------------------------------

    def gone(self) -> bool:
        return False  # a datagram's peer cannot hang up; the answer is still due

    def new_request(self) -> Any:
        req = self.make_request(self.conn)
        req.started = self.seconds()
        return req

    def waiting(self) -> None:
        # A datagram is the whole input: a state asking for more never gets it.
        conn = self.conn
        log.error("machine {machine} state {state} waits for more input on a datagram (peer {peer})",
                  machine=conn.machine.name, state=conn.state.name, peer=conn.peer_label)
        conn.machine.errors[conn.state.index] += 1
        self._end(conn.req)

    def suspended(self) -> None:
        self.parked = True

    def finished(self, req: Any, close: bool) -> None:
        self._end(req)
        return None

    def failed(self) -> None:
        conn = self.conn
        req = conn.req
        if req is None:
            req = conn.req = self.new_request()
        if not req.sent_head:
            req.head, req.body, req.status = b"", None, 0
            conn.machine.module.fail(self.g, conn, req, 500)
            if req.head:
                conn.transport.write(req.head)
                req.sent_head = True
        self._end(req)

    def trace_finished(self, req: Any, now: float) -> None:
        if req.status:
            self.endpoint.server.traced(self.conn, req, now)

    def _end(self, req: Any) -> None:
        conn = self.conn
        endpoint = self.endpoint
        if req is not None and req.status:
            now = self.seconds()
            endpoint.stats.observe(req.status, now - req.started)
            access_log = endpoint.server.access_log
            if access_log is not None:
                access_log.request(conn, req, now)
        conn.req = None
        conn.requests += 1
        if self.parked:
            self.parked = False
            endpoint.inflight -= 1


class DatagramEndpoint(DatagramProtocol):
    """A datagram listener of a server: each datagram runs the server's current
    machine (a reload's new machine takes over from the next datagram)."""

    noisy = False

    def __init__(self, server: Any):
        self.server = server
        self.seconds = server.reactor.seconds
        self.spare: DatagramDriver | None = None
        self.inflight = 0        # datagrams whose machine is parked
        self.received = 0
        self.trace_all = server.trace_all
        self._machine: Any = None
        self.stats: Any = None

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # noqa: N802 - Twisted's name
        self.received += 1
        server = self.server
        machine = server.machine
        if machine is not self._machine:
            self._machine = machine
            self.stats = server.stats_for(machine)
        d = self.spare
        if d is None:
            d = self.spare = DatagramDriver(self)
        conn = d.conn
        conn.transport.addr = conn.addr = addr
        conn.peer_label = ""  # made from addr when something asks (most datagrams never do)
        conn.inbuf = data
        conn.inpos = conn.scan = 0
        conn.machine = machine
        conn.state = machine.start
        conn.req = None
        d.g = server.g
        d.make_request = machine.module.make_request
        try:
            if self.trace_all:
                d.trace_all = True  # run_traced then traces every new request
                d.run_traced(machine.start, None)
            else:
                d.run(machine.start, None)
        except Exception:  # the driver contains state failures; this is a last resort
            log.failure("datagram from {peer} broke the driver", peer=conn.peer_label)
            d.parked = False
            conn.req = None
        if d.parked:
            # The machine waits on a Deferred: this driver belongs to that datagram now.
            self.spare = None
            self.inflight += 1


class OutboundDatagram(DatagramProtocol):
    """One exchange with a peer over its own connected UDP socket.

    ``on_datagram(data)`` is called for each datagram the peer sends (the kernel
    drops those from any other address or port; a datagram whose source differs
    anyway is ignored), ``on_error(reason)`` when the peer's host refuses (ICMP
    port unreachable).  :meth:`close` releases the socket."""

    noisy = False

    def __init__(self, host: str, port: int, on_datagram: Callable[[bytes], None],
                 on_error: Callable[[str], None] | None = None):
        self.host = host
        self.port = port
        self.on_datagram = on_datagram
        self.on_error = on_error
        self.closed = False
        self.listening: Any = None

    def startProtocol(self) -> None:  # noqa: N802
        self.transport.connect(self.host, self.port)

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # noqa: N802
        if self.closed or (addr is not None and (addr[0], addr[1]) != (self.host, self.port)):
            return
        self.on_datagram(data)

    def connectionRefused(self) -> None:  # noqa: N802
        if not self.closed and self.on_error is not None:
            self.on_error("refused")

    def send(self, data: bytes) -> bool:
        """Send one datagram to the peer; False when the socket would not take it."""
        if self.closed:
            return False
        try:
            self.transport.write(data)
        except OSError:
            return False
        return True

    def local_port(self) -> int:
        """The ephemeral port the exchange sends from."""
        return self.transport.getHost().port

    def close(self) -> None:
        """Stop receiving and release the socket (idempotent)."""
        if not self.closed:
            self.closed = True
            if self.listening is not None:
                self.listening.stopListening()


def open_datagram(reactor: Any, host: str, port: int, on_datagram: Callable[[bytes], None],
                  on_error: Callable[[str], None] | None = None) -> OutboundDatagram:
    """A fresh connected UDP socket to ``host:port`` on a new ephemeral port
    (the runtime verb for a module's outbound datagrams)."""
    proto = OutboundDatagram(host, port, on_datagram, on_error)
    interface = "::" if ":" in host else ""
    proto.listening = reactor.listenUDP(0, proto, interface=interface)
    return proto
