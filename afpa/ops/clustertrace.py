"""The live trace stream over worker processes: ``GET /trace`` on a supervisor.

While anyone listens to the supervisor's hub, the supervisor polls every worker
(``trace_poll``, every :data:`POLL` seconds); a worker asked once starts
collecting its finished requests (its server then records every request, as
for a local ``/trace`` client) and hands over what it collected at each poll,
at most :data:`HOLD` events between two polls (the rest are counted and
dropped).  The supervisor publishes the events, marked with the worker's index,
to its own hub, where each ``/trace`` client's filter and sampling apply as in
one process.  When the last client leaves, the workers are told to stop
(``trace_stop``), and a worker that is not polled for :data:`EXPIRY` seconds
stops by itself, so recording never outlives its audience.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from afpa.machine.trace import TraceHub

log = Logger(namespace="afpa.machine.trace")

POLL = 0.25     # seconds between two polls of the workers while anyone listens
HOLD = 5000     # events a worker keeps between two polls
EXPIRY = 5.0    # seconds without a poll after which a worker stops collecting


# -- worker side ---------------------------------------------------------------------

class _Collector:
    """A worker's events waiting for the supervisor's next poll."""

    def __init__(self, server: Any):
        self.server = server
        self.events: list[dict] = []
        self.dropped = 0
        self.polled = server.reactor.seconds()
        self.unsubscribe = server.trace_hub.subscribe(None, self.add)
        self.timer = server.reactor.callLater(EXPIRY, self.expire)

    def add(self, ev: dict) -> None:
        if len(self.events) < HOLD:
            self.events.append(ev)
        else:
            self.dropped += 1

    def take(self) -> dict[str, Any]:
        self.polled = self.server.reactor.seconds()
        events, self.events = self.events, []
        dropped, self.dropped = self.dropped, 0
        return {"events": events, "dropped": dropped}

    def expire(self) -> None:
        left = self.polled + EXPIRY - self.server.reactor.seconds()
        if left > 0:
            self.timer = self.server.reactor.callLater(left, self.expire)
        else:
            stop(self.server)

    def stop(self) -> None:
        self.unsubscribe()
        if self.timer.active():
            self.timer.cancel()


_collectors: dict[int, _Collector] = {}  # id(server) -> its collector


def op_poll(server: Any, args: dict[str, Any]) -> dict[str, Any]:
    """``trace_poll``: the events finished since the last poll (collecting starts
    with the first): ``{"events": [...], "dropped": n}``."""
    collector = _collectors.get(id(server))
    if collector is None:
        collector = _collectors[id(server)] = _Collector(server)
    return collector.take()


def stop(server: Any, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """``trace_stop``: stop collecting (nobody listens any more)."""
    collector = _collectors.pop(id(server), None)
    if collector is not None:
        collector.stop()
    return {}


def register_worker_ops(register: Any) -> None:
    """Register ``trace_poll`` and ``trace_stop`` with a worker's control channel."""
    register("trace_poll", op_poll)
    register("trace_stop", stop)


# -- supervisor side -----------------------------------------------------------------

class ClusterTraces:
    """The supervisor's trace hub, fed by polling its workers while anyone listens."""

    def __init__(self, cluster: Any, reactor: Any):
        self.cluster = cluster
        self.hub = TraceHub(on_change=self._listening)
        self._loop = LoopingCall(self._poll)
        self._loop.clock = reactor
        self._polling = False

    def _listening(self, active: bool) -> None:
        if active and not self._loop.running:
            self._loop.start(POLL, now=True)
        elif not active and self._loop.running:
            self._loop.stop()
            self.cluster.call("trace_stop", {}, 5.0)

    def _poll(self) -> None:
        if self._polling:
            return  # the last poll is still out (a slow worker): skip this one
        self._polling = True
        self.cluster.call("trace_poll", {}, 5.0).addBoth(self._deliver)

    def _deliver(self, replies: Any) -> None:
        self._polling = False
        if not isinstance(replies, list):
            log.failure("trace poll failed", replies)
            return
        for reply in replies:
            if "error" in reply:
                continue
            if reply.get("dropped"):
                log.warn("worker {i}: {n} traced request(s) dropped between two polls",
                         i=reply["worker"], n=reply["dropped"])
            for ev in reply.get("events", []):
                ev["worker"] = reply["worker"]
                self.hub.publish(ev)
