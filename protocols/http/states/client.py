"""The HTTP module's state functions (AFPA paper, Figure 1).

Each function has the runtime's one signature ``fn(g, conn, req) -> outcome`` and
declares its outcomes with ``@state``; ``statetables/http.toml`` wires them.
A function that has an answer leaves it on ``req`` (``head``, ``body``,
``status``, ``close``) for the runtime's Send Engine.

The fast path: a fresh hit for a small object goes ``derive_request`` ->
``derive_cached_response`` -> ``afpa.send_engine`` inside the ``dataReceived``
call that brought the request, with no Deferred, timer or thread involved.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred

from afpa.cache.store import CacheObject, Variants, fragments_of
from afpa.machine.modules import state
from afpa.machine.scopes import WAIT
from afpa.net.sendengine import FileBody, Pieces
from protocols.http.policy import cachepolicy, conditional, ranges
from protocols.http.states import files, siblings, tracing
from protocols.http.wire.errors import HttpError
from protocols.http.wire.parser import KNOWN_METHODS, ChunkedBody, LengthBody, parse_head
from protocols.http.wire.responses import finish_head, object_heads, set_error


class _Discard:
    """The body of an answered request, read and dropped so the connection can
    carry the next request; at most ``left`` bytes of it."""

    __slots__ = ("reader", "left")

    def __init__(self, reader: Any, left: int):
        self.reader = reader
        self.left = left


@state("complete", "need_more", "malformed", needs=(),
       provides={"complete": ("request",), "malformed": ("response",)})
def derive_request(g: Any, conn: Any, req: Any) -> str:
    """Parse one request from the connection's input (strict HTTP/1.x)."""
    try:
        if conn.pending is not None and not _discard_body(g, conn):
            return "need_more"
        buf = conn.inbuf
        pos = req.raw_start = conn.inpos
        if pos >= len(buf):
            return "need_more"
        end = parse_head(buf, pos, conn.scan, g.settings, req)
    except HttpError as exc:
        conn.inpos = len(conn.inbuf)
        conn.pending = None
        set_error(g, req, exc.status, exc.detail, close=True)
        return "malformed"
    if end < 0:
        conn.scan = req.scan_hint
        if conn.timer != WAIT:
            # A head has begun: it must be complete within timeouts.header
            # (counted from its first byte; ``timeout`` then goes to answer_timeout).
            conn.arm(g.reactor.seconds() + g.settings.header_timeout, WAIT)
        return "need_more"
    conn.inpos = conn.scan = end
    if req.chunked or req.content_length > 0:
        # The body is left for whoever answers: forwarded to a backend, or
        # read and dropped before the next request (see settle_body).
        reader = ChunkedBody() if req.chunked else LengthBody(req.content_length)
        conn.pending = _Discard(reader, g.settings.max_discard_body)
    if not req.keep_alive or conn.requests + 1 >= g.settings.keepalive_requests:
        req.close = True
    if req.trace_asked and tracing.allowed(g, conn):
        return tracing.TRACE_COMPLETE  # "complete", and the answer carries its trace
    return "complete"


def settle_body(g: Any, conn: Any, req: Any) -> None:
    """For an answer that does not read the request body: close afterwards when
    reading and dropping it is not an option (too large, or the client waits for
    100-continue before sending it); otherwise it is dropped before the next request."""
    if conn.pending is not None and (req.expect_continue or req.content_length > g.settings.max_discard_body):
        req.close = True


def _discard_body(g: Any, conn: Any) -> bool:
    """Drop the previous request's body from the input; True once it is all read."""
    d = conn.pending
    start = conn.inpos
    pos, _, finished = d.reader.read(conn.inbuf, start)
    conn.inpos = conn.scan = pos
    d.left -= pos - start
    if d.left < 0:
        raise HttpError(413, "request body too large to discard")
    if finished:
        conn.pending = None
        return True
    conn.arm(g.reactor.seconds() + g.runtime.settings.idle_timeout, WAIT)  # the body must keep arriving
    return False


@state("hit", "miss", "stale", "stale_hit", needs=("request",),
       provides={"hit": ("response",), "stale": ("stale",), "stale_hit": ("response", "stale")})
