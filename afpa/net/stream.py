"""Stream connections: the client-connection machine on a Twisted transport.

Twisted's protocol callbacks are the TCP hooks of the AFPA paper:
``connectionMade`` (SYN handled), ``dataReceived`` (data arrival), the Send
Engine's producer ``resumeProducing`` (send window open) and ``connectionLost``
(FIN/RST).  :class:`MachineProtocol` turns them into steps of the machine
(:class:`afpa.machine.driver.Driver`); input arriving while the machine is parked
is buffered (and reading paused past a limit), so pipelined requests are
answered strictly in order.

Control never leaves the tables: the connection's events reach the machine as
the runtime's event words through :meth:`Driver.deliver` -- ``input`` from
``dataReceived``, ``peer_closed`` from ``connectionLost`` and ``timeout`` from
the server's sweep (:meth:`MachineProtocol.timed_out`) -- and the table maps
them.  One deadline per connection (``conn.deadline``, ``conn.timer``): the
runtime arms ``idle_timeout`` between requests (and ``tls_handshake_timeout``
until a TLS handshake is done, which alone it enforces itself: no machine has
the connection yet); a state arms its own for what it waits on.  What this
driver does with an event its table leaves unmapped is :meth:`unmapped`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from afpa.net import sendengine, twisted_private
from afpa.machine.driver import Driver
from afpa.machine.modules import PEER_CLOSED, INPUT, TIMEOUT
from afpa.machine.scopes import HANDSHAKE, IDLE, WORK, Connection

INF = float("inf")


@implementer(IHandshakeListener)
class MachineProtocol(Protocol, Driver):
    """One client connection, driven by the machine that was current when it was
    accepted.

    While the machine is parked, the work it waits on may take the
    connection's events (:attr:`Driver.waiter`): that is how a forwarded request
    body streams to a backend machine, how that machine learns the client left,
    and how a spliced connection relays bytes.
    """

    answer_fn = staticmethod(sendengine.send_engine)
    # The loop data arrival runs: run, or run_traced (set on the instance) while
    # every request is traced (Server.set_trace_all); chosen once, not tested
    # per request.  Not a bound method kept on every instance: that would make
    # each connection a reference cycle, left for the garbage collector.
    step = Driver.run

    def __init__(self, server: Any):
        self.server = server
        self.g = server.g
        self.conn: Connection | None = None
        self.reading_paused = False
        self.in_read = False  # inside this connection's own read event (dataReceived)
        self.seconds = server.reactor.seconds
        self.stats: Any = None
        self.make_request: Any = None
        self._next: Any = None  # (machine, g) a reload hands over after this request
        self.trace_all = server.trace_all
        if self.trace_all:
            self.step = self.run_traced

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
        # TCP_NODELAY: nothing to do once accepted sockets are known to
        # inherit it from the listening one (twisted_private.set_nodelay).
        inherited = getattr(self.factory, "nodelay_inherited", False)
        if inherited is None:
            twisted_private.set_nodelay(self.factory, t)
        elif not inherited and hasattr(t, "setTcpNoDelay"):
            t.setTcpNoDelay(True)
        if conn.tls:
            # Until the handshake completes (handshakeCompleted) only its own,
            # short deadline applies: a peer that never finishes it is closed.
            conn.arm(self.seconds() + server.settings.tls_handshake_timeout, HANDSHAKE)
        else:
            conn.arm(self.seconds() + server.settings.idle_timeout, IDLE)
        server.connection_opened(self)
        if machine.module.speaks_first:
            # The server talks first (a greeting): the start state runs now,
            # with no input, as it otherwise would on the first bytes.
            self.step(conn.state, None)

    def handshakeCompleted(self) -> None:
        """TLS only (IHandshakeListener): the handshake is done; the idle deadline starts."""
        conn = self.conn
        if conn is not None and conn.timer == HANDSHAKE:
            conn.arm(self.seconds() + self.server.settings.idle_timeout, IDLE)

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
            self.deliver(INPUT)  # to whoever takes the connection's input while parked
            if conn.busy and conn.unread() > self.server.limits.max_unread and not self.reading_paused:
                self.pause_reading()  # nobody is consuming it: stop reading
            return
        self.in_read = True
        try:
            self.step(conn.state, None)
        finally:
            self.in_read = False

    def connectionLost(self, reason: Failure = None) -> None:
        conn = self.conn
        if conn is not None and not conn.closed:
            conn.closed = True
            self.deliver(PEER_CLOSED)
            if conn.req is not None:
                release(conn.req)
            self.server.connection_closed(self)
        # Also after our own close: a drain waits until the last byte is out.
        self.server.connection_lost(self)
        if conn is not None and not conn.busy and conn.req is None and self.waiter is None:
            # Nothing is parked on the connection: nothing will look for its
            # driver again.  Dropping the back reference lets the connection
            # be freed now instead of by the garbage collector's next pass.
            conn.driver = None

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

    def suspended(self) -> None:
        # Parked: only a deadline the state armed for its work (WORK) runs on;
        # the idle or input one it had before is not its business any more.
        conn = self.conn
        if conn.timer != WORK:
            conn.arm(INF, IDLE)

    def resumed(self) -> None:
        self.conn.arm(INF, IDLE)  # the work is over; the next state or finished() arms anew

    def finished(self, req: Any, edge: Any) -> Any:
        conn = self.conn
        now = self.seconds()
        server = self.server
        if req.status:
            self.stats.observe(req.status, now - req.started)
            access_log = server.access_log
            if access_log is not None:
                access_log.request(conn, req, now)
        conn.req = None
        conn.requests += 1
        start = conn.state = conn.machine.start
        if edge.close or conn.closed or server.draining:
            self._close()
            return None
        conn.timer = 0  # IDLE (a constant here: this runs once per request)
        if self.reading_paused:
            self.resume_reading()
        if conn.inpos >= len(conn.inbuf):
            conn.deadline = now + server.settings.idle_timeout
            return None
        return start  # pipelined input is already here

    def failed(self) -> None:
        self.abort_request("failed")

    def unmapped(self, word: str) -> None:
        """The defaults for events a client table leaves unmapped: ``timeout``
        closes the connection (cuts it when the machine is parked, e.g. on a
        send to a client that stopped reading: nothing can be said to it);
        ``peer_closed`` drops the request (the connection is gone; a parked
        Deferred that fires later is discarded); ``input`` waits in the buffer."""
        if word == TIMEOUT:
            conn = self.conn
            if conn.closed:
                return
            if conn.busy:
                conn.closed = True
                self.transport.abortConnection()
                self.server.connection_closed(self)
            else:
                self._close()

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

    def _finish_then_switch(self, req: Any, edge: Any) -> Any:
        del self.finished
        machine, g = self._next
        self._next = None
        state = MachineProtocol.finished(self, req, edge)
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
        self.server.connection_closed(self)
        # With nothing left to send, inside this connection's own read event,
        # close now instead of a reactor turn later (twisted_private.close_now).
        if self.in_read and twisted_private.close_now(conn):
            return
        self.transport.pauseProducing()
        self.transport.loseConnection()

    def abort_request(self, reason: str) -> None:
        """End the current request with the protocol's error answer for
        ``reason`` (a runtime reason word, e.g. ``"failed"``: see
        ``ProtocolModule.fail``), if nothing of a response went out yet, and
        close the connection."""
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
            conn.machine.module.fail(self.g, conn, req, reason)
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

    def timed_out(self) -> None:
        """Called by the server's sweep when ``conn.deadline`` has passed: the
        machine gets ``timeout`` (:meth:`Driver.deliver`)."""
        conn = self.conn
        if conn.closed:
            return
        if conn.timer == HANDSHAKE:
            # Before the handshake no machine has the connection: nothing can be
            # said, and a TLS transport would first try a polite shutdown a
            # half-done handshake cannot carry.
            conn.closed = True
            self.transport.abortConnection()
            self.server.connection_closed(self)
            return
        conn.deadline = INF
        self.deliver(TIMEOUT)


def release(req: Any) -> None:
    """Free what an unfinished request holds (an open file body)."""
    body = req.body
    if body is not None and body.__class__ is sendengine.FileBody:
        body.close()
