"""The supervisor's admin site over worker processes, and the worker-side ops it calls.

The supervisor answers ``/metrics`` (merged by :mod:`afpa.ops.clustermetrics`), the
live machine page (every worker's counts added up by :func:`afpa.ops.machineview.merge_views`),
``/healthz``, ``/tables/`` (its own loaded machines) and ``POST /cache/purge``,
``/cache/ban``, ``/cache/tag`` (token checked by the supervisor, then fanned out
to every worker; the answer sums ``purged`` and lists per-worker ``errors``).

What this needs from the supervisor (``cluster``):

- ``call(op, args, timeout) -> Deferred[list[dict]]``: one reply per worker,
  tagged ``{"worker": i, ...}``; a dead or timed-out worker gives
  ``{"worker": i, "error": "..."}``;
- ``workers``: objects with ``index``, ``pid``, ``up``, ``restarts``, ``started``;
- optionally ``add_exit_hook(fn)``: the supervisor calls ``fn(index)`` once when
  the worker at ``index`` dies (before its replacement answers a call);
- optionally ``draining`` (bool): the supervisor is shutting down.

And on the worker side, ``register(op, fn)`` with ``fn(server, args) -> dict``:
:func:`register_worker_ops` registers ``snapshot`` and ``cache``.
"""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.server import Site

from afpa.ops import machineview, metrics

from afpa import reload

from afpa.machine import tables
from afpa.ops.admin import CACHE_WRITES, backend_site, cache_write, check_cache_spec
from afpa.ops.adminauth import Refused
from afpa.ops.clustermetrics import SCRAPE_TIMEOUT, ClusterMetrics
from afpa.config import Settings, read_admin_token

CACHE_TIMEOUT = 10.0  # seconds a worker has to apply a purge (a ban walks its whole store)

# -- worker side ---------------------------------------------------------------------

_identities: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def identity(server: Any) -> str:
    """Who took a snapshot: this process and this Server object.  A replaced
    worker has a new one even if the OS hands it the old pid."""
    token = _identities.get(server)
    if token is None:
        token = _identities[server] = uuid.uuid4().hex[:12]
    return f"{os.getpid()}:{token}"


def op_snapshot(server: Any, args: dict[str, Any]) -> dict[str, Any]:
    """The ``snapshot`` op: this worker's metrics as data (see :func:`afpa.ops.metrics.snapshot`)."""
    snap = metrics.snapshot(server)
    snap["id"] = identity(server)
    return snap


def op_cache(server: Any, args: dict[str, Any]) -> dict[str, Any]:
    """The ``cache`` op: ``{"how": "purge"|"ban"|"tag", "spec": {...}}`` applied by
    the same :func:`afpa.ops.admin.cache_write` the single-process admin runs.  A
    refusal comes back as ``{"error": ..., "status": N}``."""
    how, spec = args.get("how"), args.get("spec")
    if how not in CACHE_WRITES or not isinstance(spec, dict):
        return {"error": f"bad cache op {how!r}", "status": 400}
    try:
        return cache_write(server, how, spec)
    except Refused as exc:
        return {"error": str(exc), "status": exc.status}


def op_machines(server: Any, args: dict[str, Any]) -> dict[str, Any]:
    """The ``machines`` op: this worker's machines with their counts
    (:func:`afpa.ops.machineview.machine_view`), summed by the supervisor for the live page."""
    return machineview.machine_view(server)


def worker_ops() -> dict[str, Callable[[Any, dict[str, Any]], dict[str, Any]]]:
    """The ops a worker serves for the supervisor's admin site, by name."""
    return {"snapshot": op_snapshot, "cache": op_cache, "machines": op_machines}


def register_worker_ops(register: Callable[[str, Callable], Any]) -> None:
    """Register :func:`worker_ops` with a worker's control channel."""
    for op, fn in worker_ops().items():
        register(op, fn)


# -- supervisor side -----------------------------------------------------------------