def derive_cached_response(g: Any, conn: Any, req: Any) -> str:
    """Look the request up in the memory cache; a fresh hit is answered at once."""
    method = req.method
    if method != b"GET" and method != b"HEAD":
        req.cache_status = b"afpa; fwd=method"
        return "miss"
    if g.router.keyed:
        key = req.key = routed_key(g, req)  # some route sorts or drops the query
    else:
        key = req.key = (req.host, req.target)
    now = g.reactor.seconds()
    if req.cache_control is not None:
        return _directed_lookup(g, conn, req, key, now)
    obj = g.cache.get(key, now)
    if obj is None:
        req.cache_status = b"afpa; fwd=uri-miss"
        return "miss"
    if obj.__class__ is Variants:
        # The URL varies (Vary): pick the variant this request selects.
        obj = g.cache.select(obj, cachepolicy.secondary_key(obj.selector, req), now)
        if obj is None:
            req.cache_status = b"afpa; fwd=vary-miss"
            return "miss"
    if obj.fresh_until < now:
        if obj.meta is not None:
            return _stale_lookup(g, conn, req, obj, now)  # kept off the fresh-hit path
        req.stale = obj
        req.cache_status = b"afpa; fwd=stale"
        return "stale"
    req.cache_status = b"afpa; hit"
    if conn.pending is not None:
        settle_body(g, conn, req)
    if (req.range is None and req.if_none_match is None and req.if_modified_since is None
            and req.if_match is None and req.if_unmodified_since is None):
        # The common hit: no validators or ranges to weigh, straight to the head.
        req.status = 200
        # stored_at is when the origin made it (RFC 9111 4.2.3), so this is its
        # current age; a stored backend response (meta) keeps the origin's Date.
        req.head = finish_head(g, req, obj.head, now, int(now - obj.stored_at), obj.meta is not None)
        req.body = obj if method == b"GET" else None
        return "hit"
    _answer(g, req, obj.head, obj.short_head, obj.etag, obj.last_modified, obj, now,
            int(now - obj.stored_at), obj.meta is not None)
    return "hit"


def routed_key(g: Any, req: Any) -> tuple[bytes, bytes]:
    """The cache key when some route has key rules: the route is chosen now
    (and kept on ``req.route`` for derive_miss_response) and its ``query`` rule
    applied to the target."""
    route = req.route = g.router.choose(req.host, req.path)
    return req.host, cachepolicy.key_target(route.cache, req.path, req.query, req.target)


def _stale_lookup(g: Any, conn: Any, req: Any, obj: Any, now: float) -> str:
    """A stored backend response past its freshness.  Past ``cache.keep`` it is
    dropped (a miss).  Within its ``stale-while-revalidate`` window (RFC 5861 3)
    or the operator's ``cache.grace`` it answers at once (``stale_hit``: the
    next state starts one background refresh); otherwise it is revalidated
    (``stale``).  ``must-revalidate``/``proxy-revalidate``/``no-cache``
    responses are never answered stale."""
    meta = obj.meta
    late = now - obj.fresh_until
    keep = g.settings.keep
    if keep and now - max(obj.fresh_until, obj.stored_at) > keep:
        g.cache.discard(obj)
        req.cache_status = b"afpa; fwd=uri-miss"
        return "miss"
    req.stale = obj
    if not (meta.must_revalidate or meta.no_cache):
        if late <= meta.stale_while_revalidate:
            answer_stale(g, conn, req, obj, now, b"afpa; hit", "while-revalidate")
            return "stale_hit"
        if late <= g.settings.grace:
            answer_stale(g, conn, req, obj, now, b"afpa; hit", "grace")
            return "stale_hit"
    req.cache_status = b"afpa; fwd=stale"
    return "stale"


STALE_DETAIL = {"while-revalidate": b"stale-while-revalidate", "if-error": b"stale-if-error", "grace": b"grace"}


def answer_stale(g: Any, conn: Any, req: Any, obj: Any, now: float, status: bytes, why: str) -> None:
    """Answer ``req`` from the stale ``obj`` (its own conditionals and Range
    honoured as on a hit).  ``Cache-Status`` gets ``status``, the negative
    ``ttl`` RFC 9211 2.4 gives a stale response, and ``detail`` saying why
    (``why``: a label of ``afpa_cache_stale_served_total``)."""
    g.stale_served[why] += 1
    req.cache_status = status + b"; ttl=%d; detail=%s" % (int(obj.fresh_until - now), STALE_DETAIL[why])
    settle_body(g, conn, req)
    _answer(g, req, obj.head, obj.short_head, obj.etag, obj.last_modified, obj, now,
            int(now - obj.stored_at), True)


