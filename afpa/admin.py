"""The admin listener: ``/metrics`` for Prometheus, ``/healthz``, and the running
tables drawn as DOT (``/tables/<machine>.dot``) or shown as text
(``/tables/<machine>.toml``).  Bind it to loopback or a management network only."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.web.resource import NoResource, Resource
from twisted.web.server import Site

from afpa import graph, tables
from afpa.metrics import Collector


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, server: Any):
        super().__init__()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(server))

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class _Health(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"ok\n"


class _Tables(Resource):
    isLeaf = True

    def __init__(self, server: Any):
        super().__init__()
        self.afpa = server  # not "server": twisted.web sets that attribute itself

    def render_GET(self, request: Any) -> bytes:
        name = request.postpath[0].decode("utf-8", "replace") if request.postpath else ""
        for m in self.afpa.machines():
            if name == f"{m.name}.toml":
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return m.text.encode()
            if name == f"{m.name}.dot":
                spec, _ = tables.parse(m.text, m.source)
                request.setHeader(b"content-type", b"text/vnd.graphviz; charset=utf-8")
                return graph.to_dot(spec).encode()
        return NoResource("no such table; try /tables/<machine>.toml or .dot").render(request)


def admin_site(server: Any) -> Site:
    """The admin web site for a running :class:`~afpa.server.Server`."""
    root = Resource()
    root.putChild(b"metrics", _Metrics(server))
    root.putChild(b"healthz", _Health())
    root.putChild(b"tables", _Tables(server))
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None  # scrapes every few seconds would drown the server log
    return site
