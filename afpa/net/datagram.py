"""Datagram transports: the module's machine run once per datagram (UDP).

A stream connection runs its machine once per request parsed from a byte
stream; a datagram listener runs it once per datagram received.  Each datagram
gets a connection scope (:class:`DatagramConnection`) naming its peer, with the
datagram in ``conn.inbuf``, and a fresh request scope; the machine runs from its
start state to ``@done``/``@close`` exactly as on a stream (the same
:class:`~afpa.machine.driver.Driver`, counters, access log and traces).

The answer goes back as one datagram through the ordinary verb: the Send Engine
(``afpa.send_engine``) hands ``req.head`` to the connection's socket, which for
a datagram is a :class:`Reply` bound to the peer's address (one ``sendto`` on
the listening socket), so a module's send state is the same for both
transports and never sees a Twisted transport.

Fast path: a datagram answered without parking (a cache hit) reuses the
listener's one spare driver and connection scope: no Deferred, no timer, no
allocation beyond the request scope.  A datagram whose machine parks on a
Deferred (a miss) keeps its driver; the next datagram gets another spare (one
left by an answered miss, or a new one), so any number of datagrams are in
flight at once, each with its own scopes.

Outbound datagrams: a module that asks another server (DNS forwarding
upstream) gets a connected UDP socket per exchange, so the kernel drops
datagrams from any other address or port: a fresh one (:func:`open_datagram`),
or one leased from a pool of sockets on random source ports, each reused for a
few exchanges (:class:`DatagramPool`, RFC 5452: see there why the ports stay
unpredictable).
"""

from __future__ import annotations

import os
import random
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from afpa.machine.driver import Driver
from afpa.machine.scopes import Connection
from afpa.net.twisted_private import datagram_socket, listen_udp_one_read

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
        self.holding = False  # parked on a Deferred: this driver is the datagram's own
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
        self.holding = True

    def finished(self, req: Any, edge: Any) -> None:
        self._end(req)
        return None

    def failed(self) -> None:
        conn = self.conn
        req = conn.req
        if req is None:
            req = conn.req = self.new_request()
        if not req.sent_head:
            req.head, req.body, req.status = b"", None, 0
            conn.machine.module.fail(self.g, conn, req, "failed")
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
        if self.holding:
            self.holding = False
            endpoint.inflight -= 1
            # Its datagram is answered: the next one to park can have it
            # (nothing runs on this driver once finished() returns).
            if len(endpoint.idle) < endpoint.IDLE_DRIVERS:
                endpoint.idle.append(self)


class DatagramEndpoint(DatagramProtocol):
    """A datagram listener of a server: each datagram runs the server's current
    machine (a reload's new machine takes over from the next datagram)."""

    noisy = False
    IDLE_DRIVERS = 256  # drivers kept for reuse after a parked datagram (a miss) is answered

    def __init__(self, server: Any):
        self.server = server
        self.seconds = server.reactor.seconds
        self.spare: DatagramDriver | None = None
        self.idle: list[DatagramDriver] = []  # drivers whose parked datagram is answered
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
            d = self.spare = self.idle.pop() if self.idle else DatagramDriver(self)
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
            d.holding = False
            conn.req = None
        if d.holding:
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
    (one exchange, then :meth:`OutboundDatagram.close`; see :class:`DatagramPool`
    for the reused sockets a busy module wants)."""
    proto = OutboundDatagram(host, port, on_datagram, on_error)
    interface = "::" if ":" in host else ""
    proto.listening = reactor.listenUDP(0, proto, interface=interface)
    return proto


class _Pooled(OutboundDatagram):
    """A pool's connected socket: hands what it receives to its current lease."""

    def __init__(self, host: str, port: int):
        super().__init__(host, port, self._received, self._refused)
        self.lease: Lease | None = None
        self.uses = 0

    def _received(self, data: bytes) -> None:
        lease = self.lease
        if lease is not None and not lease.closed:
            lease.heard = True
            lease.on_datagram(data)

    def _refused(self, why: str) -> None:
        lease = self.lease
        if lease is not None and not lease.closed:
            lease.failed = True
            if lease.on_error is not None:
                lease.on_error(why)


class Lease:
    """One exchange on a pooled socket (what :meth:`DatagramPool.open` returns):
    the same verbs as :class:`OutboundDatagram` (``send``, ``close``,
    ``local_port``)."""

    __slots__ = ("pool", "sock", "on_datagram", "on_error", "closed", "heard", "failed")

    def __init__(self, pool: DatagramPool, sock: _Pooled, on_datagram: Callable[[bytes], None],
                 on_error: Callable[[str], None] | None):
        self.pool = pool
        self.sock = sock
        self.on_datagram = on_datagram
        self.on_error = on_error
        self.closed = False
        self.heard = False   # a datagram came back: nothing of this exchange is still on its way
        self.failed = False

    def send(self, data: bytes) -> bool:
        """Send one datagram to the peer; False when the socket would not take it."""
        return not self.closed and self.sock.send(data)

    def local_port(self) -> int:
        """The source port of this exchange."""
        return self.sock.local_port()

    def close(self) -> None:
        """End the exchange (idempotent): the socket goes back to the pool, or is
        closed when it may still get this exchange's late reply or refusal."""
        if not self.closed:
            self.closed = True
            self.pool._release(self.sock, self.heard and not self.failed)


