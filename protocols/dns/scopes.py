"""The DNS module's global and request scopes."""

from __future__ import annotations

import random
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

import attrs
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from afpa.machine.scopes import Request
from afpa.net.datagram import BufferedSystemRandom, shared_pool
from afpa.net.oneshot import open_stream
from afpa.ops.metrics import DURATION_BUCKETS
from protocols.dns import wire
from protocols.dns.rules import Forwarding, LocalRecords, parse_rules
from protocols.dns.settings import DnsSettings

TYPE_NAMES = {v: k for k, v in vars(wire).items()
              if k.isupper() and isinstance(v, int) and k in (
                  "A", "NS", "CNAME", "SOA", "PTR", "HINFO", "MX", "TXT", "AAAA", "SRV", "DNAME", "OPT",
                  "IXFR", "AXFR", "ANY")} | {43: "DS", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 50: "NSEC3",
                                              64: "SVCB", 65: "HTTPS", 257: "CAA"}
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
               16: "BADVERS"}


def type_name(qtype: int) -> str:
    """``A``, ``AAAA``... or ``TYPE<n>`` (RFC 3597)."""
    return TYPE_NAMES.get(qtype) or f"TYPE{qtype}"


def rcode_name(rcode: int) -> str:
    """``NOERROR``, ``NXDOMAIN``... or ``RCODE<n>``."""
    return RCODE_NAMES.get(rcode) or f"RCODE{rcode}"


@attrs.define(slots=True, eq=False)
class Waiter:
    """A request waiting for another one's upstream query (coalescing)."""

    req: Any
    tcp: bool
    done: Any            # Deferred fired with the waiter's outcome word
    timer: Any = None


@attrs.define(slots=True, eq=False)
class Flight:
    """An upstream query in flight for one cache key, and who else waits for it.

    ``expires``: past it the flight no longer collects waiters (a leader that
    never finished, e.g. a state that raised), so one failure cannot hold a
    name hostage."""

    key: bytes
    expires: float
    waiters: list = attrs.field(factory=list)
    answer: wire.Answer | None = None   # set when it finished with an answer


class Deadlines:
    """Timeouts of one length sharing one reactor timer.

    Every UDP try waits ``dns.timeout`` seconds, so the tries expire in the
    order they started: they wait in an insertion-ordered dict, and one timer,
    set for the oldest, expires what is due and is set again for the next.  A
    try that ends takes itself out (a dict deletion) instead of creating and
    cancelling a timer of its own."""

    __slots__ = ("reactor", "seconds", "waiting", "timer")

    def __init__(self, reactor: Any, seconds: Callable[[], float]):
        self.reactor = reactor
        self.seconds = seconds
        self.waiting: dict[Any, float] = {}
        self.timer: Any = None

    def add(self, item: Any, deadline: float) -> None:
        """Call ``item.expired()`` at ``deadline`` unless :meth:`discard` comes first
        (deadlines must not come before those added earlier)."""
        self.waiting[item] = deadline
        if self.timer is None:
            self.timer = self.reactor.callLater(max(0.0, deadline - self.seconds()), self._due)

    def discard(self, item: Any) -> None:
        """``item`` no longer waits (the timer, if it was for it, finds the next one)."""
        self.waiting.pop(item, None)

    def _due(self) -> None:
        self.timer = None
        waiting = self.waiting
        now = self.seconds()
        while waiting:
            item = next(iter(waiting))
            deadline = waiting[item]
            if deadline > now:
                self.timer = self.reactor.callLater(deadline - now, self._due)
                return
            del waiting[item]
            item.expired()


@attrs.define(slots=True, eq=False)
class DnsRequest(Request):
    """One query: what was asked, where it went, what came back."""

    query: wire.Query | None = None
    tcp: bool = False
    key: bytes = b""
    stale: Any = None                 # a stale CacheObject for this key (serve-stale)
    upstreams: tuple = ()
    attempt: int = 0                  # upstream tries made (UDP)
    upstream: tuple[str, int] | None = None  # the one asked last
    response: wire.Response | None = None
    flight: Flight | None = None
    leader: bool = False              # this request asks upstream for its flight
    rcode: int = -1                   # of the reply sent (-1: none)
    cache_status: str = "-"           # hit, miss, stale, local, coalesced, error, dropped


