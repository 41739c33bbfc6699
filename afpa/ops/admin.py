"""The admin listener: the live machine page at ``/`` (one page per running
machine at ``/machines/<name>``, fed by ``/machines.json`` and
``/machines/<name>.json``), ``/metrics`` for Prometheus, ``/healthz``, and the
running tables drawn as DOT (``/tables/<machine>.dot``) or shown as text
(``/tables/<machine>.toml``), listed at ``/tables/``.  Bind it to loopback or a
management network only.

``GET /trace`` streams finished requests live (see :mod:`afpa.ops.tracestream`).

Writes (``POST /cache/purge``, ``/cache/ban``, ``/cache/tag``, ``/reload``) and ``/trace`` need
``Authorization: Bearer <token>`` with the server's admin token (401 without,
403 with a wrong one); with no token configured every write is refused (403).
Reads stay open unless ``admin_auth = "all"``: then every endpoint needs the
token except ``/healthz`` (load balancers poll it) and the page shells (static
HTML that shows nothing until its script fetches the data with the token).
Only POST changes anything; a body is JSON of at most :data:`MAX_BODY` bytes,
and every answer is one line of JSON.

It answers with ``Server: afpa`` (no framework name or version) and closes a
connection that sends nothing for :data:`TIMEOUT` seconds (twisted.web's default
is twelve hours, which would let idle clients pile up)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from importlib import resources
from urllib.parse import unquote
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST
from html import escape

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import NoResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from afpa.machine import graph, tables

from afpa.ops import machineview, metrics
from afpa.ops.adminauth import _json, _Refused, authorize
from afpa.ops.tracestream import TraceStream

log = Logger()


class AdminBackend(Protocol):
    """What the admin resources need from whatever they administer.  Any answer
    may instead be a Deferred firing with it (a supervisor asks its workers)."""

    admin_token: bytes | None  # None: writes are refused
    admin_auth: str  # "writes": only writes need the token; "all": reads too

    def machine_view(self) -> dict[str, Any] | Deferred:
        """The running machines with their counts (:func:`afpa.ops.machineview.machine_view`)."""

    def metrics(self) -> bytes | Deferred:
        """The Prometheus text for ``/metrics``."""

    def health(self) -> tuple[int, str]:
        """``(200, "ok")`` while serving, else ``(503, why)``."""

    def machines(self) -> list[tables.Machine]:
        """The loaded machines shown at ``/tables/``."""

    def cache_write(self, how: str, spec: dict[str, Any]) -> dict[str, Any] | Deferred:
        """Apply ``POST /cache/<how>`` (purge, ban, tag); raise :class:`Refused`."""

    def reload(self) -> dict[str, Any] | Deferred:
        """``POST /reload``: ``{"ok": true, ...}`` or ``{"ok": false, "problems": [...]}``."""

    @property
    def trace_hub(self) -> Any:
        """The :class:`afpa.machine.trace.TraceHub` whose events ``GET /trace`` streams."""


class LocalBackend:
    """The admin backend of one running :class:`~afpa.server.Server`."""

    def __init__(self, server: Any):
        self.server = server

    @property
    def admin_token(self) -> bytes | None:
        return self.server.admin_token

    @property
    def admin_auth(self) -> str:
        return self.server.settings.admin_auth

    def machine_view(self) -> dict[str, Any]:
        return machineview.machine_view(self.server)

    def metrics(self) -> bytes:
        # Through a snapshot, the path a worker's counters take to a supervisor.
        return metrics.exposition(metrics.snapshot(self.server))

    def health(self) -> tuple[int, str]:
        return (503, "draining") if self.server.draining else (200, "ok")

    def machines(self) -> list[tables.Machine]:
        return self.server.machines()

    def cache_write(self, how: str, spec: dict[str, Any]) -> dict[str, Any]:
        return cache_write(self.server, how, spec)

    def reload(self) -> dict[str, Any]:
        return self.server.reload()

    @property
    def trace_hub(self) -> Any:
        return self.server.trace_hub


def _answer(request: Any, result: Any, render: Callable[[Any], bytes]) -> Any:
    """``render(result)`` now, or once a Deferred result fires (NOT_DONE_YET)."""
    if not isinstance(result, Deferred):
        return render(result)
    gone = []
    request.notifyFinish().addErrback(gone.append)  # the client hung up meanwhile

    def done(value: Any) -> None:
        body = render(value)
        if not gone:
            request.write(body)
            request.finish()

    def failed(failure: Any) -> None:
        log.failure("admin request failed", failure)
        if not gone:
            request.write(_json(request, 500, {"error": "internal error (see the server log)"}))
            request.finish()

    result.addCallback(done).addErrback(failed)
    return NOT_DONE_YET


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, backend: AdminBackend):
        super().__init__()
        self.backend = backend

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return _answer(request, self.backend.metrics(), lambda text: text)


class _Health(Resource):
    """``ok`` while serving; 503 once a drain began, so a load balancer that polls
    it stops sending new clients before the listeners are gone."""

    isLeaf = True

    def __init__(self, backend: AdminBackend):
        super().__init__()
        self.backend = backend

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        status, text = self.backend.health()
        request.setResponseCode(status)
        return text.encode() + b"\n"


TIMEOUT = 30.0  # seconds a connection may stay silent (a request head included)


def _index(request: Any, title: str, links: list[tuple[str, str]]) -> bytes:
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    items = "".join(f'<li><a href="{escape(href)}">{escape(href)}</a> {escape(what)}</li>\n'
                    for href, what in links)
    return (f"<!DOCTYPE html>\n<title>{escape(title)}</title>\n<h1>{escape(title)}</h1>\n"
            f"<ul>\n{items}</ul>\n").encode()


def _page() -> tuple[bytes, bytes]:
    """The machine page (one static file for the index and every machine) and a
    Content-Security-Policy that lets only its own inline script and style run."""
    html = resources.files("afpa.ops").joinpath("static/machines.html").read_bytes()

    def digest(tag: bytes) -> str:
        body = re.search(rb"<" + tag + rb">(.*?)</" + tag + rb">", html, re.S)
        assert body is not None, f"machines.html has no <{tag.decode()}>"
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.group(1)).digest()).decode() + "'"

    csp = (f"default-src 'none'; script-src {digest(b'script')}; style-src {digest(b'style')}; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, csp.encode()


class _Page(Resource):
    """The live machine page: static HTML whose script draws the data of
    ``/machines.json`` (at ``/``) or ``/machines/<name>.json``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.html, self.csp = _page()

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", self.csp)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-store")
        return self.html