def merge_cache_replies(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """One answer from every worker's answer to a ``cache`` op: ``purged`` (and
    per-tag counts) summed, ``workers`` that applied it, and ``errors`` listing
    the workers that did not.  When no worker applied it, raise :class:`Refused`:
    the workers' own status if they all refused alike (e.g. a bad regex), else 503."""
    ok = [r for r in replies if "error" not in r]
    errors = [{"worker": r.get("worker"), "error": str(r["error"])} for r in replies if "error" in r]
    if not ok:
        if not replies:
            raise Refused(503, "no worker is running")
        refusals = {(r.get("status"), str(r["error"])) for r in replies}
        if len(refusals) == 1:
            status, message = refusals.pop()
            if isinstance(status, int):
                raise Refused(status, message)
        raise Refused(503, "no worker applied it: " + "; ".join(f"worker {e['worker']}: {e['error']}"
                                                                for e in errors))
    result = {k: v for k, v in ok[0].items() if k != "worker"}
    result["purged"] = sum(r.get("purged", 0) for r in ok)
    if "tags" in result:
        tags: dict[str, int] = {}
        for r in ok:
            for tag, n in r.get("tags", {}).items():
                tags[tag] = tags.get(tag, 0) + n
        result["tags"] = tags
    result["workers"] = len(ok)
    result["errors"] = errors
    return result


class ClusterBackend:
    """The :class:`afpa.ops.admin.AdminBackend` of a supervisor: reads and writes go
    to the workers over ``cluster.call``."""

    def __init__(self, cluster: Any, *, machines: Callable[[], list[tables.Machine]],
                 admin_token: bytes | None, admin_auth: str = "writes", draining: Callable[[], bool] | None = None,
                 reloader: Any = None, trace_hub: Any = None,
                 scrape_timeout: float = SCRAPE_TIMEOUT, cache_timeout: float = CACHE_TIMEOUT):
        self.cluster = cluster
        self.reloader = reloader    # afpa.process.clusterreload.ClusterReload, when the supervisor offers reloads
        self.trace_hub = trace_hub  # afpa.ops.clustertrace.ClusterTraces' hub: GET /trace over every worker
        self.admin_token = admin_token
        self.admin_auth = admin_auth
        self._machines = machines
        self._draining = draining or (lambda: bool(getattr(cluster, "draining", False)))
        self.view = ClusterMetrics(cluster, scrape_timeout)
        self.cache_timeout = cache_timeout

    def metrics(self) -> Deferred:
        """Fires with the merged Prometheus text; a worker that does not answer
        in time is counted, not waited for."""
        return self.view.scrape().addCallback(metrics.exposition)

    def health(self) -> tuple[int, str]:
        """ok while some worker is up and the supervisor is not draining."""
        if self._draining():
            return 503, "draining"
        if not any(w.up for w in self.cluster.workers):
            return 503, "no worker up"
        return 200, "ok"

    def machines(self) -> list[tables.Machine]:
        return self._machines()

    def machine_view(self) -> Deferred:
        """Every worker's machines with their counts added up (a worker that does
        not answer in time is left out of this view)."""
        d = self.cluster.call("machines", {}, self.view.timeout)
        return d.addCallback(lambda replies: machineview.merge_views(
            [r for r in replies if "error" not in r]))

    def reload(self) -> Deferred:
        """Reload every worker, or none (:class:`afpa.process.clusterreload.ClusterReload`);
        the supervisor's own token and admin settings follow a successful one."""
        if self.reloader is None:
            raise Refused(501, "this supervisor does not reload")

        def refresh(result: dict[str, Any]) -> dict[str, Any]:
            if result["ok"]:
                server = self.reloader.server
                self.admin_token, self.admin_auth = server.admin_token, server.settings.admin_auth
            return result
        return self.reloader.reload().addCallback(refresh)

    def cache_write(self, how: str, spec: dict[str, Any]) -> Deferred:
        """Check the body once here (a bad field is one 400, not N), then let
        every worker apply it."""
        check_cache_spec(how, spec)
        d = self.cluster.call("cache", {"how": how, "spec": spec}, self.cache_timeout)
        return d.addCallback(merge_cache_replies)


def supervisor_admin_site(cluster: Any, settings: Settings, *, registry: Any = None,
                          machines: Callable[[], list[tables.Machine]] | None = None,
                          draining: Callable[[], bool] | None = None, reloader: Any = None,
                          trace_hub: Any = None) -> Site:
    """The supervisor's admin site (listen on it with ``reactor.listenTCP(port,
    site, interface=host)`` from ``settings.admin``).  ``machines`` gives the
    tables ``/tables/`` shows (default: those ``settings`` name, loaded once)."""
    if machines is None:
        from afpa.net.intrinsics import default_registry
        machine, companions = reload.load_machines(settings, registry or default_registry())
        loaded = [machine, *companions.values()]

        def machines() -> list[tables.Machine]:
            return loaded
    backend = ClusterBackend(cluster, machines=machines, admin_token=read_admin_token(settings),
                             admin_auth=settings.admin_auth, draining=draining, reloader=reloader,
                             trace_hub=trace_hub)
    return backend_site(backend)
