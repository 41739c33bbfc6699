"""Driving a machine over an outbound connection (a backend exchange).

A state of the client machine that forwards a request (``derive_remote_response``)
starts an :class:`Exchange`: it runs the module's backend machine
(``statetables/http-backend.toml``) from its start state with the exchange's own
request scope, and returns a Deferred that fires with the exchange's result:
the outcome word that took the backend machine to ``@done`` or ``@close``
(see :meth:`Exchange.finished`), which the client machine's table maps.

Events reach the exchange's machine from three places:

- its outbound connection's protocol: ``data`` (input: the waiting state runs
  again and reads it) and ``lost`` (the connection's end of input: the waiting
  state runs again and sees ``conn.closed``, and ``conn.reset`` when it was not
  a clean close);
- the client connection it works for (``watch``): while the client machine is
  parked on the exchange, the client driver hands the exchange that
  connection's events (:attr:`Driver.waiter`): ``input`` (more of a request
  body), ``peer_closed`` (the client left) and ``timeout`` (the deadline a
  backend state armed on the client connection passed);
- the module, when something it waited for is ready (:meth:`poke`).

``timeout`` and ``peer_closed`` are outcomes of the backend table; a state that
leaves one unmapped makes the exchange fail (:meth:`Exchange.unmapped`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone

from twisted.logger import Logger

from afpa.machine.driver import Driver
from afpa.machine.modules import INPUT
from afpa.machine.scopes import Connection

log = Logger(namespace="afpa.net.outbound")


class Exchange(Driver):
    """One request forwarded over one (pooled) outbound connection.

    The request scope (``req``) gives the module's side of the contract:
    ``finish(close)`` when the machine ends (tidy both connections; ``close``:
    it ended on ``@close``) and ``on_failure() -> word`` when a state raised
    (the module's answer, and the result word for the client machine)."""

    def __init__(self, g: Any, machine: Any, req: Any, peer: str = "", watch: Any = None):
        self.g = g
        self.watch = watch  # the client connection whose events this machine takes
        self.conn = Connection(None, machine, machine.start)
        self.conn.peer_label = peer
        self.conn.req = req
        self.done: Deferred = Deferred()
        self.ended = False
        # A traced client request (req.trace, shared) records this machine's
        # states too, labelled with the machine's name.
        self.trace_prefix = machine.name + ":"

    def start(self) -> Deferred:
        """Run the machine; the Deferred fires with its result word.  While it
        runs, the watched client connection's events come to it."""
        watch = self.watch
        if watch is not None and watch.driver is not None:
            watch.driver.waiter = self
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
        """Re-run the waiting state (new input, a close, something it waits for is ready)."""
        if not self.ended and not self.conn.busy:
            self.resume(self.conn.state, None)

    def deliver(self, word: str) -> None:
        """An event of the watched client connection (or a timer): see
        :meth:`Driver.deliver`."""
        if not self.ended:
            Driver.deliver(self, word)

    def unmapped(self, word: str) -> None:
        """A ``timeout`` or ``peer_closed`` the backend table leaves unmapped
        where it happened ends the exchange as a failure (as if the state had
        raised); unconsumed ``input`` waits."""
        if word != INPUT:
            log.warn("machine {machine} state {state}: {word!r} is not mapped; the exchange fails",
                     machine=self.conn.machine.name, state=self.conn.state.name, word=word)
            d, self.parked = self.parked, None
            if d is not None:
                self.conn.busy = False
                d.cancel()
            self.failed()

    # -- driver hooks ---------------------------------------------------------

    def gone(self) -> bool:
        # A closed backend connection is an event the waiting state answers
        # (retry, 502, truncated): the machine must run, or the client waits forever.
        return self.ended

    def new_request(self) -> Any:
        return self.conn.req  # one request per exchange, made by the caller

    def finished(self, req: Any, edge: Any) -> None:
        # The word that ended the machine is its result for the client machine.
        self._end(req, edge.close, edge.word)
        return None

    def failed(self) -> None:
        req = self.conn.req
        self._end(req, True, req.on_failure())

    def _end(self, req: Any, close: bool, word: str) -> None:
        if self.ended:
            return
        self.ended = True
        watch = self.watch
        if watch is not None and watch.driver is not None and watch.driver.waiter is self:
            watch.driver.waiter = None
        req.finish(close)
        self.done.callback(word)
