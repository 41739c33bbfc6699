"""Every use of Twisted's private internals, in this one module.

The fast path leans on three things Twisted does not promise:

- a TCP transport's send buffer (``_tempDataLen``, ``dataBuffer``, ``offset``,
  ``connected``, ``disconnecting``) and its ``socket``: :func:`push` hands bytes
  straight to the socket when the transport holds nothing (one ``sendmsg``, no
  reactor round trip), :func:`push_file` does the same for a memory file's
  bytes with ``sendfile`` (no copy), and :func:`queued` says how much a client has not taken
  yet (the Send Engine's output bound);
- the epoll reactor's ``_poller``, ``_selectables`` and ``_doReadOrWrite``:
  :func:`epoll_reactor_class` drops the logging context Twisted builds per event.

They are used only on the Twisted versions they were verified on
(:data:`VERIFIED`) and unless the environment sets ``AFPA_NO_TWISTED_PRIVATES=1``
(read once, at import: the reactor is chosen before any configuration is
read).  Otherwise the public path is used: no connection gets a socket for
direct writes, so every byte goes through ``transport.write``; the output bound
waits, through a pull producer, for the transport to drain after a response it
did not send at once; Twisted's own epoll reactor runs.  :func:`describe` is the
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
from twisted.internet.abstract import FileDescriptor

#: Twisted versions (year, month) the private path was verified on: [from, below).
#: Verified with the test suite on Twisted 26.10.0; widen it only after running
#: tests/unit and tests/integration/test_write_order.py on the new version.
VERIFIED = ((26, 0), (27, 0))
OFF_SWITCH = "AFPA_NO_TWISTED_PRIVATES"


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
