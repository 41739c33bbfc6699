"""Prometheus metrics, counted with plain integers and exported on scrape.

The hot path never touches prometheus-client: the engine bumps list slots of the
compiled machine and the store bumps integer attributes.  :class:`Collector`
turns those into metric families when ``/metrics`` is scraped.  Label sets are
bounded by the table (machine, state, outcome are the table's own words) and by
five status classes.

Metrics are also data: :func:`snapshot` turns every family into a JSON-able dict
(so a worker process can hand its counters to a supervisor over a pipe) and
:func:`render` turns one such snapshot back into families; a single process
renders its own snapshot, so both paths print the same text.  Merging the
snapshots of several workers is :mod:`afpa.ops.clustermetrics`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class RequestStats:
    """Requests by status class and a duration histogram, for one machine name."""

    __slots__ = ("by_class", "buckets", "total_seconds", "count")

    def __init__(self) -> None:
        self.by_class = [0] * 5
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.total_seconds = 0.0
        self.count = 0

    def observe(self, status: int, seconds: float) -> None:
        """Count one finished request."""
        cls = status // 100 - 1
        if 0 <= cls < 5:
            self.by_class[cls] += 1
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total_seconds += seconds
        self.count += 1


class Collector:
    """A prometheus-client custom collector reading a running server's counters."""

    def __init__(self, server: Any):
        self.server = server

    def describe(self) -> list[Metric]:
        """Nothing to pre-declare (registration must not call collect())."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Build every ``afpa_`` family from the live counters."""
        s = self.server
        entries = CounterMetricFamily("afpa_state_entries", "Times a state's function ran",
                                      labels=["machine", "state"])
        trans = CounterMetricFamily("afpa_state_transitions", "Transitions taken, by state and outcome",
                                    labels=["machine", "state", "outcome"])
        errors = CounterMetricFamily("afpa_state_errors", "State functions that raised or returned an unmapped outcome",
                                     labels=["machine", "state"])
        for m in s.machines():
            for st in m.states.values():
                entries.add_metric([m.name, st.name], m.entries[st.index])
                errors.add_metric([m.name, st.name], m.errors[st.index])
            for i, (state, outcome, _target) in enumerate(m.edges):
                trans.add_metric([m.name, state, outcome], m.transitions[i])
        yield entries
        yield trans
        yield errors

        c = s.runtime.cache
        for name, value, text in (
            ("hits", c.hits, "Lookups answered by a fresh cached object"),
            ("stale", c.stale, "Lookups that found a stale object (revalidated or refetched)"),
            ("misses", c.misses, "Lookups that found nothing"),
            ("stored", c.stored, "Objects stored"),
            ("evicted", c.evicted, "Objects evicted to stay within the byte budget"),
            ("rejected", c.rejected, "Objects too large to store"),
        ):
            yield CounterMetricFamily(f"afpa_cache_{name}", text, value=value)
        purged = CounterMetricFamily("afpa_cache_purged", "Objects purged (or soft-purged) through the admin API",
                                     labels=["how"])
        for how, n in c.purged.items():
            purged.add_metric([how], n)
        yield purged
        yield GaugeMetricFamily("afpa_cache_bytes", "Bytes held by cached objects", value=c.bytes)
        yield GaugeMetricFamily("afpa_cache_objects", "Objects in the cache", value=len(c))
        yield GaugeMetricFamily("afpa_cache_pinned_bytes", "Bytes of evicted objects still being sent",
                                value=c.pinned_bytes)
        yield GaugeMetricFamily("afpa_cache_inflight_bytes",
                                "Bytes of responses held in memory on their way into the cache (read or being collected)",
                                value=c.inflight_bytes)
        yield GaugeMetricFamily("afpa_cache_budget_bytes", "Configured cache byte budget", value=c.budget)

        reqs = CounterMetricFamily("afpa_requests", "Finished requests by response status class",
                                   labels=["machine", "status_class"])
        hist = HistogramMetricFamily("afpa_request_duration_seconds",
                                     "Time from the start of a request to its response being fully handed to the transport",
                                     labels=["machine"])
        for name, st in sorted(s.request_stats.items()):
            for cls, n in zip(STATUS_CLASSES, st.by_class):
                reqs.add_metric([name, cls], n)
            cumulative, acc = [], 0
            for bound, n in zip((*DURATION_BUCKETS, float("inf")), st.buckets):
                acc += n
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), acc))
            hist.add_metric([name], cumulative, st.total_seconds)
        yield reqs
        yield hist
        yield GaugeMetricFamily("afpa_connections_open", "Client connections open", value=len(s.connections))
        yield CounterMetricFamily("afpa_connections", "Client connections accepted", value=s.connections_total)
        # Whatever the protocol module counts itself (e.g. backend pools).
        extra = s.machine.module.metrics
        if extra is not None:
            yield from extra(s.g)


SNAPSHOT_VERSION = 1


def family_to_dict(family: Metric) -> dict[str, Any]:
    """One metric family as JSON-able data: name, type, help (and unit when set),
    and its samples as ``[sample name, {label: value}, value]``."""
    out: dict[str, Any] = {"name": family.name, "type": family.type, "help": family.documentation,
                           "samples": [[sm.name, dict(sm.labels), sm.value] for sm in family.samples]}
    if family.unit:
        out["unit"] = family.unit
    return out


def family_from_dict(data: dict[str, Any]) -> Metric:
    """The inverse of :func:`family_to_dict`."""
    family = Metric(data["name"], data["help"], data["type"], data.get("unit", ""))
    for name, labels, value in data["samples"]:
        family.add_sample(name, labels, value)
    return family


def snapshot(server: Any) -> dict[str, Any]:
    """Every family :class:`Collector` yields for ``server`` (the protocol
    module's own included), as JSON-able data: ``{"version": 1, "families":
    [...]}``.  Cheap enough to take at every scrape; never taken on the
    request path."""
    return {"version": SNAPSHOT_VERSION,
            "families": [family_to_dict(f) for f in Collector(server).collect()]}


def render(snap: dict[str, Any]) -> list[Metric]:
    """The metric families of one (possibly merged) snapshot, in its order."""
    return [family_from_dict(f) for f in snap["families"]]


class _Families:
    """The smallest "registry" generate_latest() accepts: something with collect()."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def exposition(snap: dict[str, Any]) -> bytes:
    """A snapshot in the Prometheus text format (what ``/metrics`` answers)."""
    return generate_latest(_Families(render(snap)))
