"""The signals one afpa server process answers: SIGTERM/SIGINT drain then stop,
a second one stops at once; SIGHUP reloads and reopens the access log.  Shared by
``afpa serve`` and the worker processes of a supervisor."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger


class Shutdown:
    """SIGTERM/SIGINT: the first drains the server (``timeouts.drain``), then stops
    the reactor; a second one stops it at once, cutting what is still open."""

    def __init__(self, reactor: Any, server: Any):
        self.reactor = reactor
        self.server = server
        self.requested = False
        self.forced = False
        self.log = Logger(namespace="afpa")

    def signal(self, signame: str) -> None:
        """Called in the reactor thread for each SIGTERM/SIGINT."""
        if self.requested:
            if not self.forced:
                self.forced = True
                self.log.warn("{signal} again: stopping now, cutting {n} connection(s)",
                              signal=signame, n=len(self.server.live))
                self._stop()
            return
        self.requested = True
        timeout = self.server.settings.drain_timeout
        self.log.info("{signal}: draining {n} connection(s) (up to {t:g} s; a second signal stops at once)",
                      signal=signame, n=len(self.server.live), t=timeout)
        self.server.drain(timeout).addCallback(self._drained)

    def _drained(self, cut: int) -> None:
        if self.forced:
            return  # cut short by a second signal, which said so
        if cut:
            self.log.warn("drain timeout: cut {n} connection(s) still open; stopping", n=cut)
        else:
            self.log.info("drained: every connection finished; stopping")
        self._stop()

    def _stop(self) -> None:
        from twisted.internet.error import ReactorNotRunning

        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass  # already stopping


def hangup(server: Any) -> None:
    """SIGHUP: reload the configuration (a failure is logged, one line per
    problem, and the old configuration keeps serving), then reopen the access
    log; never die."""
    log = Logger(namespace="afpa")
    try:
        server.reload()  # logs its outcome
    except Exception:
        log.failure("SIGHUP: reload raised; the old configuration keeps serving")
    if server.reopen_logs():
        log.info("SIGHUP: access log reopened")
    else:
        log.info("SIGHUP: no access log configured, nothing to reopen")


def install_signal_handlers(reactor: Any, server: Any) -> None:
    """SIGTERM/SIGINT drain (:class:`Shutdown`), SIGHUP reloads (:func:`hangup`);
    each handler only queues its work for the reactor thread."""
    import signal

    shutdown = Shutdown(reactor, server)
    for signum in (signal.SIGTERM, signal.SIGINT):
        name = signal.Signals(signum).name
        signal.signal(signum, lambda _n, _f, name=name: reactor.callFromThread(shutdown.signal, name))
    signal.signal(signal.SIGHUP, lambda _n, _f: reactor.callFromThread(hangup, server))
