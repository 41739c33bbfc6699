"""The HTTP module's own settings: what it serves, where misses go, its cache
policy, request limits, backend pools and siblings.

They are top-level keys of the config file (``section=""``), exactly where they
always were: ``root``, ``backend``, ``[[route]]``, ``[cache] grace``,
``[limits] header_block``, ``[timeouts] header``, ``[backends]``, ``[siblings]``
...; the runtime's own keys (``listen``, ``[cache] size``, ``[timeouts] idle``,
...) share those tables and stay in :class:`afpa.config.Settings`.  Every value
is checked by its option's kind whether it comes from a file, a flag or code
(:class:`HttpSettings` checks itself when made).
"""

from __future__ import annotations

from typing import Any

import attrs

from afpa.config import (
    BOOL, COUNT, COUNT0, FRACTION, HOSTPORT, PATH, POSITIVE_SIZE, SECONDS, SECONDS0, SIZE, Detail, Kind, Settings,
    parse_hostport, read_token,
)
from afpa.machine.modules import ModuleSettings, Option, SettingError, StreamLimits
from routing.kinds import (
    CACHE_QUERY, COOKIE_NAMES, DOT_NAMES, FIELD_NAME, FIELD_NAMES, MEMBERS, PROXIES, RANGE_MISS, SET_COOKIE, URL,
)


def _routes(value: Any) -> tuple:
    if not isinstance(value, (list, tuple)) or not all(isinstance(r, dict) for r in value):
        raise Detail("must be an array of tables ([[route]])")
    return tuple(value)


# Each [[route]] table is checked by routing.router when the router is built
# (with its position, "route 2: ..."); here only its shape.
ROUTES = Kind("an array of tables ([[route]])", _routes)