@attrs.define(slots=True, eq=False)
class DnsGlobal:
    """Per-server data of the DNS module."""

    runtime: Any
    settings: Any
    dns: DnsSettings
    cache: Any
    reactor: Any
    forwarding: Forwarding
    local: LocalRecords
    rng: random.Random = attrs.field(factory=BufferedSystemRandom)  # IDs and 0x20 case: not guessable
    flights: dict = attrs.field(factory=dict)
    parsed: dict = attrs.field(factory=dict)  # wire.parse_query_memo's memory
    deadlines: Deadlines = None  # type: ignore[assignment]  # of the UDP tries (built from reactor)
    # Outbound verbs (tests hand in their own)
    open_datagram: Callable[..., Any] = None  # type: ignore[assignment]
    open_stream: Callable[..., Any] = None  # type: ignore[assignment]
    # Counters (exported by metrics())
    by_qtype: dict = attrs.field(factory=dict)
    by_rcode: list = attrs.field(factory=lambda: [0] * 4096)  # 12-bit extended RCODEs
    seconds: Callable[[], float] = None  # type: ignore[assignment]  # the reactor's clock
    dropped: int = 0
    ignored: int = 0                  # upstream datagrams that did not answer our query (spoofed, late)
    upstream_tries: dict = attrs.field(factory=dict)  # (upstream, outcome) -> n
    latency: list = attrs.field(factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    latency_sum: float = 0.0
    latency_count: int = 0

    @classmethod
    def build(cls, settings: Any, runtime: Any) -> DnsGlobal:
        """``make_global`` of the DNS module (ValueError on a bad rule or hosts file)."""
        dns = settings.module_settings if settings.module_settings is not None else DnsSettings()
        rules = [rule for spec in dns.servers for rule in parse_rules(spec)]
        local = LocalRecords(dns.local_records, where="dns.local_records")
        for path in dns.hosts_files:
            local.load_hosts(path)
        reactor = runtime.reactor
        return cls(runtime=runtime, settings=settings, dns=dns, cache=runtime.cache, reactor=reactor,
                   forwarding=Forwarding(dns.upstreams, rules), local=local,
                   seconds=reactor.seconds if reactor is not None else time.time,  # afpa check: no reactor
                   # Upstream queries leave from pooled sockets on random ports
                   # (afpa.net.datagram.DatagramPool: RFC 5452 without a socket per query).
                   open_datagram=lambda host, port, on_data, on_error: shared_pool(reactor).open(
                       host, port, on_data, on_error),
                   open_stream=lambda host, port, on_data, on_lost: open_stream(
                       reactor, host, port, on_data, on_lost, dns.tcp_timeout))

    def __attrs_post_init__(self) -> None:
        if self.deadlines is None:
            self.deadlines = Deadlines(self.reactor, self.seconds)

    def count(self, qtype: int, rcode: int) -> None:
        """One reply sent."""
        by_qtype = self.by_qtype
        by_qtype[qtype] = by_qtype.get(qtype, 0) + 1
        self.by_rcode[rcode & 0xFFF] += 1

    def tried(self, upstream: tuple[str, int], outcome: str, seconds: float | None = None) -> None:
        """One upstream try ended with ``outcome``; ``seconds`` when it answered."""
        k = (f"{upstream[0]}:{upstream[1]}", outcome)
        self.upstream_tries[k] = self.upstream_tries.get(k, 0) + 1
        if seconds is not None:
            self.latency[bisect_left(DURATION_BUCKETS, seconds)] += 1
            self.latency_sum += seconds
            self.latency_count += 1

    def metrics(self) -> Iterator[Metric]:
        """The module's own families (after the runtime's on /metrics)."""
        q = CounterMetricFamily("afpa_dns_queries", "DNS replies sent, by query type", labels=["qtype"])
        for qtype, n in sorted(self.by_qtype.items()):
            q.add_metric([type_name(qtype)], n)
        yield q
        r = CounterMetricFamily("afpa_dns_replies", "DNS replies sent, by response code", labels=["rcode"])
        for rcode, n in enumerate(self.by_rcode):
            if n:
                r.add_metric([rcode_name(rcode)], n)
        yield r
        yield CounterMetricFamily("afpa_dns_dropped", "Queries dropped unanswered (malformed, or a response)",
                                  value=self.dropped)
        yield CounterMetricFamily("afpa_dns_upstream_ignored",
                                  "Upstream datagrams that did not answer the query sent (wrong ID or question)",
                                  value=self.ignored)
        t = CounterMetricFamily("afpa_dns_upstream_tries", "Upstream tries by upstream and how they ended",
                                labels=["upstream", "outcome"])
        for (up, outcome), n in sorted(self.upstream_tries.items()):
            t.add_metric([up, outcome], n)
        yield t
        h = HistogramMetricFamily("afpa_dns_upstream_latency_seconds",
                                  "Time from sending a query upstream to its answer")
        cumulative, acc = [], 0
        for bound, n in zip((*DURATION_BUCKETS, float("inf")), self.latency):
            acc += n
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), acc))
        h.add_metric([], cumulative, self.latency_sum)
        yield h

    def sweep(self, now: float) -> None:
        """Forget flights past their end (a leader that never finished)."""
        stale = [key for key, flight in self.flights.items() if flight.expires <= now]
        for key in stale:
            del self.flights[key]

    def describe(self) -> list[str]:
        """Startup lines: where queries go."""
        return describe(self)


def describe(g: DnsGlobal) -> list[str]:
    """Startup lines of the DNS module (``ProtocolModule.describe``)."""
    dns = g.dns
    ups = ", ".join(f"{h}:{p}" for h, p in dns.upstreams) or "none"
    lines = [f"dns: forwarding to {ups} (timeout {dns.timeout:g}s, {dns.tries} rounds, TCP on truncation)"]
    for spec in dns.servers:
        lines.append(f"dns: rule {spec}")
    if len(g.local):
        lines.append(f"dns: {len(g.local)} local names answered without forwarding")
    if dns.serve_stale:
        lines.append(f"dns: serve-stale on (up to {dns.stale_max:g}s past expiry)")
    return lines
