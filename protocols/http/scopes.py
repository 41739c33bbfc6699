"""The HTTP module's global and request scopes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from afpa.machine.modules import TIMEOUT, Listener
from afpa.machine.scopes import Request
from afpa.machine.trust import TrustedProxies
from protocols.http.states.coalesce import Flights
from protocols.http.settings import SIBLING_TOKEN_ENV, HttpSettings, read_sibling_token, sibling_address
from protocols.http.states.siblings import LISTENER, sibling_entry
from protocols.http.wire.responses import DateCache
from routing.pool import Pools
from routing.router import Route, Router, build_router
from routing.siblings import Siblings


@attrs.define(slots=True, eq=False)
class HttpRequest(Request):
    """One HTTP request: what the parser found, and what the states decided."""

    method: bytes = b""
    target: bytes = b""
    path: bytes = b""
    query: bytes = b""
    version: int = 11
    headers: list | None = None  # [(name, value)] as received
    lnames: list | None = None   # the names in lower case, same order
    host: bytes = b""
    keep_alive: bool = True
    content_length: int = -1
    chunked: bool = False
    expect_continue: bool = False
    if_none_match: bytes | None = None
    if_modified_since: bytes | None = None
    if_match: bytes | None = None
    if_unmodified_since: bytes | None = None
    range: bytes | None = None    # Range and If-Range as received (protocols/http/policy/ranges.py)
    if_range: bytes | None = None
    scan_hint: int = 0
    raw_start: int = 0           # where this request's bytes start in conn.inbuf
    upgrade: bytes | None = None
    cache_control: bytes | None = None  # request Cache-Control (or Pragma: no-cache), raw
    key: Any = None
    stale: Any = None            # the stale cached object being revalidated
    route: Route | None = None
    cache_status: bytes = b""
    trace_asked: bool = False    # Afpa-Trace: 1 (honoured from trusted peers only)
    relayed: int = 0             # body bytes relayed from a backend


@attrs.define(slots=True, eq=False)
class HttpGlobal:
    """Per-server data of the HTTP module."""

    runtime: Any
    settings: HttpSettings  # the module's own; the runtime's are runtime.settings
    cache: Any
    helpers: Any
    reactor: Any
    router: Router
    pools: Pools
    backend_machine: Any
    dates: DateCache
    trusted: Any  # afpa.machine.trust.TrustedProxies: peers whose forwarding fields are believed
    flights: Flights = attrs.field(factory=Flights)  # request coalescing and hit-for-miss
    # Stale serving: answers by reason (afpa_cache_stale_served_total), and the
    # background refreshes in flight, one per stored response ((key, secondary) ->
    # its BackendExchange; see remote.refresh_stale).
    stale_served: dict = attrs.field(factory=lambda: {"while-revalidate": 0, "if-error": 0, "grace": 0})
    refreshing: dict = attrs.field(factory=dict)
    siblings: Any = None  # routing.siblings.Siblings when siblings.members is set

    def listeners(self) -> list[Listener]:
        """The sibling listener, when siblings are configured (``ProtocolModule.listeners``)."""
        if self.siblings is None:
            return []
        s = self.settings
        return [Listener(LISTENER, sibling_address(s), sibling_entry,
                         f"siblings (member {s.sibling_self} of {len(s.sibling_members)})")]

    def mark_sibling(self, index: int, up: bool) -> None:
        """Worker ``index`` of a supervisor left (its URLs are served here
        meanwhile) or is back (``Peering.mark``)."""
        siblings = self.siblings
        if siblings is not None and 0 <= index < len(siblings.members):
            siblings.down_until[index] = 0.0 if up else float("inf")

    def metrics(self) -> Iterator[Metric]:
        """Backend pool metrics for /metrics (one label value per configured backend)."""
        opened = CounterMetricFamily("afpa_backend_connections_opened", "Connections opened to a backend",
                                     labels=["backend"])
        reused = CounterMetricFamily("afpa_backend_connections_reused", "Requests sent on a pooled connection",
                                     labels=["backend"])
        idle = GaugeMetricFamily("afpa_backend_connections_idle", "Idle pooled connections", labels=["backend"])
        open_ = GaugeMetricFamily("afpa_backend_connections_open",
                                  "Connections open or opening (bounded by backends.max_connections)",
                                  labels=["backend"])
        queued = GaugeMetricFamily("afpa_backend_queue_length", "Requests waiting for a backend connection",
                                   labels=["backend"])
        failures = CounterMetricFamily("afpa_backend_failures", "Failed backend exchanges by reason",
                                       labels=["backend", "reason"])
        pools = list(self.pools.pools.items())
        if self.siblings is not None:
            pools += [(pool.backend, pool) for pool in self.siblings.pools if pool is not None]
        for backend, pool in sorted(pools, key=lambda kv: str(kv[0])):
            name = str(backend)
            opened.add_metric([name], pool.opened)
            reused.add_metric([name], pool.reused)
            idle.add_metric([name], len(pool.idle))
            open_.add_metric([name], pool.count)
            queued.add_metric([name], len(pool.queue))
            for reason, n in sorted(pool.failures.items()):
                failures.add_metric([name, reason], n)
        yield opened
        yield reused
        yield idle
        yield open_
        yield queued
        yield failures
        yield CounterMetricFamily("afpa_cache_collapsed", "Requests answered from another request's "
                                  "backend response (coalesced misses)", value=self.flights.collapsed)
        served = CounterMetricFamily("afpa_cache_stale_served", "Answers from a stale stored response, "
                                     "by why it was allowed", labels=["why"])
        for why, n in self.stale_served.items():
            served.add_metric([why], n)
        yield served
        yield CounterMetricFamily("afpa_cache_hit_for_miss", "Misses forwarded without coalescing because "
                                  "the key was recently not cacheable", value=self.flights.hit_for_miss_total)
        if self.siblings is not None:
            asked = CounterMetricFamily("afpa_sibling_requests", "Misses sent to the sibling that owns "
                                        "their URL", labels=["member"])
            fallbacks = CounterMetricFamily("afpa_sibling_fallbacks", "Of those, answered by the origin "
                                            "because the owner gave no answer", labels=["member"])
            for entry in self.siblings.status(self.reactor.seconds()):
                if not entry["self"]:
                    asked.add_metric([entry["member"]], entry["forwarded"])
                    fallbacks.add_metric([entry["member"]], entry["fallbacks"])
            yield asked
            yield fallbacks

    def sweep(self, now: float) -> None:
        """Periodic housekeeping (called by the server's sweep): idle backend
        connections, expired hit-for-miss entries."""
        self.pools.sweep(now)
        self.flights.sweep(now)
        if self.siblings is not None:
            self.siblings.sweep(now)
        for ex in list(self.refreshing.values()):
            # A background refresh has no client connection in the server's
            # sweep: its deadline (BackendExchange.arm) is found here, and its
            # machine gets ``timeout`` as a client's exchange would.
            if ex.cconn.deadline <= now:
                ex.cconn.deadline = float("inf")
                ex.runner.deliver(TIMEOUT)

    def describe(self) -> list[str]:
        """Where misses go, for the startup log."""
        out = []
        for route in self.router.all_routes():
            where = route.root if route.kind == "docroot" else ", ".join(map(str, route.backends))
            scope = (route.host.decode() if route.host else "*") + route.prefix.decode()
            out.append(f"misses for {scope} -> {route.kind} {where}")
        if self.siblings is not None:
            others = [m for i, m in enumerate(self.siblings.members) if i != self.siblings.me]
            out.append(f"cacheable misses for URLs a sibling owns -> that sibling ({', '.join(others) or 'none'})")
        return out

    @classmethod
    def build(cls, runtime_settings: Any, runtime: Any) -> HttpGlobal:
        """``make_global`` of the HTTP module (raises ValueError on bad routes)."""
        settings = runtime_settings.module_settings
        if settings is None:  # made in code without them: the defaults
            settings = HttpSettings()
        pools = Pools(runtime.reactor, max_idle=settings.backend_max_idle,
                      connect_timeout=settings.backend_connect_timeout,
                      idle_timeout=settings.backend_pool_idle_timeout,
                      max_connections=settings.backend_max_connections,
                      max_queue=settings.backend_max_queue)
        siblings = None
        if settings.sibling_members:
            token = read_sibling_token(settings)
            if token is None:
                raise ValueError(f"siblings.members is set but no token: give siblings.token_file or "
                                 f"${SIBLING_TOKEN_ENV}")
            siblings = Siblings(runtime.reactor, settings.sibling_members, settings.sibling_self, token,
                                connect_timeout=settings.sibling_connect_timeout,
                                retry_after=settings.sibling_retry_after,
                                max_idle=settings.backend_max_idle,
                                idle_timeout=settings.backend_pool_idle_timeout,
                                max_connections=settings.backend_max_connections,
                                max_queue=settings.backend_max_queue,
                                replica_after=settings.sibling_replica_after)
        return cls(runtime=runtime, settings=settings, cache=runtime.cache, helpers=runtime.helpers,
                   reactor=runtime.reactor, router=build_router(settings), pools=pools,
                   backend_machine=runtime.machines.get("http-backend"), dates=DateCache(),
                   trusted=TrustedProxies(settings.trusted_proxies),
                   flights=Flights(hit_for_miss=settings.hit_for_miss,
                                   max_waiters=settings.coalesce_max_waiters),
                    siblings=siblings)


def carry_over(old: HttpGlobal, new: HttpGlobal) -> None:
    """A reload: ``new`` (built from the new configuration) takes over what
    outlives a configuration.  The pool of every backend still routed to is kept
    with its idle connections, queue and counters (its limits become the new
    ones); a pool no longer routed to keeps serving the requests already using it
    but pools nothing more.  Coalesced flights, background refreshes and the
    stale-serving counters are shared, so old and new requests see one of each."""
    routed = {b for route in new.router.all_routes() for b in route.backends}
    options = new.pools.options
    for backend, pool in old.pools.pools.items():
        if backend in routed:
            for name, value in options.items():
                setattr(pool, name, value)
            new.pools.pools[backend] = pool
        else:
            pool.max_idle = 0  # connections given back from now on are closed
            pool.close_idle()
    flights = old.flights
    flights.hit_for_miss = new.flights.hit_for_miss
    flights.max_waiters = new.flights.max_waiters
    new.flights = flights
    new.refreshing = old.refreshing
    new.stale_served = old.stale_served
    new.dates = old.dates
    if old.siblings is not None and new.siblings is not None and (
            old.siblings.members, old.siblings.me, old.siblings.token) == (
            new.siblings.members, new.siblings.me, new.siblings.token):
        new.siblings = old.siblings  # same members: keep their pools and who is skipped
