"""Backend addresses and their keep-alive connection pools.

A :class:`BackendPool` hands out connected :class:`BackendProtocol` instances:
an idle pooled one when it has one (newest first, so idle connections the
backend may already have timed out are the ones left to expire), otherwise a
new connection with a connect timeout.  Idle connections are bounded in number
and closed by :meth:`BackendPool.sweep` after ``idle_timeout`` (a timestamp per
connection and one periodic sweep, no timer per request).  A pooled connection
the backend closes is simply forgotten.

The protocol object forwards its events to whoever owns it at the moment (the
exchange driving the backend machine) through two methods, ``data(bytes)`` and
``lost(reason)``; routing knows nothing about what the bytes mean.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientCreator, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="afpa.backend")
LOG_EVERY = 5.0  # seconds between two log lines for one backend and reason

# The failure reasons counted in /metrics (a closed set, so labels stay bounded),
# with the words the log line uses.
FAILURE_REASONS = {
    "refused": "connection refused",
    "unresolvable": "host name does not resolve",
    "connect_error": "cannot connect",
    "connect_timeout": "connect timeout",
    "first_byte_timeout": "no response in time",
    "idle_timeout": "response body stalled",
    "closed_early": "closed the connection without a response",
    "reset": "connection lost mid-body",
    "malformed_head": "malformed response head",
    "malformed_body": "malformed response body",
    "queue_full": "too many requests waiting for a connection",
    "queue_timeout": "no connection free in time",
    "internal": "internal error while forwarding",
}


@attrs.frozen(cache_hash=True)  # hashed per forwarded request (pool and turn lookups)
class Backend:
    """A plain-HTTP server afpa forwards to or defers connections to."""

    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Backend:
        """``http://127.0.0.1:8081`` (or ``127.0.0.1:8081``) -> Backend."""
        text = url if "://" in url else "http://" + url
        parts = urlsplit(text)
        if parts.scheme != "http":
            raise ValueError(f"backend {url!r}: only http:// backends are supported")
        if not parts.hostname or (parts.path not in ("", "/")) or parts.query:
            raise ValueError(f"backend {url!r}: expected http://HOST:PORT")
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise ValueError(f"backend {url!r}: {exc}") from exc
        return cls(parts.hostname, port)

    def __str__(self) -> str:
        return f"http://{self.host}:{self.port}"


class BackendProtocol(Protocol):
    """One connection to a backend; events go to ``owner`` while one is set."""

    def __init__(self, pool: BackendPool):
        self.pool = pool
        self.owner: Any = None
        self.idle_since = 0.0
        self.closed = False
        self.made = False

    def connectionMade(self) -> None:
        self.made = True
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        if self.owner is not None:
            self.owner.data(data)
        else:
            # Bytes on an idle connection can belong to no request: drop it.
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        self.closed = True
        self.pool.forget(self)
        self.pool.slot_freed()
        if self.owner is not None:
            self.owner.lost(reason)