class _Machines(Resource):
    """``/machines.json`` (every machine) and ``/machines/<name>.json`` (one), the data
    of :func:`afpa.ops.machineview.machine_view`; ``/machines/<name>`` is the page."""

    isLeaf = True

    def __init__(self, backend: AdminBackend, page: _Page):
        super().__init__()
        self.backend = backend
        self.page = page

    def render_GET(self, request: Any) -> Any:
        if request.path == b"/machines.json":
            return _answer(request, self.backend.machine_view(), lambda view: _json(request, 200, view))
        one = re.fullmatch(rb"/machines/([^/]*)", request.path)
        if one is None:
            return _json(request, 404, {"error": "not found; see /machines.json"})
        name = unquote(one.group(1).decode("utf-8", "replace"))
        if not name.endswith(".json"):
            return self.page.render_GET(request)
        return _answer(request, self.backend.machine_view(), lambda view: _one_machine(request, view, name[:-5]))


def _one_machine(request: Any, view: dict[str, Any], name: str) -> bytes:
    for m in view["machines"]:
        if m["name"] == name:
            return _json(request, 200, {"time": view["time"], **m})
    return _json(request, 404, {"error": f"no machine named {name!r}; see /machines.json",
                                "machines": [m["name"] for m in view["machines"]]})


def _open_without_token(path: bytes) -> bool:
    """What ``admin_auth = "all"`` leaves open: ``/healthz`` for load balancers, and
    the page shells (their script asks for the token before fetching any data)."""
    if path in (b"/", b"/healthz"):
        return True
    return path.startswith(b"/machines/") and not path.endswith(b".json") and path.count(b"/") == 2


class _Tables(Resource):
    isLeaf = True

    def __init__(self, backend: AdminBackend):
        super().__init__()
        self.backend = backend

    def render_GET(self, request: Any) -> bytes:
        name = request.postpath[0].decode("utf-8", "replace") if request.postpath else ""
        if not name and len(request.postpath) <= 1:
            links = []
            for m in self.backend.machines():
                links += [(f"/tables/{m.name}.toml", f"table ({m.source})"),
                          (f"/tables/{m.name}.dot", "Graphviz drawing")]
            return _index(request, "afpa tables", links)
        for m in self.backend.machines():
            if name == f"{m.name}.toml":
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return m.text.encode()
            if name == f"{m.name}.dot":
                spec, _ = tables.parse(m.text, m.source)
                request.setHeader(b"content-type", b"text/vnd.graphviz; charset=utf-8")
                return graph.to_dot(spec).encode()
        return NoResource("no such table; try /tables/<machine>.toml or .dot").render(request)


MAX_BODY = 64 * 1024  # bytes of a write request's JSON body


class _CacheWrite(Resource):
    """One cache invalidation endpoint: POST a JSON object, get ``{"purged": N, ...}``."""

    isLeaf = True

    def __init__(self, backend: AdminBackend, how: str):
        super().__init__()
        self.backend = backend
        self.how = how

    def render(self, request: Any) -> bytes:
        try:
            if request.method != b"POST":
                request.setHeader(b"allow", b"POST")
                raise _Refused(405, f"use POST for /cache/{self.how} (it changes the cache)")
            self._authorize(request)
            spec = self._body(request)
            result = self.backend.cache_write(self.how, spec)
        except _Refused as exc:
            return _json(request, exc.status, {"error": str(exc)})
        if isinstance(result, Deferred):
            result.addErrback(_refusal)  # a refusal is an answer; anything else a 500
        return _answer(request, result, lambda value: (
            _json(request, value.status, {"error": str(value)}) if isinstance(value, _Refused)
            else _json(request, 200, value)))

    def _authorize(self, request: Any) -> None:
        authorize(request, self.backend.admin_token)

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



