"""The engine: runs a compiled machine on a connection's events.

Twisted's protocol callbacks are the TCP hooks of the AFPA paper:
``connectionMade`` (SYN handled), ``dataReceived`` (data arrival), the Send
Engine's producer ``resumeProducing`` (send window open) and ``connectionLost``
(FIN/RST).  On data arrival the engine steps the machine: call the current
state's function, look the outcome up in the compiled table, move on.  A state
that returns a Deferred suspends the machine until it fires; input arriving
meanwhile is buffered (and reading paused past a limit), so pipelined requests
are answered strictly in order.

:class:`Driver` is the stepping loop, shared by the two kinds of machine a
server runs: :class:`MachineProtocol` drives the client-connection machine,
and :class:`afpa.net.outbound.Exchange` drives a backend machine
(``http-backend.toml``) for one forwarded request.

Events are outcomes.  The runtime knows no protocol; what happens to a
connection reaches its machine as one of the runtime's event words
(:data:`afpa.machine.modules.EVENTS`) through :meth:`Driver.deliver`, and the
table says what runs next:

- ``timeout``: the connection's deadline passed (``conn.deadline``, armed by
  the runtime between requests or by a state for what it waits on; the
  server's sweep finds it).  ``input``: more input arrived.  ``peer_closed``:
  the other end closed.
- A machine stopped on ``@wait`` in state S: ``input`` runs S again (that is
  what ``@wait`` means); ``timeout`` / ``peer_closed`` take S's edge for that
  word.  Between requests the start state is the one waiting.
- A machine parked on a Deferred in state S: if S's function declared that its
  wait takes the word (``@state(..., events=...)``) and S maps it, the Deferred
  is given up (cancelled: its canceller stops the work behind it, and whatever
  it fires with is dropped) and S's edge for the word is taken.
- A parked state may hand the connection's events to the machine (or relay)
  that works for it: :attr:`Driver.waiter` (an outbound exchange streaming a
  request body and watching for the client leaving, a splice relaying bytes).
  Events then go to ``waiter.deliver(word)``, to be mapped by *its* table.
- Unmapped: each driver's :meth:`Driver.unmapped` does the documented default
  (:data:`afpa.machine.tables.EVENT_DEFAULTS`): a client connection is closed
  on ``timeout`` (cut when a state was parked, e.g. a stalled send), a request
  whose peer closed is dropped, input waits; an exchange fails.

Tracing: :meth:`Driver.run` records nothing.  A request that is traced (see
:mod:`afpa.machine.trace`) runs in :meth:`Driver.run_traced`, the same loop plus a
clock reading per state; the fast loop only learns about tracing in a branch
it already takes for Deferreds (a state returned something that is not a word).

House rules:

- A step is a function call plus a dict lookup plus two list increments
  (entries and transition counters); nothing else runs between states.
- ``@wait``: stop, the same state runs again on the next event.  ``@done``: the
  request is over, the connection goes on.  ``@close``: the request is over,
  close.  What "goes on" means is the driver's business.
- A state function that raises, or returns a word its table does not map, is
  logged once with the state's name, counted, and handed to the driver's
  ``fail``; no other connection notices.  The module answers it for the reason
  word ``failed`` (``ProtocolModule.fail``): the runtime names no protocol status.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from afpa.machine.modules import INPUT, UnmetNeed
from afpa.machine.scopes import Connection
from afpa.machine.tables import WAIT, Edge
from afpa.machine.trace import Begin, Trace

log = Logger(namespace="afpa.machine.driver")


class Driver:
    """The stepping loop.  Subclasses provide ``conn``, ``g`` and the hooks
    :meth:`new_request`, :meth:`waiting`, :meth:`finished` and :meth:`failed`."""

    conn: Connection
    g: Any
    parked: Deferred | None = None  # the Deferred the machine is parked on
    waiter: Any = None  # who the connection's events go to while parked (its ``deliver(word)``)

    def run(self, state: Any, outcome: str | None) -> None:
        """Step from ``state`` (running its function unless ``outcome`` is given)."""
        conn = self.conn
        g = self.g
        machine = conn.machine
        entries, transitions = machine.entries, machine.transitions
        req = conn.req
        while True:
            if outcome is None:
                if req is None:
                    req = conn.req = self.new_request()
                entries[state.index] += 1
                try:
                    outcome = state.fn(g, conn, req)
                except Exception:
                    self.fail(state, Failure())
                    return
                if outcome.__class__ is not str:
                    if outcome.__class__ is Begin:
                        # The request asked to be traced: on in the tracing loop.
                        return self._begin(state, outcome.word)
                    outcome = self._suspend(state, outcome)
                    if outcome is None:
                        return
            edge = state.on.get(outcome)
            if edge is None:
                self.fail(state, None, outcome)
                return
            transitions[edge.index] += 1
            outcome = None
            nxt = edge.target
            if nxt.fn is not None:
                state = nxt
                continue
            if nxt.name == WAIT:
                conn.state = state
                self.waiting()
                return
            state = self.finished(req, edge)
            if state is None:
                return
            req = conn.req

    # -- tracing --------------------------------------------------------------

    answer_fn: Any = None  # the state function that sends an answer (a traced answer gets its trace first)
    trace_prefix = ""      # step labels of this machine (a companion's: "<machine>:")
    trace_all = False      # every new request is traced (someone watches them all)

    def run_traced(self, state: Any, outcome: str | None) -> None:
        """:meth:`run` that records each state of a traced request (``req.trace``)
        with its start and end; untraced requests go through it unrecorded.
        ``outcome`` given: ``state`` ends now with it (a Deferred fired, or the
        request has just asked to be traced)."""
        conn = self.conn
        g = self.g
        machine = conn.machine
        entries, transitions = machine.entries, machine.transitions
        prefix = self.trace_prefix
        req = conn.req
        trace = None if req is None else req.trace
        fresh = True  # the state about to run may not be recorded yet (moves record their target)
        while True:
            if outcome is None:
                if req is None:
                    req = conn.req = self.new_request()
                    trace = req.trace = self.new_trace(req) if self.trace_all else None
                if fresh:
                    fresh = False
                    if trace is not None:
                        trace.enter(prefix, state)  # a no-op when it is open already (after @wait)
                entries[state.index] += 1
                try:
                    outcome = state.fn(g, conn, req)
                except Exception:
                    if trace is not None:
                        trace.leave(prefix, trace.clock(), "raised")
                    self.fail(state, Failure())
                    return
                if outcome.__class__ is not str:
                    if outcome.__class__ is Begin:
                        trace = self._traced(state, req)
                        outcome = outcome.word
                    else:
                        outcome = self._suspend(state, outcome)
                        if outcome is None:
                            return
            edge = state.on.get(outcome)
            if edge is None:
                if trace is not None:
                    trace.leave(prefix, trace.clock(), "unmapped")
                self.fail(state, None, outcome)
                return
            transitions[edge.index] += 1
            outcome = None
            nxt = edge.target
            if nxt.fn is not None:
                if trace is not None:
                    now = trace.clock()
                    trace.move(prefix, nxt, now)
                    if trace.header and nxt.fn is self.answer_fn and not req.sent_head and req.head:
                        # The answer is complete but not written: the trace so
                        # far goes into it (the Send Engine's own time cannot).
                        self.trace_answer(req, trace.text(now))
                state = nxt
                fresh = False
                continue
            if nxt.name == WAIT:
                conn.state = state  # its step stays open: waiting is part of it
                self.waiting()
                return
            if trace is not None:
                now = trace.clock()
                trace.leave(prefix, now)
                self.trace_finished(req, now)  # here, not in finished(): no test on the fast path
            state = self.finished(req, edge)
            if state is None:
                return
            req = conn.req
            trace = None if req is None else req.trace
            fresh = True

    def _traced(self, state: Any, req: Any) -> Trace:
        """The request's trace, begun now if it had none: ``state`` (which asked
        for it) counts from when the request began.  Its answer carries the trace."""
        trace = req.trace
        if trace is None:
            trace = req.trace = self.new_trace(req)
            trace.enter(self.trace_prefix, state, req.started)
        trace.header = True
        return trace

    def _begin(self, state: Any, word: str) -> None:
        self._traced(state, self.conn.req)
        self.run_traced(state, word)

    def new_trace(self, req: Any) -> Trace:
        """A fresh trace for ``req`` (on the driver's clock)."""
        return Trace(self.seconds)

    def trace_answer(self, req: Any, text: str) -> None:
        """Write the trace ``text`` into the answer on ``req`` (the module's job)."""
        hook = self.conn.machine.module.trace_answer
        if hook is not None:
            hook(req, text)

    def trace_finished(self, req: Any, now: float) -> None:
        """A traced request reached ``@done`` or ``@close`` (its trace is complete)."""

    def resume(self, state: Any, outcome: str | None) -> None:
        """Step on from a parked state: in the tracing loop when the request is traced."""
        req = self.conn.req
        if req is not None and req.trace is not None:
            self.run_traced(state, outcome)
        else:
            self.run(state, outcome)

    def _suspend(self, state: Any, d: Deferred) -> str | None:
        """A state returned a Deferred.  If it has already fired, return its
        outcome and keep stepping; otherwise park the machine until it fires
        (or until an event its wait takes is delivered, :meth:`deliver`)."""
        conn = self.conn
        sync: list[Any] = []
        parked = False

        def fired(result: Any) -> None:
            if not parked:
                sync.append(result)
            elif self.parked is d:
                self.parked = None
                self._resumed(state, result)
            # else: the wait was given up for an event; what it fired with is dropped

        d.addBoth(fired)
        if sync:
            self.waiter = None  # whoever claimed the connection's events is done with them
            result = sync[0]
            if isinstance(result, Failure):
                self.fail(state, result)
                return None
            return result
        parked = True
        self.parked = d
        conn.busy = True
        conn.state = state
        self.suspended()
        return None

    def _resumed(self, state: Any, result: Any) -> None:
        conn = self.conn
        conn.busy = False
        self.waiter = None
        if self.gone():
            if conn.req is not None:
                self.discard(conn.req)
            return
        if isinstance(result, Failure):
            self.fail(state, result)
            return
        self.resumed()
        self.resume(state, result)

    # -- events ---------------------------------------------------------------

    def deliver(self, word: str) -> None:
        """A runtime event (``timeout``, ``peer_closed``, ``input``) for this
        machine: to the waiter while one holds the connection's events, else
        an outcome of the state the machine waits in, when its table maps it
        (see the module docstring), else :meth:`unmapped`."""
        conn = self.conn
        state = conn.state
        if conn.busy:
            waiter = self.waiter
            if waiter is not None:
                waiter.deliver(word)
                return
            if word not in state.events or word not in state.on:
                self.unmapped(word)
                return
            # The parked state's wait takes this event: give the wait up (its
            # canceller stops the work behind it) and let the table decide.
            d, self.parked = self.parked, None
            conn.busy = False
            if d is not None:
                d.cancel()
            self.resumed()
            self.resume(state, word)
            return
        if word == INPUT:
            self.resume(state, None)  # @wait: the same state runs again
        elif word in state.on:
            if conn.req is None:
                # Between requests (an idle connection timing out or closed):
                # the event still ends a request, so the table's targets and
                # the finished hook always have a request scope.
                conn.req = self.new_request()
            self.resume(state, word)
        else:
            self.unmapped(word)

    def unmapped(self, word: str) -> None:
        """An event the machine's table does not map where it happened: the
        driver's documented default (:data:`afpa.machine.tables.EVENT_DEFAULTS`)."""

    def fail(self, state: Any, failure: Failure | None, outcome: Any = None) -> None:
        """A state raised (or returned an unmapped outcome): log once, count, and
        let the driver end the request."""
        conn = self.conn
        machine = conn.machine
        machine.errors[state.index] += 1
        if failure is not None and failure.check(UnmetNeed):
            # A table wired this state where its needs are not met: one line, no traceback.
            log.error("machine {machine} state {state} {problem} (table {table}; peer {peer})",
                      machine=machine.name, state=state.name, problem=failure.getErrorMessage(),
                      table=machine.source, peer=conn.peer)
        elif failure is not None:
            log.failure("machine {machine} state {state} raised (peer {peer})", failure,
                        machine=machine.name, state=state.name, peer=conn.peer)
        else:
            log.error("machine {machine} state {state} returned {outcome!r}, which the table "
                      "does not map (peer {peer})", machine=machine.name, state=state.name,
                      outcome=outcome, peer=conn.peer)
        self.failed()

    # -- hooks ----------------------------------------------------------------

    def gone(self) -> bool:
        """Whether a parked machine has nobody left to answer and must not go on
        (a client connection that closed).  A driver whose states handle a closed
        connection themselves (an outbound exchange) says False."""
        return self.conn.closed

    def discard(self, req: Any) -> None:
        """Free what an unfinished request holds (its connection is gone)."""

    def new_request(self) -> Any:
        """A fresh request scope."""
        raise NotImplementedError

    def waiting(self) -> None:
        """The machine stopped on ``@wait``."""

    def suspended(self) -> None:
        """The machine is parked on a Deferred."""

    def resumed(self) -> None:
        """The Deferred fired; the machine is about to continue."""

    def finished(self, req: Any, edge: Edge) -> Any:
        """The request ended on ``edge`` (to ``@done``, or ``@close`` when
        ``edge.close``; ``edge.word``, the outcome that ended it, is a companion
        machine's result for its caller); return the state to go on with, or
        None to stop stepping."""
        raise NotImplementedError

    def failed(self) -> None:
        """End the current request after a state failure."""
        raise NotImplementedError
