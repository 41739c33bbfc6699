"""Driving a machine over an outbound connection (a backend exchange).

A state of the client machine that forwards a request (``derive_remote_response``)
starts an :class:`Exchange`: it runs the module's backend machine
(``statetables/http-backend.toml``) from its start state with the exchange's own
request scope, and returns a Deferred that fires with the word the backend
machine left in ``req.result`` when it reaches ``@done`` or ``@close``.

Events reach the exchange from the backend connection's protocol (``data``,
``lost``) and from timers (``timeout``); each one re-runs the state the machine
is waiting in, which sees the new input, the close (``conn.closed``; and
``conn.reset`` when it was not a clean close) or the expired deadline
(``req.timed_out``) and answers with an outcome.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone

from afpa.machine.driver import Driver
from afpa.machine.scopes import Connection


class Exchange(Driver):
    """One request forwarded over one (pooled) outbound connection."""

    def __init__(self, g: Any, machine: Any, req: Any, peer: str = ""):
        self.g = g
        self.conn = Connection(None, machine, machine.start)
        self.conn.peer_label = peer
        self.conn.req = req
        self.done: Deferred = Deferred()
        self.ended = False
        # A traced client request (req.trace, shared) records this machine's
        # states too, labelled with the machine's name.
        self.trace_prefix = machine.name + ":"

    def start(self) -> Deferred:
        """Run the machine; the Deferred fires with ``req.result``."""
        self.resume(self.conn.state, None)
        return self.done

    # -- events ---------------------------------------------------------------

    def data(self, data: bytes) -> None:
        """Bytes arrived from the outbound connection."""
        conn = self.conn
        if conn.inpos >= len(conn.inbuf):
            conn.inbuf, conn.inpos = data, 0
        else:
            conn.inbuf = conn.inbuf[conn.inpos:] + data
            conn.inpos = 0
        self.poke()

    def lost(self, reason: Any) -> None:
        """The outbound connection closed; ``conn.reset`` tells a reset (or any
        loss but a clean close) from a clean close."""
        conn = self.conn
        conn.closed = True
        conn.reset = reason is not None and reason.check(ConnectionDone) is None
        self.poke()

    def poke(self) -> None:
        """Re-run the waiting state (new input, a close, a timeout)."""
        if not self.ended and not self.conn.busy:
            self.resume(self.conn.state, None)

    # -- driver hooks ---------------------------------------------------------

    def gone(self) -> bool:
        # A closed backend connection is an event the waiting state answers
        # (retry, 502, truncated): the machine must run, or the client waits forever.
        return self.ended

    def new_request(self) -> Any:
        return self.conn.req  # one request per exchange, made by the caller

    def finished(self, req: Any, close: bool) -> None:
        self._end(req, close)
        return None

    def failed(self) -> None:
        req = self.conn.req
        req.on_failure()
        self._end(req, True)

    def _end(self, req: Any, close: bool) -> None:
        if self.ended:
            return
        self.ended = True
        req.finish(close)
        self.done.callback(req.result)