CACHE_WRITES = ("purge", "ban", "tag")


def check_cache_spec(how: str, spec: dict[str, Any]) -> bool:
    """The checks of a ``POST /cache/<how>`` body that need no server (known
    fields, ``soft`` a boolean); returns ``soft``.  Raises :class:`Refused`."""
    known = {"purge": {"url", "host", "path", "soft"}, "ban": {"host", "prefix", "regex", "soft"},
             "tag": {"tags", "soft"}}[how]
    unknown = sorted(set(spec) - known)
    if unknown:
        raise _Refused(400, f"unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
    soft = spec.get("soft", False)
    if not isinstance(soft, bool):
        raise _Refused(400, "'soft' must be true or false")
    return soft


def cache_write(server: Any, how: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Apply one cache invalidation (``how`` is purge, ban or tag) to ``server``'s
    store: ``{"purged": N, ...}``.  Raises :class:`Refused` (400, 501) for a bad
    request.  The single-process admin and a worker's ``cache`` op both run this."""
    soft = check_cache_spec(how, spec)
    inv = server.machine.module.invalidation
    if inv is None:
        raise _Refused(501, f"protocol module {server.machine.module.name!r} has no cache invalidation")
    cache = server.runtime.cache
    now = server.reactor.seconds()
    result: dict[str, Any] = {"purged": 0}
    try:
        if how == "purge":
            for key in inv.keys(spec, server.g):
                result["purged"] += cache.purge(key, soft=soft, now=now)
        elif how == "ban":
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


def _refusal(failure: Any) -> _Refused:
    failure.trap(_Refused)
    return failure.value


class _Reload(Resource):
    """``POST /reload`` (token): re-read and swap the configuration; 200 with
    ``{"ok": true, "generation": n, "changed": [...]}``, or 422 with
    ``{"ok": false, "problems": [{"file", "line", "problem"}, ...]}`` and the old
    configuration still serving."""

    isLeaf = True

    def __init__(self, backend: AdminBackend):
        super().__init__()
        self.backend = backend

    def render(self, request: Any) -> Any:
        try:
            if request.method != b"POST":
                request.setHeader(b"allow", b"POST")
                raise _Refused(405, "use POST for /reload (it changes the configuration)")
            authorize(request, self.backend.admin_token)
        except _Refused as exc:
            return _json(request, exc.status, {"error": str(exc)})
        return _answer(request, self.backend.reload(),
                       lambda result: _json(request, 200 if result["ok"] else 422, result))


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


class _Answer(Resource):
    """A fixed one-line JSON answer (a refusal before any resource is looked up)."""

    isLeaf = True

    def __init__(self, status: int, value: Any):
        super().__init__()
        self.status = status
        self.value = value

    def render(self, request: Any) -> bytes:
        return _json(request, self.status, self.value)


class AdminSite(Site):
    """twisted.web Site that does not name itself in `Server:` and, with
    ``admin_auth = "all"``, asks every request but the open ones for the token
    before it looks anything up (so an unknown path says no more than a known one)."""

    backend: Any = None

    def getResourceFor(self, request: Any) -> Any:
        # twisted.web has just set "Server: TwistedWeb/<version>"; say less.
        request.setHeader(b"server", b"afpa")
        # Read at each request: a reload may change the setting or the token.
        if (self.backend is not None and self.backend.admin_auth == "all"
                and not _open_without_token(request.path)):
            try:
                authorize(request, self.backend.admin_token)
            except _Refused as exc:
                return _Answer(exc.status, {"error": str(exc)})
        return super().getResourceFor(request)


def admin_site(server: Any) -> Site:
    """The admin web site for a running :class:`~afpa.server.Server`."""
    return backend_site(LocalBackend(server))


def backend_site(backend: AdminBackend) -> Site:
    """The admin web site over any :class:`AdminBackend` (one server, or a
    supervisor's view of its workers)."""
    root = Resource()
    page = _Page()
    root.putChild(b"", page)
    machines = _Machines(backend, page)
    root.putChild(b"machines", machines)
    root.putChild(b"machines.json", machines)
    root.putChild(b"metrics", _Metrics(backend))
    root.putChild(b"healthz", _Health(backend))
    root.putChild(b"tables", _Tables(backend))
    cache = Resource()
    for how in CACHE_WRITES:
        cache.putChild(how.encode(), _CacheWrite(backend, how))
    root.putChild(b"cache", cache)
    root.putChild(b"reload", _Reload(backend))
    root.putChild(b"trace", TraceStream(backend))
    site = AdminSite(root, requestFactory=AdminRequest, timeout=TIMEOUT)
    site.backend = backend
    site.noisy = False
    site.log = lambda request: None  # scrapes every few seconds would drown the server log
    return site
