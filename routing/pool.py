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

from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientCreator, Protocol
from twisted.python.failure import Failure


@attrs.frozen
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

    def connectionMade(self) -> None:
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
        if self.owner is not None:
            self.owner.lost(reason)


class BackendPool:
    """Keep-alive connections to one backend."""

    def __init__(self, reactor: Any, backend: Backend, *, max_idle: int = 32,
                 connect_timeout: float = 5.0, idle_timeout: float = 30.0):
        self.reactor = reactor
        self.backend = backend
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.idle: list[BackendProtocol] = []
        self.opened = 0
        self.reused = 0

    def take_idle(self) -> BackendProtocol | None:
        """A pooled connection, newest first, or None."""
        while self.idle:
            proto = self.idle.pop()
            if not proto.closed:
                self.reused += 1
                return proto
        return None

    def connect(self) -> Deferred:
        """Open a new connection; the Deferred fires with the protocol."""
        self.opened += 1
        creator = ClientCreator(self.reactor, BackendProtocol, self)
        return creator.connectTCP(self.backend.host, self.backend.port, timeout=self.connect_timeout)

    def release(self, proto: BackendProtocol, now: float) -> None:
        """Give back a connection that finished a response cleanly."""
        proto.owner = None
        if proto.closed:
            return
        if len(self.idle) >= self.max_idle:
            proto.transport.loseConnection()
            return
        proto.idle_since = now
        self.idle.append(proto)

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than ``idle_timeout`` (oldest are first)."""
        while self.idle and now - self.idle[0].idle_since > self.idle_timeout:
            self.idle.pop(0).transport.loseConnection()

    def forget(self, proto: BackendProtocol) -> None:
        """A connection closed: it is no longer available."""
        if proto.owner is None and proto in self.idle:
            self.idle.remove(proto)



class Pools:
    """One pool per backend, and round-robin over a route's backends."""

    def __init__(self, reactor: Any, *, max_idle: int = 32, connect_timeout: float = 5.0,
                 idle_timeout: float = 30.0):
        self.reactor = reactor
        self.options = dict(max_idle=max_idle, connect_timeout=connect_timeout, idle_timeout=idle_timeout)
        self.pools: dict[Backend, BackendPool] = {}
        self._turn: dict[Any, int] = {}

    def get(self, backend: Backend) -> BackendPool:
        """The pool of ``backend``."""
        pool = self.pools.get(backend)
        if pool is None:
            pool = self.pools[backend] = BackendPool(self.reactor, backend, **self.options)
        return pool

    def sweep(self, now: float) -> None:
        """Expire idle connections of every pool."""
        for pool in self.pools.values():
            pool.sweep(now)

    def pick(self, route: Any) -> BackendPool:
        """The next backend of ``route``, in turn."""
        backends = route.backends
        i = self._turn.get(route, 0)
        self._turn[route] = i + 1
        return self.get(backends[i % len(backends)])