@attrs.define(slots=True)
class HttpSettings:
    """The HTTP module's settings; defaults are its embedded configuration."""

    root: str = "."
    trusted_proxies: tuple[str, ...] = ()  # peers whose X-Forwarded-* / Forwarded are kept
    dotfiles_allow: tuple[str, ...] = ()   # dot-segment names a docroot may serve, e.g. ".well-known"

    # Where misses go: rules (routing.config) tried in order, then the default.
    backend: str | None = None          # --backend URL: default route forwards there
    defer: str | None = None            # --defer URL: default route hands connections there
    routes: tuple = ()                  # [[route]] tables (routing.router.route_from_rule)

    # Cache policy
    revalidate_after: float = 2.0       # seconds before a cached file is stat()ed again
    # Request coalescing: concurrent misses for one key wait for one backend fetch.
    coalesce_timeout: float = 10.0      # longest wait for it; then the waiter forwards itself
    coalesce_max_waiters: int = 1000    # per key; past it requests forward (0: no coalescing)
    hit_for_miss: float = 120.0         # a key whose answer was not storable is not coalesced this long
    # Stale serving (RFC 5861 and operator grace).  grace: seconds past expiry a
    # stored response is answered at once while one background request refreshes
    # it, even without stale-while-revalidate (0: only when the origin allows it,
    # as RFC 9111 4.2.4 asks).  keep: seconds past expiry a stale response is kept
    # usable for revalidation and stale-if-error (0: until evicted or purged).
    grace: float = 0.0
    keep: float = 0.0
    # Heuristic freshness (RFC 9111 4.2.2) for backend responses with only a
    # Last-Modified: this fraction of their age, at most heuristic_max seconds.
    heuristic_fraction: float = 0.1
    heuristic_max: float = 86400.0
    targeted_field: str = "Afpa-Cache-Control"  # cache-control meant for afpa alone (RFC 9213)
    # Operator policy (routing/policy.py): the default route's, and what every
    # [[route]] inherits unless its [route.cache] says otherwise.
    cache_default_ttl: float | None = None  # lifetime of a storable response without any
    cache_min_ttl: float | None = None  # clamps on every computed lifetime
    cache_max_ttl: float | None = None
    cache_ignore_cache_control: bool = False  # the origin's Cache-Control/Expires ignored
    cache_set_cookie: str = "pass"      # "pass": never stored; "strip": stored without it
    cache_query: str = "keep"           # cache key: query "keep", "sort" or "ignore"
    cache_key_headers: tuple[str, ...] = ()  # request fields added to the cache key
    cache_key_cookies: tuple[str, ...] = ()  # request cookies added to the cache key
    range_miss: str = "whole"           # a Range miss on a backend route: "whole" fetches the
                                        # object once without Range, "forward" passes Range on

    # Request limits (answers 414 / 431 / 413)
    max_request_line: int = 8 << 10
    max_header_block: int = 64 << 10
    max_headers: int = 100
    max_discard_body: int = 1 << 20     # body bytes read and dropped to keep a connection
    buffer_body: int = 64 << 10         # request bodies up to this are read before a backend is taken
    keepalive_requests: int = 10000     # then the connection is closed after the response

    # Timeouts, seconds
    header_timeout: float = 10.0        # from the first byte of a request to its end of head
    backend_connect_timeout: float = 5.0
    backend_first_byte_timeout: float = 60.0
    backend_idle_timeout: float = 60.0  # between reads of a response body
    tunnel_idle_timeout: float = 3600.0  # a deferred (spliced) connection with no traffic

    # Backend pools
    # Pooled keep-alive connections per backend.  As many as may be open: with
    # fewer, a burst of more concurrent requests than this closes the surplus
    # when they end and opens new ones for the next burst (a connect, an
    # accept and a close per surplus request, on afpa and on the origin).
    # Idle ones still expire after backend_pool_idle_timeout.
    backend_max_idle: int = 256
    backend_pool_idle_timeout: float = 30.0
    # Connections per backend (open, opening or idle).  256 is what a default
    # Apache (MaxRequestWorkers) serves at once; more would only queue in its
    # listen backlog, pinned by slow clients.  Past it requests wait in a queue.
    backend_max_connections: int = 256
    backend_max_queue: int = 1024       # requests waiting for a connection, per backend; then 503
    backend_queue_timeout: float = 10.0  # longest wait for a connection; then 503

    # Siblings (routing/siblings.py): afpa instances sharing one cache, each URL
    # owned by one of them.  The same ordered member list on every member; this
    # one is members[sibling_self] and accepts siblings on sibling_listen
    # (default: its own member address).  The shared token comes from
    # sibling_token_file or $AFPA_SIBLING_TOKEN, never the command line.
    sibling_members: tuple[str, ...] = ()
    sibling_self: int | None = None
    sibling_listen: tuple[str, int] | None = None
    sibling_token_file: str | None = None
    sibling_connect_timeout: float = 1.0  # an owner that does not accept by then: origin instead
    sibling_retry_after: float = 2.0    # a failed owner's URLs go to the origin this long
    # A key asked of its owner this many times is stored here too (0: never): hot
    # objects answered locally, the tail held once.
    sibling_replica_after: int = 4

    def __attrs_post_init__(self) -> None:
        _validate(self)


