"""Backend addresses and their keep-alive connection pools.

A :class:`BackendPool` hands out connected :class:`BackendProtocol` instances:
an idle pooled one when it has one (newest first, so idle connections the
backend may already have timed out are the ones left to expire), otherwise a
new connection with a connect timeout.  Idle connections are bounded in number
and closed after ``idle_timeout``.  A pooled connection the backend closes is
simply forgotten.

The protocol object forwards its events to whoever owns it at the moment (the
exchange driving the backend machine) through two methods, ``data(bytes)`` and
``lost(reason)``; routing knows nothing about what the bytes mean.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred, succeed
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
        self.idle_timer: Any = None
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

    def acquire(self, fresh: bool = False) -> Deferred:
        """A Deferred firing with ``(protocol, reused)``; ``fresh`` skips the pool."""
        while self.idle and not fresh:
            proto = self.idle.pop()
            if proto.idle_timer is not None and proto.idle_timer.active():
                proto.idle_timer.cancel()
            proto.idle_timer = None
            if not proto.closed:
                self.reused += 1
                return succeed((proto, True))
        self.opened += 1
        creator = ClientCreator(self.reactor, BackendProtocol, self)
        d = creator.connectTCP(self.backend.host, self.backend.port, timeout=self.connect_timeout)
        return d.addCallback(lambda proto: (proto, False))

    def release(self, proto: BackendProtocol) -> None:
        """Give back a connection that finished a response cleanly."""
        proto.owner = None
        if proto.closed:
            return
        if len(self.idle) >= self.max_idle:
            proto.transport.loseConnection()
            return
        proto.idle_timer = self.reactor.callLater(self.idle_timeout, proto.transport.loseConnection)
        self.idle.append(proto)

    def forget(self, proto: BackendProtocol) -> None:
        """A connection closed: it is no longer available."""
        if proto in self.idle:
            self.idle.remove(proto)
        if proto.idle_timer is not None and proto.idle_timer.active():
            proto.idle_timer.cancel()

    def close_idle(self) -> None:
        """Close every idle connection (shutdown)."""
        for proto in list(self.idle):
            proto.transport.loseConnection()
        self.idle.clear()


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

    def pick(self, route: Any) -> BackendPool:
        """The next backend of ``route``, in turn."""
        backends = route.backends
        i = self._turn.get(route, 0)
        self._turn[route] = i + 1
        return self.get(backends[i % len(backends)])
