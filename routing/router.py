"""Route selection for requests that missed the cache.

A :class:`Route` says where a miss goes: ``docroot`` (files under ``root``),
``remote`` (forwarded to one of ``backends``) or ``deferred`` (the connection
is handed to a local server in ``backends``).  Its ``kind`` is the outcome word
``derive_miss_response`` returns, so the transition table, not code, decides
which state handles it.  Rules are tried in order; the first whose host and
path prefix match wins, and the default route catches the rest.  The router
knows nothing of how requests are parsed: it sees a host and a path.
"""

from __future__ import annotations

import os
import re
from typing import Any

import attrs

from routing.policy import DEFAULT, CachePolicy, policy_from_settings, policy_from_table
from routing.pool import Backend

KINDS = ("docroot", "remote", "deferred")
_RULE_KEYS = {"to", "host", "prefix", "root", "backend", "backends", "cache"}


@attrs.frozen(cache_hash=True)  # hashed per forwarded request (pool and turn lookups)
class Route:
    """A destination for missed requests, optionally limited to a host and path prefix."""

    kind: str
    root: str = ""
    backends: tuple[Backend, ...] = ()
    host: bytes | None = None
    prefix: bytes = b"/"
    cache: CachePolicy = DEFAULT  # the operator's cache policy here (routing/policy.py)

    def matches(self, host: bytes, path: bytes) -> bool:
        """True when this route applies to ``host`` (lower-case, port ignored) and ``path``."""
        if self.host is not None:
            name = host.rsplit(b":", 1)[0] if not host.endswith(b"]") else host
            if name != self.host:
                return False
        return path.startswith(self.prefix)


@attrs.frozen
class Router:
    """An ordered list of routes; the first match wins, ``default`` catches the rest."""

    routes: tuple[Route, ...]
    default: Route
    # Whether any route changes how its cache key is made from the target
    # (query sorted or ignored): only then is the route chosen before the cache
    # lookup, so the common hit never pays for routing.
    keyed: bool = attrs.field(init=False)

    @keyed.default
    def _keyed(self) -> bool:
        return any(r.cache.query != "keep" for r in (*self.routes, self.default))

    def choose(self, host: bytes, path: bytes) -> Route:
        """The route for a request."""
        for route in self.routes:
            if route.matches(host, path):
                return route
        return self.default

    def all_routes(self) -> tuple[Route, ...]:
        """Rules and default."""
        return (*self.routes, self.default)


def _docroot(root: str, where: str) -> str:
    real = os.path.realpath(root)
    if not os.path.isdir(real):
        raise ValueError(f"{where}: document root {root!r} is not a directory")
    return real


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%(..)")


def _not_normal(prefix: str) -> str:
    """Why a path prefix can never equal the start of a normalised request path
    (empty: it can).  Request paths arrive with dot segments resolved, empty
    segments collapsed and escapes of unreserved characters decoded."""
    segments = prefix.split("/")[1:]
    for i, seg in enumerate(segments):
        if seg in (".", "..") or (seg == "" and i < len(segments) - 1):
            return "has an empty, '.' or '..' segment"
    for m in _ESCAPE.finditer(prefix):
        code = m.group(1)
        if code.upper() in ("2F", "5C", "00"):
            return f"has %{code}, which a request path may not contain"
        if not re.fullmatch(r"[0-9A-F]{2}", code):
            return f"has %{code} (escapes are written with upper-case hex digits)"
        if chr(int(code, 16)) in _UNRESERVED:
            return f"has %{code} (write {chr(int(code, 16))!r} itself)"
    return ""


def route_from_rule(rule: dict[str, Any], where: str, default_root: str,
                    cache: CachePolicy = DEFAULT) -> Route:
    """Build a Route from one ``[[route]]`` table of a config file; ``cache``
    is the policy its ``[route.cache]`` starts from (the ``[cache]`` one)."""
    unknown = set(rule) - _RULE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                         f"(expected: {', '.join(sorted(_RULE_KEYS))})")
    kind = {"defer": "deferred"}.get(rule.get("to", ""), rule.get("to", ""))
    if kind not in KINDS:
        raise ValueError(f"{where}: 'to' must be docroot, remote or defer (got {rule.get('to')!r})")
    host = rule.get("host")
    prefix = rule.get("prefix", "/")
    if host is not None and (not isinstance(host, str) or not host):
        raise ValueError(f"{where}: 'host' must be a host name")
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise ValueError(f"{where}: 'prefix' must start with '/'")
    problem = _not_normal(prefix)
    if problem:
        raise ValueError(f"{where}: prefix {prefix!r} {problem}: requests are matched on their "
                         "normalised path, so this prefix would never match")
    urls = rule.get("backends", [rule["backend"]] if "backend" in rule else [])
    if isinstance(urls, str):
        urls = [urls]
    backends = tuple(Backend.parse(u) for u in urls)
    if kind in ("remote", "deferred") and not backends:
        raise ValueError(f"{where}: a {rule['to']} route needs 'backend' or 'backends'")
    if kind == "docroot" and backends:
        raise ValueError(f"{where}: a docroot route takes 'root', not backends")
    root = _docroot(rule.get("root", default_root), where) if kind == "docroot" else ""
    if "cache" in rule:
        cache = policy_from_table(rule["cache"], where, cache)
    return Route(kind, root=root, backends=backends,
                 host=host.lower().encode("idna") if host else None, prefix=prefix.encode(), cache=cache)


def build_router(settings: Any) -> Router:
    """The router for a server's settings: rules from the config file, then the
    default (``--defer``, else ``--backend``, else the document root)."""
    cache = policy_from_settings(settings)
    if settings.defer:
        default = Route("deferred", backends=(Backend.parse(settings.defer),), cache=cache)
    elif settings.backend:
        default = Route("remote", backends=(Backend.parse(settings.backend),), cache=cache)
    else:
        default = Route("docroot", root=_docroot(settings.root, "root"), cache=cache)
    rules = tuple(route_from_rule(rule, f"route {i + 1}", settings.root, cache)
                  for i, rule in enumerate(settings.routes))
    return Router(rules, default)
