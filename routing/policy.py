"""Operator cache policy per route, as plain immutable data.

A :class:`CachePolicy` is what an operator wrote in ``[cache]`` (the default
route, and what every rule inherits) or a rule's ``[route.cache]``.  Routing
only parses and checks it; the protocol module applies it (for HTTP,
``protocols/http/policy/cachepolicy.py`` and the cache key in ``states.py``).  It is
frozen, like the routes that carry it, so a compiled configuration can be
swapped whole.
"""

from __future__ import annotations

from typing import Any

import attrs

from afpa.config import BOOL, SECONDS
from routing.kinds import CACHE_QUERY, COOKIE_NAMES, FIELD_NAMES, SET_COOKIE

# [route.cache] key -> (CachePolicy attribute, kind, Settings field of its [cache] default)
_KEYS: dict[str, tuple[str, Any, str]] = {
    "default_ttl": ("default_ttl", SECONDS, "cache_default_ttl"),
    "min_ttl": ("min_ttl", SECONDS, "cache_min_ttl"),
    "max_ttl": ("max_ttl", SECONDS, "cache_max_ttl"),
    "ignore_cache_control": ("ignore_cache_control", BOOL, "cache_ignore_cache_control"),
    "set_cookie": ("set_cookie", SET_COOKIE, "cache_set_cookie"),
    "query": ("query", CACHE_QUERY, "cache_query"),
    "key_headers": ("key_headers", FIELD_NAMES, "cache_key_headers"),
    "key_cookies": ("key_cookies", COOKIE_NAMES, "cache_key_cookies"),
}
COOKIE_PREFIX = b"cookie="
"""Selector names of key cookies: ``cookie=<name>`` can never be a field name."""


@attrs.frozen(cache_hash=True)  # hashed per forwarded request (pool and turn lookups)
class CachePolicy:
    """What the operator says about caching on one route.

    ``default_ttl``: freshness (seconds) of a storable response that has
    neither explicit nor heuristic freshness (None: not stored).
    ``min_ttl``/``max_ttl``: clamps on every computed lifetime.
    ``ignore_cache_control``: the origin's Cache-Control, targeted fields and
    Expires are ignored for storing and lifetime (``no-store``/``private``
    too).  ``set_cookie``: ``"pass"`` (responses with Set-Cookie are never
    stored) or ``"strip"`` (stored without it).  ``query``: the query in the
    cache key, ``"keep"``, ``"sort"`` (parameters sorted) or ``"ignore"``.
    ``key_headers`` (lower-case) and ``key_cookies``: request values added to
    the key.
    """

    default_ttl: float | None = None
    min_ttl: float | None = None
    max_ttl: float | None = None
    ignore_cache_control: bool = False
    set_cookie: str = "pass"
    query: str = "keep"
    key_headers: tuple[str, ...] = ()
    key_cookies: tuple[str, ...] = ()
    # The names added to a stored response's selector for key_headers and
    # key_cookies (as if the origin had said Vary), computed once.
    selector: tuple[bytes, ...] = attrs.field(init=False, eq=False)

    @selector.default
    def _selector(self) -> tuple[bytes, ...]:
        return (tuple(h.encode("ascii") for h in self.key_headers)
                + tuple(COOKIE_PREFIX + c.encode("ascii") for c in self.key_cookies))

    def clamp(self, lifetime: float) -> float:
        """``lifetime`` within ``min_ttl`` and ``max_ttl``."""
        if self.min_ttl is not None and lifetime < self.min_ttl:
            lifetime = self.min_ttl
        if self.max_ttl is not None and lifetime > self.max_ttl:
            lifetime = self.max_ttl
        return lifetime


DEFAULT = CachePolicy()


def _checked(policy: CachePolicy, where: str) -> CachePolicy:
    if policy.min_ttl is not None and policy.max_ttl is not None and policy.min_ttl > policy.max_ttl:
        raise ValueError(f"{where}min_ttl ({policy.min_ttl:g}) is larger than max_ttl ({policy.max_ttl:g})")
    return policy


def policy_from_settings(settings: Any) -> CachePolicy:
    """The ``[cache]`` policy (already checked by the settings' kinds): the
    default route's, and the base every ``[route.cache]`` starts from."""
    values = {attr: getattr(settings, field) for attr, _, field in _KEYS.values()}
    return _checked(CachePolicy(**values), "cache.")


def policy_from_table(table: Any, where: str, base: CachePolicy) -> CachePolicy:
    """A rule's ``[route.cache]`` on top of ``base``; ValueError
    ``<where>: cache.<key>: <problem>`` for anything unknown or out of range."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: cache: must be a table ([route.cache])")
    changes: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _KEYS:
            raise ValueError(f"{where}: cache.{key}: unknown key (expected: {', '.join(sorted(_KEYS))})")
        attr, kind, _ = _KEYS[key]
        try:
            changes[attr] = kind(value)
        except ValueError as exc:
            raise ValueError(f"{where}: cache.{key}: {exc}") from None
    return _checked(attrs.evolve(base, **changes), f"{where}: cache.")
