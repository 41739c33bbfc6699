"""One ``/metrics`` view over several worker processes.

A supervisor asks every worker for its :func:`afpa.ops.metrics.snapshot` at scrape
time (the ``snapshot`` op, short timeout) and :class:`ClusterMetrics` merges them:

- counters and histograms (every ``_bucket``, ``_sum``, ``_count``) are summed
  per label set;
- gauges in :data:`SUMMED_GAUGES` are summed (bytes, objects, open connections,
  budgets, queues: quantities that add up across processes); any other gauge is
  kept apart per worker with a ``worker`` label, since summing a gauge of unknown
  meaning could say something false;
- a few gauges are also shown per worker (:data:`PER_WORKER`, e.g.
  ``afpa_worker_connections_open{worker}``), so the summed family keeps the
  name and labels a single process has and dashboards work unchanged;
- supervisor families: ``afpa_workers``, ``afpa_worker_up{worker}``,
  ``afpa_worker_restarts_total{worker}``, ``afpa_worker_scrape_errors_total{worker}``
  and ``afpa_workers_retired_total``.  ``worker`` is a worker's index (0..N-1),
  so these label sets stay bounded by N however often workers are replaced.

Counters never go backwards:

- a worker that does not answer a scrape is counted as a scrape error and its
  last good snapshot stands in for its counters (not its gauges);
- when a worker dies, its last snapshot is folded into one accumulated
  "retired" snapshot, which every later scrape adds in.  It holds one value per
  series, however many workers have died: prometheus_client's multiprocess
  directory instead keeps a file per dead process and reads them all at every
  scrape, so scrape time grows with restarts (prometheus/client_python issues
  #204 and #367).  What a worker counted after its last scrape and before it
  died is lost; a pull model cannot ask a dead process.

How a death is learned (the interface with the supervisor): if the cluster has
``add_exit_hook(fn)``, :class:`ClusterMetrics` registers
:meth:`ClusterMetrics.worker_exited` there and the supervisor calls it with the
worker's index once per death.  Without a hook (or if a call is missed) a
replacement is still noticed at the next scrape: each snapshot carries the
identity (``id``) of the process and server that took it, and a new identity at
an index retires the old one.  An answer from an identity already retired (a
reply racing the death) is ignored, so nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred

CUMULATIVE = frozenset({"counter", "histogram", "summary"})

# Gauges whose values add up across workers.  The budget adds up too: whether
# each worker has the whole budget or a share of it, the sum is what the
# workers together may hold.
SUMMED_GAUGES = frozenset({
    "afpa_cache_bytes", "afpa_cache_objects", "afpa_cache_pinned_bytes", "afpa_cache_inflight_bytes",
    "afpa_cache_budget_bytes", "afpa_connections_open",
    "afpa_backend_connections_idle", "afpa_backend_connections_open", "afpa_backend_queue_length",
})

# Gauges also shown per worker, under their own family name with a worker label.
PER_WORKER = {
    "afpa_connections_open": ("afpa_worker_connections_open", "Client connections open, by worker"),
    "afpa_cache_bytes": ("afpa_worker_cache_bytes", "Bytes held by cached objects, by worker"),
    "afpa_cache_objects": ("afpa_worker_cache_objects", "Objects in the cache, by worker"),
}

SCRAPE_TIMEOUT = 2.0  # seconds a worker has to answer the snapshot op


def _key(sample_name: str, labels: dict[str, str]) -> tuple:
    return (sample_name, tuple(sorted(labels.items())))


class Families:
    """Metric families being merged: name -> type, help, unit and summed samples
    (one value per sample name and label set, in order of first appearance)."""

    def __init__(self) -> None:
        self.families: dict[str, dict[str, Any]] = {}

    def family(self, name: str, typ: str, help_: str, unit: str = "") -> dict[str, Any] | None:
        """The family ``name`` (created empty if new); None if it exists with another type."""
        fam = self.families.get(name)
        if fam is None:
            fam = self.families[name] = {"type": typ, "help": help_, "unit": unit, "samples": {}}
        elif fam["type"] != typ:
            return None  # e.g. two worker versions disagree: keep the first
        return fam

    def add(self, name: str, typ: str, help_: str, sample_name: str, labels: dict[str, str],
            value: float, unit: str = "") -> None:
        """Add ``value`` to one series (creating it at ``value``)."""
        fam = self.family(name, typ, help_, unit)
        if fam is None:
            return
        key = _key(sample_name, labels)
        slot = fam["samples"].get(key)
        if slot is None:
            fam["samples"][key] = [sample_name, labels, value]
        else:
            slot[2] += value

    def add_snapshot(self, snap: dict[str, Any], *, worker: int | None = None,
                     cumulative_only: bool = False) -> None:
        """Fold one worker's snapshot in by the rules in the module docstring.
        ``cumulative_only`` takes counters and histograms only (a stale snapshot)."""
        for f in snap.get("families", ()):
            name, typ, help_, unit = f["name"], f["type"], f["help"], f.get("unit", "")
            cumulative = typ in CUMULATIVE
            if cumulative_only and not cumulative:
                continue
            summed = cumulative or name in SUMMED_GAUGES
            also = PER_WORKER.get(name) if worker is not None else None
            for sample_name, labels, value in f["samples"]:
                if summed:
                    self.add(name, typ, help_, sample_name, labels, value, unit)
                else:
                    self.add(name, typ, help_, sample_name, {**labels, "worker": str(worker)}, value, unit)
                if also is not None:
                    self.add(also[0], "gauge", also[1], also[0], {**labels, "worker": str(worker)}, value)

    def add_families(self, other: Families) -> None:
        """Add every series of ``other`` (e.g. the retired totals) into this one."""
        for name, fam in other.families.items():
            for sample_name, labels, value in fam["samples"].values():
                self.add(name, fam["type"], fam["help"], sample_name, labels, value, fam["unit"])

    def series(self) -> set[tuple]:
        """Every (family, sample name, labels) held: what a scrape would show."""
        return {(name, *key) for name, fam in self.families.items() for key in fam["samples"]}

    def snapshot(self) -> dict[str, Any]:
        """As an :func:`afpa.ops.metrics.snapshot`-shaped dict (renderable, JSON-able)."""
        out = []
        for name, fam in self.families.items():
            f = {"name": name, "type": fam["type"], "help": fam["help"],
                 "samples": [[s, dict(labels), v] for s, labels, v in fam["samples"].values()]}
            if fam["unit"]:
                f["unit"] = fam["unit"]
            out.append(f)
        return {"version": 1, "families": out}


class ClusterMetrics:
    """Merged metrics of a supervisor's workers, with the counters of dead
    workers kept (see the module docstring).

    ``cluster`` needs ``call(op, args, timeout) -> Deferred[list[dict]]`` (one
    reply per worker, tagged ``{"worker": i, ...}``, ``{"worker": i, "error":
    ...}`` when it failed) and ``workers`` (objects with ``index``, ``pid``,
    ``up``, ``restarts``); ``add_exit_hook(fn)`` is used when it exists."""

    def __init__(self, cluster: Any, timeout: float = SCRAPE_TIMEOUT):
        self.cluster = cluster
        self.timeout = timeout
        self.retired = Families()  # counters of dead workers: one value per series
        self.retired_count = 0
        self.last: dict[int, tuple[Any, dict[str, Any]]] = {}  # index -> (identity, last good snapshot)
        self.gone: dict[int, Any] = {}  # index -> identity last retired there
        self.scrape_errors: dict[int, int] = {}
        add_hook = getattr(cluster, "add_exit_hook", None)
        if add_hook is not None:
            add_hook(self.worker_exited)

    def worker_exited(self, index: int) -> None:
        """The worker at ``index`` died: keep its last counters in the totals."""
        entry = self.last.pop(index, None)
        if entry is not None:
            self._retire(index, entry)

    def _retire(self, index: int, entry: tuple[Any, dict[str, Any]]) -> None:
        identity, snap = entry
        self.retired.add_snapshot(snap, cumulative_only=True)
        self.retired_count += 1
        self.gone[index] = identity

    def observe(self, replies: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Take one round of ``snapshot`` replies; return the merged snapshot."""
        fresh = set()
        up = {w.index: w.up for w in self.cluster.workers}
        for reply in replies:
            index = reply.get("worker")
            if not isinstance(index, int):
                continue
            if "error" in reply or "families" not in reply:
                if up.get(index, True):  # a worker known to be down is afpa_worker_up 0, not a scrape error
                    self.scrape_errors[index] = self.scrape_errors.get(index, 0) + 1
                continue
            identity = reply.get("id")
            if identity is not None and self.gone.get(index) == identity:
                continue  # the last word of a worker already retired
            previous = self.last.get(index)
            if previous is not None and previous[0] != identity:
                self._retire(index, previous)  # replaced without us hearing of the death
            self.last[index] = (identity, reply)
            fresh.add(index)
        merged = Families()
        for index in sorted(self.last):
            merged.add_snapshot(self.last[index][1], worker=index, cumulative_only=index not in fresh)
        merged.add_families(self.retired)
        self._supervisor_families(merged)
        return merged.snapshot()

    def _supervisor_families(self, out: Families) -> None:
        workers = list(self.cluster.workers)
        out.add("afpa_workers", "gauge", "Worker processes up", "afpa_workers", {},
                sum(1 for w in workers if w.up))
        for w in workers:
            labels = {"worker": str(w.index)}
            out.add("afpa_worker_up", "gauge", "1 while the worker process is up", "afpa_worker_up",
                    labels, 1 if w.up else 0)
            out.add("afpa_worker_restarts", "counter", "Times the supervisor restarted the worker",
                    "afpa_worker_restarts_total", labels, w.restarts)
            out.add("afpa_worker_scrape_errors", "counter",
                    "Scrapes a running worker did not answer in time (its last counters were used)",
                    "afpa_worker_scrape_errors_total", labels, self.scrape_errors.get(w.index, 0))
        out.add("afpa_workers_retired", "counter",
                "Dead worker processes whose last counters are kept in the totals",
                "afpa_workers_retired_total", {}, self.retired_count)

    def scrape(self) -> Deferred:
        """Ask every worker for a snapshot; fires with the merged snapshot."""
        d = self.cluster.call("snapshot", {}, self.timeout)
        d.addCallback(self.observe)
        return d