class BackendPool:
    """Keep-alive connections to one backend."""

    def __init__(self, reactor: Any, backend: Backend, *, max_idle: int = 256,
                 connect_timeout: float = 5.0, idle_timeout: float = 30.0,
                 max_connections: int = 256, max_queue: int = 1024):
        self.reactor = reactor
        self.backend = backend
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_queue = max_queue
        self.idle: list[BackendProtocol] = []
        self.opened = 0
        self.reused = 0
        self.count = 0               # connections open or being opened (idle ones too)
        self.queue: deque[Callable[[BackendProtocol | None], None]] = deque()
        self.failures: dict[str, int] = {}
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (last line, suppressed)

    def take_idle(self) -> BackendProtocol | None:
        """A pooled connection, newest first, or None."""
        while self.idle:
            proto = self.idle.pop()
            if not proto.closed:
                self.reused += 1
                return proto
        return None

    def may_open(self) -> bool:
        """True when a new connection may be opened now: under the bound, and
        nobody queued ahead (the queue is served first, in order)."""
        return self.count < self.max_connections and not self.queue

    def connect(self) -> Deferred:
        """Open a new connection; the Deferred fires with the protocol.  It holds
        one of ``max_connections`` slots until it closes (or fails to open)."""
        self.opened += 1
        self.count += 1
        proto = BackendProtocol(self)
        creator = ClientCreator(self.reactor, lambda: proto)
        d = creator.connectTCP(self.backend.host, self.backend.port, timeout=self.connect_timeout)
        d.addErrback(self._not_opened, proto)
        return d

    def _not_opened(self, failure: Failure, proto: BackendProtocol) -> Failure:
        # A connect cancelled just after it succeeded is closed instead, and its
        # connectionLost frees the slot: never free it twice.
        if not proto.made:
            self.slot_freed()
        return failure

    def slot_freed(self) -> None:
        """A connection closed or never opened: the first waiter may open one."""
        self.count -= 1
        if self.queue and self.count < self.max_connections:
            self.queue.popleft()(None)

    def enqueue(self, wake: Callable[[BackendProtocol | None], None]) -> bool:
        """Wait for a connection: ``wake(proto)`` hands over a connection given
        back, ``wake(None)`` a free slot to open one in.  False: the queue is full."""
        if len(self.queue) >= self.max_queue:
            return False
        self.queue.append(wake)
        return True

    def leave(self, wake: Callable[[BackendProtocol | None], None]) -> None:
        """A waiter gave up (timeout, client gone)."""
        try:
            self.queue.remove(wake)
        except ValueError:
            pass

    def decline(self, proto: BackendProtocol | None, now: float) -> None:
        """A waiter was handed ``proto`` (or, None, a free slot) and did not use
        it: it goes to the next waiter (or back to the idle set)."""
        if proto is not None:
            self.release(proto, now)
        elif self.queue and self.count < self.max_connections:
            self.queue.popleft()(None)

    def release(self, proto: BackendProtocol, now: float) -> None:
        """Give back a connection that finished a response cleanly (to the
        first waiter, if any)."""
        proto.owner = None
        if proto.closed:
            return
        if self.queue:
            self.reused += 1
            self.queue.popleft()(proto)
            return
        if len(self.idle) >= self.max_idle:
            proto.transport.loseConnection()
            return
        proto.idle_since = now
        self.idle.append(proto)

    def close_idle(self) -> None:
        """Close every idle connection (a pool no longer routed to)."""
        while self.idle:
            self.idle.pop().transport.loseConnection()

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than ``idle_timeout`` (oldest are first)."""
        while self.idle and now - self.idle[0].idle_since > self.idle_timeout:
            self.idle.pop(0).transport.loseConnection()

    def forget(self, proto: BackendProtocol) -> None:
        """A connection closed: it is no longer available."""
        if proto.owner is None and proto in self.idle:
            self.idle.remove(proto)

    def failed(self, reason: str, detail: str = "") -> None:
        """Count a failure (``reason`` is one of :data:`FAILURE_REASONS`) and log
        it, at most once per reason every ``LOG_EVERY`` seconds."""
        self.failures[reason] = self.failures.get(reason, 0) + 1
        now = self.reactor.seconds()
        last, suppressed = self._logged.get(reason, (None, 0))
        if last is not None and now - last < LOG_EVERY:
            self._logged[reason] = (last, suppressed + 1)
            return
        self._logged[reason] = (now, 0)
        what = FAILURE_REASONS.get(reason, reason)
        log.warn("backend {backend}: {what}{detail}{more}", backend=str(self.backend), what=what,
                 detail=f": {detail}" if detail else "",
                 more=f" ({suppressed} more since the last report)" if suppressed else "")


class Pools:
    """One pool per backend, and round-robin over a route's backends."""

    def __init__(self, reactor: Any, *, max_idle: int = 256, connect_timeout: float = 5.0,
                 idle_timeout: float = 30.0, max_connections: int = 256, max_queue: int = 1024):
        self.reactor = reactor
        self.options = dict(max_idle=max_idle, connect_timeout=connect_timeout, idle_timeout=idle_timeout,
                            max_connections=max_connections, max_queue=max_queue)
        self.pools: dict[Backend, BackendPool] = {}
        self._turn: dict[Any, int] = {}

    def get(self, backend: Backend) -> BackendPool:
        """The pool of ``backend``."""
        pool = self.pools.get(backend)
        if pool is None:
            pool = self.pools[backend] = BackendPool(self.reactor, backend, **self.options)
        return pool

    def close_idle(self) -> None:
        """Close every idle connection of every pool (e.g. on shutdown)."""
        for pool in self.pools.values():
            pool.close_idle()

    def sweep(self, now: float) -> None:
        """Expire idle connections of every pool."""
        for pool in self.pools.values():
            pool.sweep(now)

    def pick(self, route: Any) -> BackendPool:
        """The next backend of ``route``, in turn."""
        backends = route.backends
        if len(backends) == 1:
            return self.get(backends[0])  # no turn to keep
        i = self._turn.get(route, 0)
        self._turn[route] = i + 1
        return self.get(backends[i % len(backends)])
