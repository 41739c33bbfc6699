"""The admin listener: ``/metrics`` for Prometheus, ``/healthz``, and the running
tables drawn as DOT (``/tables/<machine>.dot``) or shown as text
(``/tables/<machine>.toml``), listed at ``/tables/``; ``/`` lists all of it.
Bind it to loopback or a management network only.

``GET /trace`` streams finished requests live (see :mod:`afpa.tracestream`).

Writes (``POST /cache/purge``, ``/cache/ban``, ``/cache/tag``) and ``/trace`` need
``Authorization: Bearer <token>`` with the server's admin token (401 without,
403 with a wrong one); with no token configured every write is refused (403).
Reads stay open.  Only POST changes anything; a body is JSON of at most
:data:`MAX_BODY` bytes, and every answer is one line of JSON.

It answers with ``Server: afpa`` (no framework name or version) and closes a
connection that sends nothing for :data:`TIMEOUT` seconds (twisted.web's default
is twelve hours, which would let idle clients pile up)."""

from __future__ import annotations

import hmac
import io
import json
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from html import escape

from twisted.web.resource import NoResource, Resource
from twisted.web.server import Request, Site

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
                                              ("/tables/", "the running transition tables"),
                                              ("/cache/purge", "POST: purge a URL (token)"),
                                              ("/cache/ban", "POST: purge by path prefix or regex (token)"),
                                              ("/cache/tag", "POST: purge by surrogate key (token)"),
                                              ("/trace", "live trace of requests, NDJSON (token); "
                                                         "?host=&path=&status=&state=&sample=")])


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


MAX_BODY = 64 * 1024  # bytes of a write request's JSON body


class _Refused(Exception):
    """An admin write answered with ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _json(request: Any, status: int, value: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value, separators=(", ", ": ")).encode() + b"\n"


def authorize(request: Any, token: bytes | None) -> None:
    """Refuse (raise :class:`_Refused`) unless the request carries
    ``Authorization: Bearer <token>``: 401 without credentials, 403 with a wrong
    token, and 403 for everyone when no token is configured."""
    if token is None:
        raise _Refused(403, "this admin endpoint is disabled: no admin token is configured "
                            "(admin_token_file, --admin-token-file or AFPA_ADMIN_TOKEN)")
    header = request.getHeader(b"authorization") or b""
    scheme, _, given = header.strip().partition(b" ")
    given = given.strip()
    if scheme.lower() != b"bearer" or not given:
        request.setHeader(b"www-authenticate", b'Bearer realm="afpa admin"')
        raise _Refused(401, "this endpoint needs Authorization: Bearer <admin token>")
    if not hmac.compare_digest(given, token):
        raise _Refused(403, "wrong admin token")


class _CacheWrite(Resource):
    """One cache invalidation endpoint: POST a JSON object, get ``{"purged": N, ...}``."""

    isLeaf = True

    def __init__(self, server: Any, how: str):
        super().__init__()
        self.afpa = server  # not "server": twisted.web sets that attribute itself
        self.how = how

    def render(self, request: Any) -> bytes:
        try:
            if request.method != b"POST":
                request.setHeader(b"allow", b"POST")
                raise _Refused(405, f"use POST for /cache/{self.how} (it changes the cache)")
            self._authorize(request)
            spec = self._body(request)
            return _json(request, 200, self._apply(spec))
        except _Refused as exc:
            return _json(request, exc.status, {"error": str(exc)})

    def _authorize(self, request: Any) -> None:
        authorize(request, self.afpa.admin_token)

    @staticmethod
    def _body(request: Any) -> dict[str, Any]:
        if getattr(request, "too_large", False):
            raise _Refused(413, f"request body larger than {MAX_BODY} bytes")
        request.content.seek(0)
        raw = request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise _Refused(413, f"request body larger than {MAX_BODY} bytes")
        try:
            spec = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise _Refused(400, f"request body is not JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise _Refused(400, "request body must be a JSON object")
        return spec

    def _apply(self, spec: dict[str, Any]) -> dict[str, Any]:
        known = {"purge": {"url", "host", "path", "soft"}, "ban": {"host", "prefix", "regex", "soft"},
                 "tag": {"tags", "soft"}}[self.how]
        unknown = sorted(set(spec) - known)
        if unknown:
            raise _Refused(400, f"unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
        soft = spec.get("soft", False)
        if not isinstance(soft, bool):
            raise _Refused(400, "'soft' must be true or false")
        inv = self.afpa.machine.module.invalidation
        if inv is None:
            raise _Refused(501, f"protocol module {self.afpa.machine.module.name!r} has no cache invalidation")
        cache = self.afpa.runtime.cache
        now = self.afpa.reactor.seconds()
        result: dict[str, Any] = {"purged": 0}
        try:
            if self.how == "purge":
                for key in inv.keys(spec, self.afpa.g):
                    result["purged"] += cache.purge(key, soft=soft, now=now)
            elif self.how == "ban":
                result["purged"] = cache.purge_where(inv.predicate(spec), soft=soft, now=now)
            else:
                tags = spec.get("tags")
                if not isinstance(tags, list) or not tags or len(tags) > 1000:
                    raise ValueError("'tags' must be a list of 1 to 1000 strings")
                per_tag = {}
                for text in tags:
                    n = cache.purge_tag(inv.tag(text), soft=soft, now=now)
                    per_tag[text] = per_tag.get(text, 0) + n
                    result["purged"] += n
                result["tags"] = per_tag
        except ValueError as exc:
            raise _Refused(400, str(exc)) from None
        for name in ("url", "host", "path", "prefix", "regex"):
            if name in spec:
                result[name] = spec[name]
        result["soft"] = soft
        return result


class AdminRequest(Request):
    """A twisted.web request that keeps at most :data:`MAX_BODY` bytes of a body
    in memory and drops the rest (the resource then answers 413): twisted.web
    alone would spool any size to a temporary file."""

    too_large = False

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()
        self.received = 0
        if length is not None and length > MAX_BODY:
            self.too_large = True

    def handleContentChunk(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > MAX_BODY:
            self.too_large = True
        if not self.too_large:
            self.content.write(data)


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
    cache = Resource()
    for how in ("purge", "ban", "tag"):
        cache.putChild(how.encode(), _CacheWrite(server, how))
    root.putChild(b"cache", cache)
    from afpa.tracestream import TraceStream  # it imports authorize from here
    root.putChild(b"trace", TraceStream(server))
    site = AdminSite(root, requestFactory=AdminRequest, timeout=TIMEOUT)
    site.noisy = False
    site.log = lambda request: None  # scrapes every few seconds would drown the server log
    return site
