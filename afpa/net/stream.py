"""Stream connections: the client-connection machine on a Twisted transport.

Twisted's protocol callbacks are the TCP hooks of the AFPA paper:
``connectionMade`` (SYN handled), ``dataReceived`` (data arrival), the Send
Engine's producer ``resumeProducing`` (send window open) and ``connectionLost``
(FIN/RST).  :class:`MachineProtocol` turns them into steps of the machine
(:class:`afpa.machine.driver.Driver`); input arriving while the machine is parked
is buffered (and reading paused past a limit), so pipelined requests are
answered strictly in order.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from afpa.net import sendengine, twisted_private
from afpa.machine.driver import Driver
from afpa.machine.scopes import Connection

INF = float("inf")


@implementer(IHandshakeListener)
class MachineProtocol(Protocol, Driver):
    """One client connection, driven by the machine that was current when it was
    accepted.

    While the machine is parked, a state may take over the connection's input
    and loss events by setting ``conn.sink`` (called with no argument after new
    bytes were appended to ``conn.inbuf``) and ``conn.on_lost`` (called with the
    reason): that is how a forwarded request body streams to a backend and how a
    deferred connection is spliced.
    """

    answer_fn = staticmethod(sendengine.send_engine)

    def __init__(self, server: Any):
        self.server = server
        self.g = server.g
        self.conn: Connection | None = None
        self.reading_paused = False
        self.seconds = server.reactor.seconds
        self.stats: Any = None
        self.make_request: Any = None
        self._next: Any = None  # (machine, g) a reload hands over after this request
        # The loop data arrival runs: run, or run_traced while every request is
        # traced (Server.set_trace_all); chosen here, not tested per request.
        self.trace_all = server.trace_all
        self.step = self.run_traced if self.trace_all else self.run

    # -- events ---------------------------------------------------------------

    def connectionMade(self) -> None:
        server = self.server
        # Machine and global scope are taken together, from one configuration
        # generation; a reload hands over both at once (see adopt).
        machine = server.machine
        self.g = server.g
        t = self.transport
        conn = self.conn = Connection(t, machine, machine.start)
        self.make_request = machine.module.make_request
        conn.driver = self
        conn.tls = getattr(self.factory, "tls", False)
        self.stats = server.stats_for(machine)
        # Direct socket writes only for plain TCP; TLS goes through its transport.
        if not conn.tls:
            conn.sock = twisted_private.direct_socket(t)
        if hasattr(t, "setTcpNoDelay"):
            t.setTcpNoDelay(True)
        if conn.tls:
            # Until the handshake completes (handshakeCompleted) only its own,
            # short deadline applies: a peer that never finishes it is closed.
            conn.deadline_kind = "handshake"
            conn.deadline = self.seconds() + server.settings.tls_handshake_timeout
        else:
            conn.deadline = self.seconds() + server.settings.idle_timeout
        server.connection_opened(self)
        if machine.module.speaks_first:
            # The server talks first (a greeting): the start state runs now,
            # with no input, as it otherwise would on the first bytes.
            self.step(conn.state, None)

    def handshakeCompleted(self) -> None:
        """TLS only (IHandshakeListener): the handshake is done; the idle deadline starts."""
        conn = self.conn
        if conn is not None and conn.deadline_kind == "handshake":
            conn.deadline_kind = "idle"
            conn.deadline = self.seconds() + self.server.settings.idle_timeout

    def dataReceived(self, data: bytes) -> None:
        conn = self.conn
        if conn.closed:
            return  # an answer closed the connection: no later byte is acted on
        if conn.inpos >= len(conn.inbuf):
            conn.inbuf = data
            conn.scan = 0
        else:
            conn.inbuf = conn.inbuf[conn.inpos:] + data
            conn.scan = max(0, conn.scan - conn.inpos)
        conn.inpos = 0
        if conn.busy:
            if conn.sink is not None:
                conn.sink()
            elif conn.unread() > self.server.limits.max_unread and not self.reading_paused:
                self.pause_reading()
            return
        self.step(conn.state, None)

    def connectionLost(self, reason: Failure = None) -> None:
        conn = self.conn
        if conn is not None and not conn.closed:
            conn.closed = True
            if conn.on_lost is not None:
                conn.on_lost(reason)
            if conn.req is not None:
                release(conn.req)
            self.server.connection_closed(self)
        # Also after our own close: a drain waits until the last byte is out.
        self.server.connection_lost(self)

    def pause_reading(self) -> None:
        """Stop reading from the client (its input is not being consumed)."""
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        """Read from the client again."""
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resumeProducing()

    # -- driver hooks ---------------------------------------------------------

    def discard(self, req: Any) -> None:
        release(req)

    def new_request(self) -> Any:
        req = self.make_request(self.conn)
        req.started = self.seconds()
        return req

    def waiting(self) -> None:
        conn = self.conn
        if conn.deadline_kind == "idle":
            conn.deadline_kind = "header"
            conn.deadline = self.seconds() + self.server.limits.message_timeout

    def suspended(self) -> None:
        conn = self.conn
        if conn.deadline_kind not in ("send", "backend", "tunnel"):
            conn.deadline_kind = "busy"
            conn.deadline = INF

    def resumed(self) -> None:
        conn = self.conn
        conn.sink = conn.on_lost = conn.on_timeout = None
        if conn.deadline_kind in ("busy", "backend"):
            conn.deadline_kind = "idle"

    def finished(self, req: Any, close: bool) -> Any:
        conn = self.conn
        now = self.seconds()
        if req.status:
            self.stats.observe(req.status, now - req.started)
            if self.server.access_log is not None:
                self.server.access_log.request(conn, req, now)
        conn.req = None
        conn.requests += 1
        machine = conn.machine
        if close or conn.closed or self.server.draining:
            conn.state = machine.start
            self._close()
            return None
        conn.state = machine.start
        conn.deadline_kind = "idle"
        if self.reading_paused:
            self.resume_reading()
        if conn.inpos >= len(conn.inbuf):
            conn.deadline = now + self.server.settings.idle_timeout
            return None
        return machine.start  # pipelined input is already here

    def failed(self) -> None:
        self.abort_request(500)

    # -- configuration reload -------------------------------------------------

    def adopt(self, machine: Any, g: Any) -> None:
        """A reload made ``machine`` and ``g`` current: take them up at once if
        the connection is between requests, else when the request in flight ends
        (it finishes on the machine it started on)."""
        conn = self.conn
        if conn is None or conn.closed:
            return
        if conn.req is None and not conn.busy and conn.state is conn.machine.start:
            self._switch(machine, g)
            return
        self._next = (machine, g)
        # An instance attribute shadows the method for this one request, so
        # connections that have nothing to take up pay nothing per request.
        self.finished = self._finish_then_switch  # type: ignore[method-assign]

    def _finish_then_switch(self, req: Any, close: bool) -> Any:
        del self.finished
        machine, g = self._next
        self._next = None
        state = MachineProtocol.finished(self, req, close)
        if self.conn.closed:
            return None
        self._switch(machine, g)
        if state is not None:
            # Pipelined input is waiting.  The caller's loop holds the old
            # machine's counters, so the new machine runs from here instead.
            self.step(self.conn.machine.start, None)
        return None

    def _switch(self, machine: Any, g: Any) -> None:
        conn = self.conn
        conn.machine = machine
        conn.state = machine.start
        self.g = g
        self.make_request = machine.module.make_request
        self.stats = self.server.stats_for(machine)

    def trace_finished(self, req: Any, now: float) -> None:
        if req.status:
            self.server.traced(self.conn, req, now)

    def drain(self) -> None:
        """The server is shutting down: close now if the connection is between
        requests, else let the request in flight finish and close after it (its
        response says ``Connection: close`` unless its head is already out)."""
        conn = self.conn
        if conn.closed:
            return
        req = conn.req
        if req is None or (not conn.busy and conn.state is conn.machine.start and conn.pending is None
                           and conn.inpos >= len(conn.inbuf)):
            self._close()
        elif not req.sent_head:
            req.close = True

    def _close(self) -> None:
        conn = self.conn
        conn.closed = True
        # Nothing after a closing answer is read: stop reading now (the
        # transport keeps flushing what was written) and drop unread input.
        conn.inbuf, conn.inpos, conn.pending = b"", 0, None
        self.reading_paused = True
        self.transport.pauseProducing()
        self.transport.loseConnection()
        self.server.connection_closed(self)

    def abort_request(self, status: int) -> None:
        """End the current request with the protocol's error answer (if nothing of a
        response went out yet) and close the connection."""
        conn = self.conn
        if conn.closed:
            return
        req = conn.req
        if req is None:
            req = conn.req = self.new_request()
            if self.trace_all:
                req.trace = self.new_trace(req)
        if not req.sent_head:
            release(req)
            req.head, req.body, req.status = b"", None, 0
            conn.machine.module.fail(self.g, conn, req, status)
            if req.head:
                trace = req.trace
                if trace is not None and trace.header:
                    self.trace_answer(req, trace.text(self.seconds()))
                sendengine.write(conn, [req.head])
                req.sent_head = True
        if req.status:
            now = self.seconds()
            self.stats.observe(req.status, now - req.started)
            if self.server.access_log is not None:
                self.server.access_log.request(conn, req, now)
            if req.trace is not None:
                self.server.traced(conn, req, now)
        conn.req = None
        self._close()

    def timed_out(self, kind: str) -> None:
        """Called by the server's sweep when ``conn.deadline`` has passed."""
        conn = self.conn
        if conn.closed:
            return
        if conn.on_timeout is not None:
            # A state parked on other work (a backend exchange) owns this deadline.
            conn.deadline = INF
            conn.on_timeout()
        elif kind == "header":
            self.abort_request(408)
        elif kind in ("send", "handshake"):
            # Nothing useful can be said to either; a TLS transport would first
            # try a polite shutdown a half-done handshake cannot carry.
            conn.closed = True
            self.transport.abortConnection()
            self.server.connection_closed(self)
        else:
            self._close()


def release(req: Any) -> None:
    """Free what an unfinished request holds (an open file body)."""
    body = req.body
    if body is not None and body.__class__ is sendengine.FileBody:
        body.close()
