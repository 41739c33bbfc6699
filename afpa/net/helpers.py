"""Helper threads for work that may block (disk), after Flash's AMPED helpers.

The reactor thread never waits on the disk: a state function that must open, stat
or read a file asks ``g.helpers.run(fn, *args)`` and returns the Deferred.  Tests
use :class:`InlineHelpers`, which runs the function at once and returns an
already-fired Deferred, so no thread or real time is involved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


class Helpers:
    """A bounded pool of helper threads owned by the server."""

    def __init__(self, reactor: Any, threads: int = 8):
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=max(1, threads), name="afpa-helper")
        self._started = False

    def start(self) -> None:
        """Start the threads and stop them when the reactor shuts down."""
        if not self._started:
            self._started = True
            self._pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def stop(self) -> None:
        """Stop the threads (idempotent)."""
        if self._started:
            self._started = False
            self._pool.stop()

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        """Run ``fn(*args)`` on a helper thread; the Deferred fires on the reactor."""
        return deferToThreadPool(self._reactor, self._pool, fn, *args)


class InlineHelpers:
    """Runs helper work synchronously (unit tests, and nothing else)."""

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        """Call ``fn(*args)`` now; the Deferred has already fired."""
        return maybeDeferred(fn, *args)
