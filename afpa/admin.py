"""The admin listener: ``/metrics`` for Prometheus, ``/healthz``, and the running
tables drawn as DOT (``/tables/<machine>.dot``) or shown as text
(``/tables/<machine>.toml``), listed at ``/tables/``; ``/`` lists all of it.
Bind it to loopback or a management network only.

It answers with ``Server: afpa`` (no framework name or version) and closes a
connection that sends nothing for :data:`TIMEOUT` seconds (twisted.web's default
is twelve hours, which would let idle clients pile up)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from html import escape

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
    """``ok`` while serving; 503 once a drain began, so a load balancer that polls
    it stops sending new clients before the listeners are gone."""

    isLeaf = True

    def __init__(self, server: Any):
        super().__init__()
        self.afpa = server  # not "server": twisted.web sets that attribute itself

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        if self.afpa.draining:
            request.setResponseCode(503)
            return b"draining\n"
        return b"ok\n"


TIMEOUT = 30.0  # seconds a connection may stay silent (a request head included)


def _index(request: Any, title: str, links: list[tuple[str, str]]) -> bytes:
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    items = "".join(f'<li><a href="{escape(href)}">{escape(href)}</a> {escape(what)}</li>\n'
                    for href, what in links)
    return (f"<!DOCTYPE html>\n<title>{escape(title)}</title>\n<h1>{escape(title)}</h1>\n"
            f"<ul>\n{items}</ul>\n").encode()


class _Root(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return _index(request, "afpa admin", [("/metrics", "Prometheus metrics"), ("/healthz", "liveness"),
                                              ("/tables/", "the running transition tables")])


class _Tables(Resource):
    isLeaf = True

    def __init__(self, server: Any):
        super().__init__()
        self.afpa = server  # not "server": twisted.web sets that attribute itself

    def render_GET(self, request: Any) -> bytes:
        name = request.postpath[0].decode("utf-8", "replace") if request.postpath else ""
        if not name and len(request.postpath) <= 1:
            links = []
            for m in self.afpa.machines():
                links += [(f"/tables/{m.name}.toml", f"table ({m.source})"),
                          (f"/tables/{m.name}.dot", "Graphviz drawing")]
            return _index(request, "afpa tables", links)
        for m in self.afpa.machines():
            if name == f"{m.name}.toml":
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return m.text.encode()
            if name == f"{m.name}.dot":
                spec, _ = tables.parse(m.text, m.source)
                request.setHeader(b"content-type", b"text/vnd.graphviz; charset=utf-8")
                return graph.to_dot(spec).encode()
        return NoResource("no such table; try /tables/<machine>.toml or .dot").render(request)


class AdminSite(Site):
    """twisted.web Site that does not name itself in `Server:`."""

    def getResourceFor(self, request: Any) -> Any:
        # twisted.web has just set "Server: TwistedWeb/<version>"; say less.
        request.setHeader(b"server", b"afpa")
        return super().getResourceFor(request)


def admin_site(server: Any) -> Site:
    """The admin web site for a running :class:`~afpa.server.Server`."""
    root = Resource()
    root.putChild(b"", _Root())
    root.putChild(b"metrics", _Metrics(server))
    root.putChild(b"healthz", _Health(server))
    root.putChild(b"tables", _Tables(server))
    site = AdminSite(root, timeout=TIMEOUT)
    site.noisy = False
    site.log = lambda request: None  # scrapes every few seconds would drown the server log
    return site