class DatagramPool:
    """Outbound UDP sockets kept open and reused, each on a random source port.

    Opening a UDP socket through the reactor per exchange (bind, register,
    unregister, close, and Twisted's log lines) costs several times what the
    exchange itself does.  A pool keeps, per peer, idle sockets connected to it
    (the kernel drops datagrams from any other address or port, and passes on
    the peer's ICMP refusals); each exchange leases one at random and has it to
    itself until it closes, so what arrives on it is that exchange's.

    Source ports stay unpredictable (RFC 5452 9.2): each socket is bound to
    port 0, so the kernel picks it at random from the ephemeral range; an
    exchange takes one of the idle sockets at random (``rng``, a
    ``SystemRandom`` in practice); a socket serves at most ``uses`` exchanges
    and is then closed, so its port is replaced by a new random one; and a
    socket whose exchange ended without a reply (a timeout: a late answer or
    refusal may still come) is closed rather than reused.  At most ``idle``
    sockets per peer wait in the pool; past that they are closed.
    """

    def __init__(self, reactor: Any, rng: Any, uses: int = 100, idle: int = 64):
        self.reactor = reactor
        self.rng = rng
        self.uses = uses
        self.idle_max = idle
        self.idle: dict[tuple[str, int], list[_Pooled]] = {}
        self.opened = 0  # sockets opened so far (for tests and the curious)

    def open(self, host: str, port: int, on_datagram: Callable[[bytes], None],
             on_error: Callable[[str], None] | None = None) -> Lease:
        """An exchange with ``host:port`` on a pooled socket (the runtime verb)."""
        idle = self.idle.get((host, port))
        if idle:
            i = self.rng.randrange(len(idle))
            idle[i], idle[-1] = idle[-1], idle[i]
            sock = idle.pop()
        else:
            sock = _Pooled(host, port)
            interface = "::" if ":" in host else ""
            sock.listening = listen_udp_one_read(self.reactor, sock, interface)
            self.opened += 1
        sock.uses += 1
        lease = sock.lease = Lease(self, sock, on_datagram, on_error)
        return lease

    def _release(self, sock: _Pooled, reusable: bool) -> None:
        sock.lease = None
        if reusable and sock.uses < self.uses and not sock.closed:
            idle = self.idle.setdefault((sock.host, sock.port), [])
            if len(idle) < self.idle_max:
                idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        """Close every idle socket (leased ones close when released)."""
        for idle in self.idle.values():
            for sock in idle:
                sock.close()
        self.idle.clear()


class BufferedSystemRandom(random.SystemRandom):
    """``random.SystemRandom`` reading the kernel's random bytes 4 KiB at a time.

    Each draw of ``SystemRandom`` is an ``os.urandom`` system call; a forwarder
    draws several per upstream query (its ID, the 0x20 case of its name, the
    source socket).  These are the same bytes from the same kernel CSPRNG, only
    fetched in bulk; a forked child drops what its parent had buffered, so
    workers never share them."""

    _BUFFER = 4096

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        super().__init__()
        _BUFFERED.add(self)

    def _bytes(self, n: int) -> bytes:
        pos = self._pos
        if pos + n > len(self._buf):
            self._buf = os.urandom(max(self._BUFFER, n))
            pos = 0
        self._pos = pos + n
        return self._buf[pos:pos + n]

    def random(self) -> float:
        """A float in [0, 1) with 53 random bits."""
        return (int.from_bytes(self._bytes(7)) >> 3) * (2.0 ** -53)

    def getrandbits(self, k: int) -> int:
        """``k`` random bits as an int."""
        if k < 0:
            raise ValueError("number of bits must be non-negative")
        n = (k + 7) // 8
        return int.from_bytes(self._bytes(n)) >> (n * 8 - k)

    def _forget(self) -> None:
        self._buf = b""
        self._pos = 0


_BUFFERED: weakref.WeakSet[BufferedSystemRandom] = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [r._forget() for r in list(_BUFFERED)])

_POOLS: dict[Any, DatagramPool] = {}


def shared_pool(reactor: Any) -> DatagramPool:
    """The process's pool of outbound UDP sockets on ``reactor`` (one for every
    machine generation: a reload's new machine goes on with the same sockets)."""
    pool = _POOLS.get(reactor)
    if pool is None:
        pool = _POOLS[reactor] = DatagramPool(reactor, BufferedSystemRandom())
    return pool