def _directed_lookup(g: Any, conn: Any, req: Any, key: Any, now: float) -> str:
    """The lookup for a request with its own Cache-Control (or Pragma: no-cache),
    kept off the fast path (RFC 9111 5.2.1).  A stored response the directives
    refuse is forwarded like a stale one (``fwd=request``); ``only-if-cached``
    with nothing usable is answered 504."""
    cc = cachepolicy.request_directives(req.cache_control)
    obj = g.cache.get(key, now)
    miss = b"afpa; fwd=uri-miss"
    if obj is not None and obj.__class__ is Variants:
        obj = g.cache.select(obj, cachepolicy.secondary_key(obj.selector, req), now)
        miss = b"afpa; fwd=vary-miss"
    if obj is None:
        use = cachepolicy.Usable(False, False, b"only-if-cached" in cc)
    else:
        meta = obj.meta
        strict = meta is not None and (meta.must_revalidate or meta.no_cache)
        use = cachepolicy.usable(cc, obj.fresh_until, now - obj.stored_at, strict, now)
    if not use.use:
        if use.only_if_cached:
            req.cache_status = b"afpa; detail=only-if-cached"
            settle_body(g, conn, req)
            set_error(g, req, 504, "not in the cache (only-if-cached)")
            return "hit"
        if obj is None:
            req.cache_status = miss
            return "miss"
        req.stale = obj
        req.cache_status = b"afpa; fwd=request" if use.forced else b"afpa; fwd=stale"
        return "stale"
    req.cache_status = b"afpa; hit; ttl=%d" % int(obj.fresh_until - now)
    if conn.pending is not None:
        settle_body(g, conn, req)
    _answer(g, req, obj.head, obj.short_head, obj.etag, obj.last_modified, obj, now,
            int(now - obj.stored_at), obj.meta is not None)
    return "hit"


@state("docroot", "remote", "deferred", "collapsed", "sibling", needs=("request",),
       provides={"docroot": ("route",), "remote": ("route",), "deferred": ("route",),
                 "collapsed": ("route",), "sibling": ("route",)})
def derive_miss_response(g: Any, conn: Any, req: Any) -> str:
    """Ask routing where a miss goes; the route's kind is the outcome.  An
    ``Upgrade`` request for a backend is forwarded like any other: the backend
    machine splices only once the backend has agreed to switch (101).
    ``collapsed``: a fetch for the same key is already in flight to the
    backend; wait for it (see protocols/http/states/coalesce.py).  ``sibling``: another
    afpa of ``siblings.members`` owns the key; ask it (protocols/http/states/siblings.py)."""
    route = req.route
    if route is None:  # not chosen before the lookup (see routed_key)
        route = req.route = g.router.choose(req.host, req.path)
    kind = route.kind
    if kind == "remote" and req.key is not None:
        now = g.reactor.seconds()
        if (g.siblings is not None and siblings.eligible(req, conn)
                and g.siblings.pool_for(siblings.key_bytes(req.key), now) is not None):
            return "sibling"
        return g.flights.on_miss(req, now)
    return kind


@state("ready", needs=("request", "route"), provides={"ready": ("response",)})
def derive_uncached_response(g: Any, conn: Any, req: Any) -> str | Deferred:
    """Answer from a file under the route's root: read on a helper thread, turned
    into a cache object (stored when it fits) or streamed when it is too large."""
    settle_body(g, conn, req)
    method = req.method
    if method != b"GET" and method != b"HEAD":
        if method in KNOWN_METHODS:
            set_error(g, req, 405, extra=b"Allow: GET, HEAD\r\n")
        else:
            set_error(g, req, 501, "method not implemented")
        return "ready"
    stale = req.stale
    d = g.helpers.run(files.open_target, req.route.root, req.path, req.query,
                      g.runtime.settings.max_object_bytes, method == b"GET",
                      stale.identity if stale is not None else None, g.settings.dotfiles_allow, g.cache)
    d.addCallback(_file_ready, g, conn, req)
    return d


def _file_ready(result: files.FileResult, g: Any, conn: Any, req: Any) -> str:
    # From here the data is stored (charged to the budget) or sent (pinned).
    g.cache.unreserve(result.reserved)
    if conn.closed:
        if result.fd >= 0:
            os.close(result.fd)
        return "ready"
    now = g.reactor.seconds()
    kind = result.kind
    stale = req.stale
    # What the lookup found (uri-miss, stale, request); a table without the
    # cache lookup set nothing and never stores: bypass.
    fwd = req.cache_status if req.key is not None else b"afpa; fwd=bypass"
    if kind == "error":
        if stale is not None:
            g.cache.remove(req.key)
        req.cache_status = fwd
        set_error(g, req, result.status, result.detail)
        return "ready"
    if kind == "redirect":
        set_error(g, req, 301, extra=b"Location: " + result.location + b"\r\n")
        return "ready"
    if kind == "unchanged":
        stale.fresh_until = now + g.settings.revalidate_after
        req.cache_status = fwd + b"; detail=revalidated"
        _answer(g, req, stale.head, stale.short_head, stale.etag, stale.last_modified, stale, now,
                int(now - stale.stored_at))
        return "ready"
    etag = b'"%x-%x"' % (result.identity[3], result.identity[2])
    head, short_head = object_heads(200, result.content_type, result.size, result.mtime, etag)
    if kind == "object" and req.method == b"GET":
        obj = CacheObject(req.key, head, fragments_of(result.data), len(result.data), now,
                          now + g.settings.revalidate_after, short_head, etag, int(result.mtime),
                          result.identity)
        if req.key is None:  # a table without the cache lookup: serve, never store
            req.cache_status = fwd
        else:
            req.cache_status = fwd + (b"; stored" if g.cache.put(obj) else b"; detail=not-stored")
        _answer(g, req, head, short_head, etag, obj.last_modified, obj, now, None)
        return "ready"
    if kind == "object":  # HEAD: nothing read, nothing stored
        req.cache_status = fwd + b"; detail=head"
        _answer(g, req, head, short_head, etag, int(result.mtime), None, now, None)
        return "ready"
    body = FileBody(result.fd, result.size)
    # busy: the in-flight budget was full, so the file is streamed, not held whole.
    req.cache_status = fwd + (b"; detail=busy" if result.busy else b"; detail=too-large")
    _answer(g, req, head, short_head, etag, int(result.mtime), body, now, None)
    if req.body is not body:
        body.close()
    return "ready"


