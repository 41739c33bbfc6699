"""Route selection for requests that missed the cache.

A :class:`Route` says where a miss goes: ``docroot`` (files under ``root``),
and in later work ``remote`` (a backend pool) and ``deferred`` (a local
server taking over the connection).  Its ``kind`` is the outcome word that
``derive_miss_response`` returns, so the transition table, not code, decides
which state handles it.  The router knows nothing of how requests are parsed:
it sees a host and a path.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Route:
    """A destination for missed requests, optionally limited to a host and path prefix."""

    kind: str
    root: str = ""
    host: bytes | None = None
    prefix: bytes = b"/"

    def matches(self, host: bytes, path: bytes) -> bool:
        """True when this route applies to ``host`` (lower-case, port allowed) and ``path``."""
        if self.host is not None and host.rsplit(b":", 1)[0] != self.host and host != self.host:
            return False
        return path.startswith(self.prefix)


@attrs.frozen
class Router:
    """An ordered list of routes; the first match wins, ``default`` catches the rest."""

    routes: tuple[Route, ...]
    default: Route

    @classmethod
    def single(cls, route: Route) -> Router:
        """A router sending every miss to ``route``."""
        return cls((), route)

    def choose(self, host: bytes, path: bytes) -> Route:
        """The route for a request."""
        for route in self.routes:
            if route.matches(host, path):
                return route
        return self.default
