"""A leaner epoll reactor for ``afpa serve``.

Twisted's epoll reactor wraps every ready descriptor's handler in
``log.callWithLogger``, which builds a logging context per event so that
old-style log lines carry the connection's prefix.  On the fast path that
context costs about a tenth of a cache hit's time, so afpa's reactor calls the
handler directly and logs an unexpected error itself, per descriptor, the way
the wrapper would have.  Everything else is Twisted's epoll reactor unchanged.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.logger import Logger

log = Logger(namespace="afpa.net.reactor")


def install() -> Any:
    """Install afpa's reactor if no reactor is installed yet and epoll is available;
    returns the reactor in use either way."""
    if "twisted.internet.reactor" not in sys.modules:
        try:
            from twisted.internet import epollreactor
        except ImportError:  # not Linux: Twisted's default reactor it is
            pass
        else:
            class AfpaEPollReactor(epollreactor.EPollReactor):
                """EPollReactor without the per-event logging context."""

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
                            log.failure("unexpected error handling descriptor {fd}", fd=fd)

                doIteration = doPoll

            from twisted.internet.main import installReactor
            installReactor(AfpaEPollReactor())
    from twisted.internet import reactor
    return reactor