def _answer(g: Any, req: Any, head: bytes, short_head: bytes, etag: bytes | None,
            last_modified: int | None, body: Any, now: float, age: int | None,
            dated: bool = False) -> None:
    """Put the answer for a found object on ``req``: 200, 304 or 412, HEAD aware;
    206 or 416 for a Range request (after the conditionals, RFC 9110 13.2.2).
    ``dated``: its heads carry the origin's Date (see finish_head)."""
    if (req.if_none_match is not None or req.if_modified_since is not None
            or req.if_match is not None or req.if_unmodified_since is not None):
        cond = conditional.evaluate(req, etag, last_modified)
        if cond == 304:
            req.status = 304
            req.head = finish_head(g, req, short_head, now, age, dated)
            req.body = None
            return
        if cond == 412:
            set_error(g, req, 412)
            return
    if req.range is not None and req.method == b"GET" and body is not None:
        if _answer_range(g, req, head, etag, last_modified, body, now, age, dated):
            return
    req.status = 200
    req.head = finish_head(g, req, head, now, age, dated)
    req.body = body if req.method == b"GET" else None


def _answer_range(g: Any, req: Any, head: bytes, etag: bytes | None, last_modified: int | None,
                  body: Any, now: float, age: int | None, dated: bool = False) -> bool:
    """Answer a GET's Range from a whole 200 (``body``: a cache object or a file
    being streamed) with a 206 or 416; False when the whole 200 is to be sent."""
    if not head.startswith(b"200", 9):
        return False  # only a 200 is ranged (RFC 9110 14.2)
    if req.if_range is not None and not ranges.if_range_holds(req.if_range, etag, last_modified):
        return False
    length = body.size
    selected = ranges.select(req.range, length)
    if selected is None:
        return False
    if not selected:
        set_error(g, req, 416, extra=b"Content-Range: bytes */%d\r\n" % length)
        return True
    if body.__class__ is FileBody:
        if len(selected) > 1:
            return False  # several ranges of a streamed file: the whole file instead (documented)
        start, stop = selected[0]
        body.start, body.end = start, stop
        part_head = ranges.single_head(head, start, stop, length)
    elif len(selected) == 1:
        start, stop = selected[0]
        part_head = ranges.single_head(head, start, stop, length)
        body = Pieces(body, ranges.slice_fragments(body.fragments, start, stop))
    else:
        part_head, parts, closing = ranges.multipart(head, selected, length)
        bufs: list = []
        for part, start, stop in parts:
            bufs.append(part)
            bufs += ranges.slice_fragments(body.fragments, start, stop)
        bufs.append(closing)
        body = Pieces(body, bufs)
    req.status = 206
    req.head = finish_head(g, req, part_head, now, age, dated)
    req.body = body
    return True


@state("answered", "quiet", needs=(), provides={"answered": ("response",)})
def answer_timeout(g: Any, conn: Any, req: Any) -> str:
    """The connection's deadline passed while a request was awaited (the table
    maps the runtime's ``timeout`` here): part of a head had arrived -> 408
    (``answered``); an idle keep-alive connection, or one whose previous
    request's body stopped arriving, is closed without a word (``quiet``)."""
    if conn.pending is None and conn.unread():
        fail(g, conn, req, "timeout")
        return "answered"
    return "quiet"


# The runtime's reason words (ProtocolModule.fail) as HTTP answers.
_FAIL_STATUS = {"failed": 500, "timeout": 408}


def fail(g: Any, conn: Any, req: Any, reason: str) -> None:
    """The protocol's answer for a runtime reason word: ``failed`` (a state
    raised, or returned a word its table does not map) is a 500, ``timeout``
    a 408; the connection closes after it."""
    if not req.cache_status:
        req.cache_status = b"afpa; detail=error"
    set_error(g, req, _FAIL_STATUS.get(reason, 500), close=True)


FUNCTIONS = (derive_request, derive_cached_response, derive_miss_response, derive_uncached_response,
             answer_timeout)