OPTIONS: tuple[Option, ...] = (
    Option("root", "root", PATH, flag="--root", metavar="DIR", help="document root (default: current directory)"),
    Option("backend", "backend", URL, flag="--backend", metavar="URL",
           help="forward misses to this HTTP server, e.g. http://127.0.0.1:8081"),
    Option("defer", "defer", URL, flag="--defer", metavar="URL",
           help="hand connections that miss to this local server (spliced)"),
    Option("route", "routes", ROUTES),
    Option("trusted_proxies", "trusted_proxies", PROXIES, flag="--trusted-proxy", repeat=True, metavar="CIDR",
           help="keep X-Forwarded-* and Forwarded from this peer address or network (repeatable; "
                "default: trust nobody and remove them)"),
    Option("dotfiles_allow", "dotfiles_allow", DOT_NAMES),
    Option("cache.revalidate_after", "revalidate_after", SECONDS, flag="--revalidate-after", metavar="SECONDS",
           help="check a cached file on disk again after this long (default: 2)"),
    Option("cache.coalesce_timeout", "coalesce_timeout", SECONDS),
    Option("cache.coalesce_max_waiters", "coalesce_max_waiters", COUNT0),
    Option("cache.hit_for_miss", "hit_for_miss", SECONDS),
    Option("cache.grace", "grace", SECONDS0),
    Option("cache.keep", "keep", SECONDS0),
    Option("cache.heuristic_fraction", "heuristic_fraction", FRACTION),
    Option("cache.heuristic_max", "heuristic_max", SECONDS),
    Option("cache.targeted_field", "targeted_field", FIELD_NAME),
    Option("cache.range_miss", "range_miss", RANGE_MISS),
    Option("cache.default_ttl", "cache_default_ttl", SECONDS),
    Option("cache.min_ttl", "cache_min_ttl", SECONDS),
    Option("cache.max_ttl", "cache_max_ttl", SECONDS),
    Option("cache.ignore_cache_control", "cache_ignore_cache_control", BOOL),
    Option("cache.set_cookie", "cache_set_cookie", SET_COOKIE),
    Option("cache.query", "cache_query", CACHE_QUERY),
    Option("cache.key_headers", "cache_key_headers", FIELD_NAMES),
    Option("cache.key_cookies", "cache_key_cookies", COOKIE_NAMES),
    Option("limits.request_line", "max_request_line", POSITIVE_SIZE),
    Option("limits.header_block", "max_header_block", POSITIVE_SIZE),
    Option("limits.headers", "max_headers", COUNT),
    Option("limits.discard_body", "max_discard_body", SIZE),
    Option("limits.keepalive_requests", "keepalive_requests", COUNT),
    Option("limits.buffer_body", "buffer_body", SIZE),
    Option("timeouts.header", "header_timeout", SECONDS, flag="--header-timeout", metavar="SECONDS",
           help="from the first byte of a request to its end of head (default: 10)"),
    Option("timeouts.backend_connect", "backend_connect_timeout", SECONDS, flag="--backend-connect-timeout",
           metavar="SECONDS", help="(default: 5)"),
    Option("timeouts.backend_first_byte", "backend_first_byte_timeout", SECONDS,
           flag="--backend-first-byte-timeout", metavar="SECONDS", help="(default: 60)"),
    Option("timeouts.backend_idle", "backend_idle_timeout", SECONDS, flag="--backend-idle-timeout",
           metavar="SECONDS", help="between reads of a backend's response body (default: 60)"),
    Option("timeouts.tunnel_idle", "tunnel_idle_timeout", SECONDS),
    Option("backends.max_idle", "backend_max_idle", COUNT0),
    Option("backends.pool_idle_timeout", "backend_pool_idle_timeout", SECONDS),
    Option("backends.max_connections", "backend_max_connections", COUNT),
    Option("backends.max_queue", "backend_max_queue", COUNT0),
    Option("backends.queue_timeout", "backend_queue_timeout", SECONDS),
    Option("siblings.members", "sibling_members", MEMBERS),
    Option("siblings.self_index", "sibling_self", COUNT0),
    Option("siblings.listen", "sibling_listen", HOSTPORT),
    Option("siblings.token_file", "sibling_token_file", PATH),
    Option("siblings.connect_timeout", "sibling_connect_timeout", SECONDS),
    Option("siblings.retry_after", "sibling_retry_after", SECONDS0),
    Option("siblings.replica_after", "sibling_replica_after", COUNT0),
)

_DEFAULT_NONE = frozenset(a.name for a in attrs.fields(HttpSettings) if a.default is None)


