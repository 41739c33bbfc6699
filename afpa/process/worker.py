"""A worker process: one :class:`~afpa.server.Server` serving on listeners its
supervisor bound, answering the supervisor over the control channel.

The supervisor starts ``python -m afpa serve <its own arguments> --worker-slot
I/N``.  The worker builds its server from the same settings (minus the admin
listener, which stays with the supervisor), then waits on the control channel
(fd :data:`afpa.process.control.WORKER_FD`) for the ``listen`` request that carries the
listening sockets, adopts them and serves.

Ops a worker answers (``fn(server, args) -> dict`` or a Deferred of one); other
modules add theirs with :func:`register` at import time:

    ping   {}                 -> {"pid", "index", "connections", "connections_total", "draining"}
    drain  {"timeout": s}     -> {"cut": n} once no client connection is left
    stop   {}                 -> {} and the worker exits (what is still open is cut)

When the channel closes without a ``stop`` (the supervisor died), the worker
drains (``timeouts.drain``) and exits by itself: a worker is never orphaned.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from afpa.process import clusterreload

from afpa.ops import clustertrace
from afpa.process.clusteradmin import register_worker_ops
from afpa.process.control import WORKER_FD, Channel, ControlError
from afpa.process.signals import install_signal_handlers

log = Logger(namespace="afpa.process.worker")

# op name -> fn(server, args) -> dict | Deferred[dict]
OPS: dict[str, Callable[[Any, dict], Any]] = {}


def register(op: str, fn: Callable[[Any, dict], Any]) -> None:
    """Make ``op`` answerable by every worker: ``fn(server, args)`` returns a
    JSON-able dict (or a Deferred firing with one); raising ValueError answers
    an error with its message.  Call at import time of a module the worker
    imports (the supervisor side asks with ``cluster.call(op, args, timeout)``)."""
    OPS[op] = fn


def _ping(server: Any, args: dict) -> dict:
    return {"pid": os.getpid(), "index": server.settings.worker_index,
            "connections": len(server.live), "connections_total": server.connections_total,
            "draining": server.draining}


def _drain(server: Any, args: dict) -> Any:
    timeout = args.get("timeout", server.settings.drain_timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError("drain: 'timeout' must be a positive number of seconds")
    return server.drain(float(timeout)).addCallback(lambda cut: {"cut": cut})


def _peer(server: Any, args: dict) -> dict:
    """Worker ``index`` (a peer: HTTP's sibling) left (its URLs are served here
    meanwhile) or is back."""
    peering = server.machine.module.peering
    index = args.get("index")
    if peering is not None and isinstance(index, int) and not isinstance(index, bool):
        peering.mark(server.g, index, bool(args.get("up")))
    return {}


register("ping", _ping)
register("drain", _drain)
register("peer", _peer)
register_worker_ops(register)  # snapshot (merged /metrics), machines (live page), cache (purges)
clusterreload.register_worker_ops(register)  # reload_prepare/commit/abort, reopen_logs
clustertrace.register_worker_ops(register)  # trace_poll, trace_stop (the supervisor's /trace)
# "stop" is the worker's own (it needs the channel): see Worker.


class Worker:
    """The control side of one worker process."""

    def __init__(self, server: Any, reactor: Any):
        self.server = server
        self.reactor = reactor
        self.stop_requested = False
        self.exiting = False  # the reactor is shutting down (any reason)
        self.exit_status = 0
        self.channel: Channel | None = None

    def handlers(self) -> dict[str, Any]:
        """Channel handlers: the registered ops, plus ``listen`` and ``stop``."""
        table = {op: (lambda args, fds, fn=fn: fn(self.server, args)) for op, fn in OPS.items()}
        table["listen"] = self._listen
        table["stop"] = self._stop
        return table

    def connect(self) -> None:
        """Adopt the inherited control socket and start answering."""
        self.channel = Channel(self.handlers(), self.reactor, on_lost=self._lost)
        factory = Factory()
        factory.buildProtocol = lambda addr: self.channel  # type: ignore[method-assign]
        try:
            self.reactor.adoptStreamConnection(WORKER_FD, socket.AF_UNIX, factory)
        finally:
            os.close(WORKER_FD)  # adopted as a duplicate

    def _listen(self, args: dict, fds: list[int]) -> dict:
        """The supervisor's listening sockets: ``{"listeners": [{"kind", "family"}]}``
        with one fd each; adopt them and start serving."""
        try:
            kinds = [(str(spec["kind"]), int(spec["family"])) for spec in args.get("listeners", [])]
            if len(kinds) != len(fds):
                raise ControlError(f"listen: {len(kinds)} listener(s) described, {len(fds)} received")
            try:
                self.server.start(sockets=[(kind, fd, family) for (kind, family), fd in zip(kinds, fds)])
            except Exception as exc:
                log.error("cannot start serving: {exc}", exc=exc)
                self.exit_status = 1
                self.reactor.callLater(0, self._exit)
                raise ControlError(f"cannot start serving: {exc}") from None
        finally:
            for fd in fds:
                os.close(fd)  # adoptStreamPort made its own copies
        return {"pid": os.getpid()}

    def _stop(self, args: dict, fds: list[int]) -> dict:
        self.stop_requested = True
        # Close the channel after the reply is out; _lost then stops the reactor.
        self.reactor.callLater(0, self.channel.transport.loseConnection)
        return {}

    def _lost(self, reason: Any) -> None:
        if self.exiting:
            return  # closed because this worker is exiting (a SIGTERM of its own)
        if self.stop_requested:
            self._exit()
            return
        timeout = self.server.settings.drain_timeout
        log.warn("the supervisor went away: draining {n} connection(s) (up to {t:g} s), then exiting",
                 n=len(self.server.live), t=timeout)
        self.server.drain(timeout).addBoth(lambda _: self._exit())

    def _exit(self) -> None:
        from twisted.internet.error import ReactorNotRunning

        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass


def serve(server: Any, reactor: Any) -> int:
    """Run a worker until the supervisor stops it (or goes away); the exit status."""

    worker = Worker(server, reactor)
    worker.connect()
    # SIGTERM to a worker alone drains it (its slot is restarted).  SIGHUP only
    # reopens the access log: a reload is the supervisor's, for every worker at
    # once.  SIGINT is ignored: Ctrl-C reaches the whole process group, and the
    # supervisor decides how its workers stop.
    install_signal_handlers(reactor, server)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, lambda _n, _f: reactor.callFromThread(server.reopen_logs))
    reactor.addSystemEventTrigger("before", "shutdown", setattr, worker, "exiting", True)
    reactor.addSystemEventTrigger("before", "shutdown", server.stop)
    reactor.run(installSignalHandlers=False)
    return worker.exit_status
