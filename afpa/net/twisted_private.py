"""Every use of Twisted's private internals, in this one module.

The fast path leans on things Twisted does not promise:

- a TCP transport's send buffer (``_tempDataLen``, ``dataBuffer``, ``offset``,
  ``connected``, ``disconnecting``) and its ``socket``: :func:`push` hands bytes
  straight to the socket when the transport holds nothing (one ``sendmsg``, no
  reactor round trip), :func:`push_file` does the same for a memory file's
  bytes with ``sendfile`` (no copy), and :func:`queued` says how much a client has not taken
  yet (the Send Engine's output bound);
- the epoll reactor's ``_poller``, ``_selectables`` and ``_doReadOrWrite``:
  :func:`epoll_reactor_class` drops the logging context Twisted builds per event;
- a TCP transport's ``connectionLost`` called directly: :func:`close_now`
  closes a connection with nothing queued at once instead of a reactor turn later;
- ``tcp.Port``/``tcp.Server`` internals (``numberAccepts``, ``sessionno``,
  ``_fromListeningDescriptor``, the reactor's ``_disconnectSelectable``) and the
  listening socket: :func:`listen_tcp` and :func:`adopt_stream_port` accept with
  a lean loop that reads a new connection's request at once (one connection per
  request: answered and closed without ever entering the poller), and
  :func:`nodelay_listener` sets TCP_NODELAY once on the listening socket.

They are used only on the Twisted versions they were verified on
(:data:`VERIFIED`) and unless the environment sets ``AFPA_NO_TWISTED_PRIVATES=1``
(read once, at import: the reactor is chosen before any configuration is
read).  Otherwise the public path is used: no connection gets a socket for
direct writes, so every byte goes through ``transport.write``; the output bound
waits, through a pull producer, for the transport to drain after a response it
did not send at once; Twisted's own epoll reactor, listening ports and
``loseConnection`` run, and each connection sets TCP_NODELAY.  :func:`describe` is the
startup log line saying which path is in use.

A direct write must never overtake bytes the transport still holds: :func:`push`
writes only when the transport's buffers are empty, which
``tests/integration/test_write_order.py`` checks on real sockets with both paths.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import twisted
from twisted.internet import main
from twisted.internet.abstract import FileDescriptor
from twisted.python.failure import Failure

#: Twisted versions (year, month) the private path was verified on: [from, below).
#: Verified with the test suite on Twisted 26.10.0; widen it only after running
#: tests/unit and tests/integration/test_write_order.py on the new version.
VERIFIED = ((26, 0), (27, 0))
OFF_SWITCH = "AFPA_NO_TWISTED_PRIVATES"
# The reason every orderly close gives, made once (Twisted's loseConnection
# shares one the same way).
_CONNECTION_DONE = Failure(main.CONNECTION_DONE)


def _version(text: str) -> tuple[int, int]:
    parts = (text.split(".") + ["0"])[:2]
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except ValueError:
        return (0, 0)


def _decide() -> tuple[bool, str]:
    if os.environ.get(OFF_SWITCH, "") not in ("", "0"):
        return False, f"{OFF_SWITCH} is set"
    have = _version(twisted.__version__)
    low, high = VERIFIED
    if not low <= have < high:
        return False, (f"Twisted {twisted.__version__} is outside the verified "
                       f"{low[0]}.{low[1]}-{high[0]}.{high[1]} range")
    return True, f"Twisted {twisted.__version__}"


ENABLED, _WHY = _decide()


def enabled() -> bool:
    """Whether the private fast path is in use."""
    return ENABLED


def set_enabled(on: bool) -> None:
    """Switch the path for connections made from now on (tests).  The reactor,
    once installed, stays what it is."""
    global ENABLED, _WHY
    ENABLED, _WHY = (on, "forced on") if on else (False, "switched off")


def describe() -> str:
    """One line for the startup log: which send path is in use, and why."""
    if ENABLED:
        return f"send path: direct socket writes and lean epoll reactor (Twisted privates; {_WHY})"
    return f"send path: Twisted public API only ({_WHY})"


# -- the send buffer ------------------------------------------------------------

def direct_socket(transport: Any) -> Any:
    """The socket bytes may be written to directly for ``transport`` (a plain TCP
    transport), or None: then every byte goes through the transport."""
    if not ENABLED:
        return None
    sock = getattr(transport, "socket", None)
    if sock is None or not hasattr(transport, "_tempDataLen"):
        return None
    return sock


def push(conn: Any, bufs: list) -> list:
    """Hand ``bufs`` to ``conn``'s socket now if its transport holds nothing.

    Returns what the socket did not take (the first item possibly cut), or
    ``bufs`` itself when a direct write is not possible (no direct socket: TLS,
    the public path; bytes still buffered, which must go first).
    """
    sock = conn.sock
    t = conn.transport
    if sock is None or t._tempDataLen or t.dataBuffer or not t.connected or t.disconnecting:
        return bufs
    try:
        n = sock.sendmsg(bufs) if len(bufs) > 1 else sock.send(bufs[0])
    except (BlockingIOError, InterruptedError):
        return bufs
    except OSError:
        return bufs  # let the transport meet the error and report the loss
    i = 0
    for b in bufs:
        if n < len(b):
            break
        n -= len(b)
        i += 1
    if i == len(bufs):
        return []
    rest = bufs[i:]
    if n:
        rest[0] = rest[0][n:]
    return rest


def close_now(conn: Any) -> bool:
    """Close ``conn``'s plain TCP transport at once if it holds no bytes, and say
    whether it did (False: the caller uses ``loseConnection``).

    ``loseConnection`` with nothing queued still costs a reactor turn: it
    re-registers the socket for writing, waits for the write event, writes
    nothing and only then closes.  Here the transport's own ``connectionLost``
    runs now: the socket leaves the poller, is shut down and closed (every byte
    already handed to the kernel still goes out, then the FIN, as with
    Twisted's orderly close) and the protocol's ``connectionLost`` is called,
    once (Twisted's guards it).  The caller must be inside this connection's
    own read event: a descriptor number closed during another one's event
    could be reused by an accept before a stale event for it in the same
    poll is handled."""
    if conn.sock is None:
        return False  # the public path, or TLS
    t = conn.transport
    if t._tempDataLen or t.dataBuffer or t.producer is not None or not t.connected or t.disconnecting:
        return False
    t.disconnecting = 1
    t.connectionLost(_CONNECTION_DONE)
    return True


def nodelay_listener(port: Any) -> bool:
    """Set TCP_NODELAY on listening ``port``'s socket, so that (on Linux) every
    accepted socket has it without a ``setsockopt`` of its own; True if set.
    Whether it was really passed on is checked on the first accepted socket
    (:func:`set_nodelay`).  Public path: False (each connection sets it)."""
    sock = getattr(port, "socket", None) if ENABLED else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return False
    return True


def set_nodelay(factory: Any, transport: Any) -> None:
    """TCP_NODELAY for a connection ``factory`` accepted.

    ``factory.nodelay_inherited``: False, set it on each connection; None, the
    listener has it (:func:`nodelay_listener`) and this connection tells whether
    accepted sockets inherit it (then True: nothing to do from now on; else
    False)."""
    if factory.nodelay_inherited is None:
        sock = getattr(queue_of(transport), "socket", None)
        try:
            inherited = sock is not None and bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        except OSError:
            inherited = False
        factory.nodelay_inherited = inherited
        if inherited:
            return
    if hasattr(transport, "setTcpNoDelay"):
        transport.setTcpNoDelay(True)

sendfile = os.sendfile  # a module global: tests put a scripted one in its place
MSG_MORE = getattr(socket, "MSG_MORE", 0)


def push_file(conn: Any, head: bytes, fd: int, offset: int, count: int) -> int:
    """Hand ``head`` then ``count`` bytes of file ``fd`` from ``offset`` to
    ``conn``'s socket now (``sendfile``: the kernel takes the file's pages, no
    copy) if its transport holds nothing.  Returns the bytes taken, head
    included: 0 when a direct write is not possible (see :func:`push`), less
    than the whole when the socket filled up (the head possibly cut, then no
    file bytes were sent)."""
    sock = conn.sock
    t = conn.transport
    if sock is None or t._tempDataLen or t.dataBuffer or not t.connected or t.disconnecting:
        return 0
    sent = 0
    try:
        if head:
            # MSG_MORE: the head waits to share a segment with the body's first bytes.
            sent = sock.send(head, MSG_MORE)
            if sent < len(head):
                return sent
        # One call: a short count means the socket is full, and asking again
        # would only meet EAGAIN.
        sent += sendfile(sock.fileno(), fd, offset, count)
    except OSError:
        pass  # full (EAGAIN), or an error the transport meets and reports
    return sent


def queue_of(t: Any) -> Any:
    """The transport that buffers the bytes (TCP under TLS), or None if unknown."""
    if ENABLED:
        while not hasattr(t, "_tempDataLen"):
            t = getattr(t, "transport", None)
            if t is None:
                return None
        return t
    while not isinstance(t, FileDescriptor):
        t = getattr(t, "transport", None)
        if t is None:
            return None
    return t


def queued(t: Any) -> int | None:
    """Bytes written to transport ``t`` and not yet taken by the socket; None
    when that cannot be known (the public path: a pull producer registered on
    :func:`queue_of` is called once the transport has drained)."""
    q = queue_of(t)
    if q is None:
        return 0  # an in-memory transport: nothing is held back
    if not ENABLED:
        return None
    return q._tempDataLen + len(q.dataBuffer) - q.offset


def datagram_socket(port: Any) -> Any:
    """The socket of a listening UDP ``port`` for direct ``sendto`` of replies, or
    None (then replies go through ``port.write``).  ``port.write`` checks the
    address's form three times per datagram; a reply goes to the address the
    query came from, which the kernel gave us, so those checks are spared."""
    if not ENABLED:
        return None
    sock = getattr(port, "socket", None)
    return sock if sock is not None and hasattr(sock, "sendto") else None


def listen_udp_one_read(reactor: Any, proto: Any, interface: str = "") -> Any:
    """``reactor.listenUDP(0, proto, interface=...)`` whose port reads one datagram
    per readiness event instead of reading until the socket says EAGAIN.

    For an outbound exchange's socket, which expects one reply: Twisted's loop
    pays a second ``recvfrom`` and an exception per reply to learn there is
    nothing more; epoll is level-triggered, so a second datagram still wakes
    the reactor.  Public path: Twisted's own port."""
    from twisted.internet.posixbase import PosixReactorBase
    if not ENABLED or not isinstance(reactor, PosixReactorBase):  # the public path; a test's fake
        return reactor.listenUDP(0, proto, interface=interface)
    port = _one_read_port_class()(0, proto, interface, reactor=reactor)
    port.startListening()
    return port


_ONE_READ_PORT: Any = None
_LISTEN_PORT: Any = None
READ_BATCH = 256  # datagrams a listening port reads per wakeup before the reactor looks elsewhere


def listen_udp(reactor: Any, port: int, proto: Any, interface: str = "", max_packet: int = 65535) -> Any:
    """``reactor.listenUDP`` for a busy listener: its read loop hands each
    datagram to the protocol with the lookups done once per wakeup, not once
    per datagram (Twisted's loop re-reads attributes and the address family
    per datagram).  At most :data:`READ_BATCH` datagrams per wakeup, so other
    sockets get their turn.  Public path: Twisted's own port."""
    from twisted.internet.posixbase import PosixReactorBase
    if not ENABLED or not isinstance(reactor, PosixReactorBase):
        return reactor.listenUDP(port, proto, interface=interface, maxPacketSize=max_packet)
    global _LISTEN_PORT
    if _LISTEN_PORT is None:
        import socket as _socket

        from twisted.internet import udp
        from twisted.logger import Logger
        log = Logger(namespace="afpa.net.datagram")
        ignore, refuse = tuple(udp._sockErrReadIgnore), tuple(udp._sockErrReadRefuse)

        class ListenPort(udp.Port):
            """A UDP listening port with a lean read loop."""

            def doRead(self) -> None:  # noqa: N802 - Twisted's name
                recv = self.socket.recvfrom
                size = self.maxPacketSize
                received = self.protocol.datagramReceived
                v6 = self.addressFamily == _socket.AF_INET6
                for _ in range(READ_BATCH):
                    try:
                        data, addr = recv(size)
                    except OSError as exc:
                        if exc.args[0] in ignore or exc.args[0] in refuse:
                            return
                        raise
                    if v6:
                        addr = addr[:2]
                    try:
                        received(data, addr)
                    except Exception:
                        log.failure("datagram handler raised")

        _LISTEN_PORT = ListenPort
    p = _LISTEN_PORT(port, proto, interface, max_packet, reactor)
    p.startListening()
    return p


def _one_read_port_class() -> Any:
    global _ONE_READ_PORT
    if _ONE_READ_PORT is None:
        from twisted.internet import udp
        from twisted.logger import Logger
        log = Logger(namespace="afpa.net.datagram")

        class OneReadPort(udp.Port):
            """A UDP port reading one datagram per readiness event."""

            def doRead(self) -> None:  # noqa: N802 - Twisted's name
                try:
                    data, addr = self.socket.recvfrom(self.maxPacketSize)
                except OSError as exc:
                    no = exc.args[0]
                    if no in udp._sockErrReadIgnore:
                        return
                    if no in udp._sockErrReadRefuse:
                        if self._connectedAddr:
                            self.protocol.connectionRefused()
                        return
                    raise
                try:
                    self.protocol.datagramReceived(data, addr[:2])
                except Exception:
                    log.failure("datagram handler raised")

        _ONE_READ_PORT = OneReadPort
    return _ONE_READ_PORT


# -- the accept loop ----------------------------------------------------------------

_LEAN_PORT: Any = None
# Connections one accept wakeup takes at most.  Each is read and often answered
# there and then, so an unbounded batch (Twisted's grows by 20 whenever it is
# filled) would keep every open connection waiting; the listener stays ready
# (level-triggered), so the rest are accepted on the next turn.
ACCEPT_BATCH = 32


def listen_tcp(reactor: Any, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
    """``reactor.listenTCP`` with a lean accept loop (:func:`_lean_port_class`),
    for afpa's own factories only: they ignore the address ``buildProtocol`` is
    given (a connection looks its peer up from the transport when it needs it).
    Public path (or a test's fake reactor): Twisted's own port."""
    from twisted.internet.posixbase import PosixReactorBase
    if not ENABLED or not isinstance(reactor, PosixReactorBase):
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)
    p = _lean_port_class()(port, factory, backlog, interface, reactor)
    p.startListening()
    return p


def adopt_stream_port(reactor: Any, fd: int, family: int, factory: Any) -> Any:
    """``reactor.adoptStreamPort`` (a TCP listener bound elsewhere, e.g. by a
    worker's supervisor) with the lean accept loop; as :func:`listen_tcp`."""
    from twisted.internet.posixbase import PosixReactorBase
    if (not ENABLED or not isinstance(reactor, PosixReactorBase)
            or family not in (socket.AF_INET, socket.AF_INET6)):
        return reactor.adoptStreamPort(fd, family, factory)
    p = _lean_port_class()._fromListeningDescriptor(reactor, fd, family, factory)
    p.startListening()
    return p


def _lean_port_class() -> Any:
    """A ``tcp.Port`` whose accept loop does per connection only what afpa needs.

    Twisted's loop buffers log events in a context per wakeup, accepts through a
    generator and ``socket.accept`` (which converts the family and type to enums
    per call), builds an address object for ``buildProtocol``, and its transport
    formats a log prefix and a repr per connection.  Here: ``_accept`` and a
    socket made with the listener's family; no address object (afpa's factories
    ignore it); the log prefix and repr are made if asked for.  Any accept error
    but "nothing more" is left to Twisted's own loop (it knows EMFILE recovery
    and what to log)."""
    global _LEAN_PORT
    if _LEAN_PORT is not None:
        return _LEAN_PORT
    from errno import EAGAIN, EPERM, EWOULDBLOCK

    from twisted.internet import tcp
    from twisted.logger import Logger
    log = Logger(namespace="afpa.net.accept")
    again = (EAGAIN, EWOULDBLOCK)

    class LeanServer(tcp.Server):
        """``tcp.Server`` without per-connection strings (made when asked for)."""

        def __init__(self, skt: Any, protocol: Any, client: Any, server: Any, sessionno: int,
                     reactor: Any) -> None:
            FileDescriptor.__init__(self, reactor)
            self.socket = skt
            skt.setblocking(False)
            self.fileno = skt.fileno
            self.protocol = protocol
            if len(client) != 2:
                self._addressType = tcp.address.IPv6Address
            self.server = server
            self.client = client
            self.sessionno = sessionno
            self.hostname = client[0]
            self.connected = 1
            # Not registered with the poller yet: the accept loop reads first
            # (see LeanPort.doRead) and registers only a connection that stays
            # open; until then start/stopReading only note what is wanted.
            self.read_later = True
            self.want_read = True

        def startReading(self) -> None:  # noqa: N802 - Twisted's name
            if self.read_later:
                self.want_read = True
            else:
                FileDescriptor.startReading(self)

        def stopReading(self) -> None:  # noqa: N802 - Twisted's name
            if self.read_later:
                self.want_read = False
            else:
                FileDescriptor.stopReading(self)

        @property
        def logstr(self) -> str:  # type: ignore[override]
            proto = getattr(self, "protocol", None)
            prefix = self._getLogPrefix(proto) if proto is not None else "-"
            return f"{prefix},{self.sessionno},{self.hostname}"

        def __repr__(self) -> str:
            proto = getattr(self, "protocol", None)
            return f"<{type(proto).__name__} #{self.sessionno} on {self.server._realPortNumber}>"

    class LeanPort(tcp.Port):
        """A TCP listening port with a lean accept loop."""

        transport = LeanServer

        def doRead(self) -> None:  # noqa: N802 - Twisted's name
            accept = self.socket._accept
            family = int(self.addressFamily)
            build = self.factory.buildProtocol
            make = self.transport
            reactor = self.reactor
            accepted = 0
            limit = min(self.numberAccepts, ACCEPT_BATCH)
            try:
                for _ in range(limit):
                    try:
                        fd, addr = accept()
                    except OSError as exc:
                        if exc.args[0] in again:
                            break
                        if exc.args[0] == EPERM:  # netfilter refused it: try the next one
                            continue
                        tcp.Port.doRead(self)  # EMFILE and the rest: Twisted's loop handles them
                        return
                    accepted += 1
                    skt = socket.socket(family, socket.SOCK_STREAM, 0, fd)
                    if len(addr) == 4:  # IPv6: the scope id as Twisted gives it
                        host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                        addr = (host[0], *addr[1:])
                    protocol = build(None)
                    if protocol is None:
                        skt.close()
                        continue
                    s = self.sessionno
                    self.sessionno = s + 1
                    transport = make(skt, protocol, addr, self, s, reactor)
                    protocol.makeConnection(transport)
                    # The request is usually in already (the client sends it
                    # as soon as its connect returns, while the connection
                    # waits in the backlog): read it now, not after a poll.
                    # A connection answered and closed right here never
                    # enters the poller at all.
                    why = None
                    if transport.connected and not transport.disconnecting and transport.want_read:
                        try:
                            why = transport.doRead()
                        except Exception as exc:
                            log.failure("reading a new connection failed")
                            why = exc
                    transport.read_later = False
                    if why:
                        reactor._disconnectSelectable(transport, why, True)
                    elif transport.want_read and transport.connected and not transport.disconnecting:
                        FileDescriptor.startReading(transport)
            except Exception:
                log.failure("accepting a connection failed")
            # Twisted's scaling of the accept batch, within ACCEPT_BATCH.
            self.numberAccepts = min(limit + 20, ACCEPT_BATCH) if accepted == limit else max(1, accepted)

    _LEAN_PORT = LeanPort
    return LeanPort


# -- the reactor ------------------------------------------------------------------

def epoll_reactor_class() -> Any:
    """Twisted's epoll reactor without the per-event logging context (about a
    tenth of a cache hit's time), or None on the public path (or without epoll)."""
    if not ENABLED:
        return None
    try:
        from twisted.internet import epollreactor
    except ImportError:  # not Linux
        return None
    from twisted.logger import Logger
    log = Logger(namespace="afpa.net.reactor")

    class AfpaEPollReactor(epollreactor.EPollReactor):
        """EPollReactor calling each ready descriptor's handler directly."""

        def doPoll(self, timeout: float | None) -> None:
            try:
                events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
            except InterruptedError:
                return
            selectables = self._selectables
            handle = self._doReadOrWrite
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue
                try:
                    handle(selectable, fd, event)
                except Exception:
                    # What Twisted's wrapper would have logged, per descriptor.
                    log.failure("unexpected error handling descriptor {fd}", fd=fd)

        doIteration = doPoll

    return AfpaEPollReactor