def _validate(s: HttpSettings) -> None:
    """Check (and normalise) every field; raise :class:`SettingError` naming it."""
    for opt in OPTIONS:
        value = getattr(s, opt.field)
        if value is None and opt.field in _DEFAULT_NONE:
            continue
        try:
            setattr(s, opt.field, opt.kind(value))
        except ValueError as exc:
            raise SettingError(opt.field, str(exc)) from None
    _check_together(s)


def _check_together(s: HttpSettings) -> None:
    """The settings that only make sense together."""
    if s.backend and s.defer:
        raise SettingError("defer", "choose backend or defer for the default route, not both "
                                    "(rules in [[route]] can mix them)")
    members, me = s.sibling_members, s.sibling_self
    if not members:
        for field in ("sibling_self", "sibling_listen", "sibling_token_file"):
            if getattr(s, field) is not None:
                raise SettingError(field, "needs siblings.members (the list of every sibling's address)")
        return
    if me is None:
        raise SettingError("sibling_self", f"required with siblings.members: which of the {len(members)} "
                                           f"members this is (0 to {len(members) - 1})")
    if me >= len(members):
        raise SettingError("sibling_self", f"{me} is not an index of siblings.members "
                                           f"(0 to {len(members) - 1})")


SETTINGS = ModuleSettings(section="", cls=HttpSettings, options=OPTIONS)
"""The HTTP module's settings as the runtime loads them (top-level keys)."""


def http_settings(**kwargs: Any) -> Settings:
    """Runtime :class:`Settings` carrying :class:`HttpSettings`, from one set of
    keyword arguments (``http_settings(root=..., backend=..., idle_timeout=...)``):
    the runtime's fields go to Settings, the others to HttpSettings.  Raises
    :class:`SettingError` for a value either refuses."""
    runtime = attrs.fields_dict(Settings)
    own = {k: kwargs.pop(k) for k in list(kwargs) if k not in runtime}
    return Settings(**kwargs, module_settings=HttpSettings(**own))


def stream_limits(s: HttpSettings) -> StreamLimits:
    """A request's head must be whole within ``timeouts.header``; a busy
    connection buffers at most ``limits.header_block`` of what follows."""
    return StreamLimits(message_timeout=s.header_timeout, max_unread=s.max_header_block)


# -- siblings -------------------------------------------------------------------

SIBLING_TOKEN_ENV = "AFPA_SIBLING_TOKEN"

# A sibling token travels as the first item of the Afpa-Sibling field, so it
# cannot hold the field's separators (";", ",") or quotes.
_SIBLING_TOKEN_TEXT = "printable ASCII without spaces, quotes, ';' or ','"


def sibling_address(s: HttpSettings) -> tuple[str, int] | None:
    """Where this instance accepts its siblings' requests (None: no siblings)."""
    if not s.sibling_members:
        return None
    if s.sibling_listen is not None:
        return s.sibling_listen
    return parse_hostport(s.sibling_members[s.sibling_self])


def read_sibling_token(s: HttpSettings, environ: Any = None) -> bytes | None:
    """The token siblings prove themselves with: the contents of
    ``siblings.token_file``, else ``$AFPA_SIBLING_TOKEN``, else None.  Raises
    ValueError ``<where>: <problem>`` for one that cannot be read or is too weak."""
    import re
    return read_token(s.sibling_token_file, "siblings.token_file", SIBLING_TOKEN_ENV,
                      re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x7e]+"), environ, _SIBLING_TOKEN_TEXT)


def join_siblings(s: HttpSettings, members: tuple[str, ...], index: int) -> HttpSettings:
    """Peering.join: worker ``index`` of a supervisor's workers, each other's siblings."""
    return attrs.evolve(s, sibling_members=members, sibling_self=index, sibling_listen=None)


def own_siblings(s: HttpSettings) -> str | None:
    """Peering.configured: workers cannot join siblings the operator set up."""
    if s.sibling_members:
        return ("siblings: with workers, the supervisor makes its workers each other's siblings; "
                "remove [siblings] or run one worker")
    return None
