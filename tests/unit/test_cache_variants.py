"""Variants (Vary) in the cache store and HTTP's secondary keys; revalidation of
stale responses with the backend (304 freshens, 200 replaces), driven on
in-memory transports."""

from __future__ import annotations

import pytest

from afpa.cache.store import CacheObject, CacheStore, Variants, fragments_of
from protocols.http.policy.cachepolicy import secondary_key, vary_names
from tests.httpclient import parse_responses
from tests.unit.test_remote_machine import Rig


def var(key, secondary, size, fresh=10.0):
    return CacheObject(key, b"HTTP/1.1 200 OK\r\n", fragments_of(b"x" * size), size, 0.0, fresh,
                       secondary=secondary)


def test_store_keeps_several_variants_and_counts_each():
    c = CacheStore(1 << 20, 1 << 20)
    a, b = var("k", ("gzip",), 100), var("k", ("identity",), 200)
    assert c.put(a, "sel") and c.put(b, "sel")
    assert len(c) == 2 and c.bytes == a.cost + b.cost
    entry = c.get("k", 5)
    assert entry.__class__ is Variants and entry.selector == "sel"
    assert c.select(entry, ("gzip",), 5) is a and c.select(entry, ("identity",), 5) is b
    assert c.select(entry, ("br",), 5) is None
    assert (c.hits, c.misses) == (2, 1)
    # The same secondary key replaces only its own variant.
    a2 = var("k", ("gzip",), 50)
    c.put(a2, "sel")
    assert len(c) == 2 and c.bytes == a2.cost + b.cost and a.evicted and not b.evicted
    # Another selector (the origin changed its Vary): the old variants go.
    d = var("k", ("x",), 10)
    c.put(d, "other")
    assert len(c) == 1 and c.bytes == d.cost and b.evicted
    # A plain object replaces every variant, and a variant replaces it.
    p = var("k", None, 10)
    c.put(p, None)
    assert c.get("k", 5) is p and len(c) == 1 and c.bytes == p.cost
    c.put(d, "other")
    assert c.get("k", 5).__class__ is Variants and len(c) == 1 and c.bytes == d.cost


def test_evicting_one_variant_keeps_the_others_and_the_accounting():
    one = var("k", ("a",), 1000).cost
    c = CacheStore(budget=3 * one, max_object=1 << 20)
    objs = [var("k", (s,), 1000) for s in ("a", "b", "c")]
    for o in objs:
        c.put(o, "sel")
    for _ in range(3):  # b and c are popular; a is cold
        c.select(c.get("k", 0), ("b",), 0)
        c.select(c.get("k", 0), ("c",), 0)
    other = var("z", None, 1000)
    c.put(other)
    assert objs[0].evicted and not objs[1].evicted and not objs[2].evicted
    assert len(c) == 3 and c.bytes == objs[1].cost + objs[2].cost + other.cost <= c.budget
    c.discard(objs[1])
    assert len(c) == 2 and c.bytes == objs[2].cost + other.cost
    c.remove("k")
    assert len(c) == 1 and c.bytes == other.cost and "k" not in c
    c.discard(objs[2])  # already gone: nothing changes
    assert len(c) == 1 and c.bytes == other.cost


class Msg:
    def __init__(self, *fields):
        self.headers = [tuple(f.split(b": ", 1)) for f in fields]
        self.lnames = [n.lower() for n, _ in self.headers]


def test_vary_names_are_normalised():
    assert vary_names(Msg(b"Vary: Accept-Encoding, User-Agent", b"vary: accept-encoding")) == \
        (b"accept-encoding", b"user-agent")
    assert vary_names(Msg(b"Vary: Accept, *")) == (b"*",)
    assert vary_names(Msg(b"ETag: x")) is None


@pytest.mark.parametrize("a,b,same", [
    (b"gzip, deflate", b"deflate, gzip", True),
    (b"gzip;q=1.0, deflate", b"deflate , GZIP", True),
    (b"gzip", b"x-gzip", True),
    (b"gzip", b"gzip, br", False),
    (b"gzip;q=0", b"identity", True),
    (b"gzip", None, False),
    (b"identity", None, False),     # no field: the origin may choose; its own variant
    (b"*", b"gzip", False),
])
def test_accept_encoding_buckets(a, b, same):
    def key(v):
        return secondary_key((b"accept-encoding",), Msg(*([b"Accept-Encoding: " + v] if v else [])))
    assert (key(a) == key(b)) is same


def test_other_fields_are_joined_and_whitespace_collapsed():
    r1 = Msg(b"Accept-Language: en,  fr", b"Accept-Language: de")
    r2 = Msg(b"Accept-Language: en, fr, de")
    names = (b"accept-language",)
    assert secondary_key(names, r1) == secondary_key(names, r2) == (b"en, fr, de",)
    assert secondary_key((b"*",), r1) is None


# -- the HTTP machine ------------------------------------------------------------

def req(*fields, method="GET", target="/x"):
    return (f"{method} {target} HTTP/1.1\r\nHost: t\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n").encode()


def resp(body=b"", *fields, status="200 OK"):
    head = f"HTTP/1.1 {status}\r\n" + "".join(f + "\r\n" for f in fields)
    if not status.startswith("304"):
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


class Backend:
    """The backend side of the rig: the current pooled connection."""

    def __init__(self, rig):
        self.rig = rig
        self.proto = self.t = None

    def answer(self, data):
        """Answer the request just sent; returns the request the backend got."""
        if self.rig.pending():
            self.proto, self.t = self.rig.accept()
        sent = self.t.value()
        self.t.clear()
        self.proto.dataReceived(data)
        return sent


def ask(rig, data):
    client, ct = rig.client()
    client.dataReceived(data)
    return client, ct


def answer_of(ct):
    [r] = parse_responses(ct.value())
    return r


GZ = "Accept-Encoding: gzip, deflate"


def test_gzip_and_identity_variants_cached_and_never_mixed(docroot):
    rig = Rig(docroot)
    be = Backend(rig)
    vary = ("Cache-Control: max-age=60", "Vary: Accept-Encoding")
    _, ct = ask(rig, req(GZ))
    be.answer(resp(b"GZIPPED", *vary, "Content-Encoding: gzip"))
    assert answer_of(ct)[1]["cache-status"] == "afpa; fwd=uri-miss; fwd-status=200; stored"
    _, ct = ask(rig, req())
    assert not rig.pending() and be.t.value() != b""   # a vary-miss goes to the backend
    be.answer(resp(b"plain", *vary))
    status, h, body = answer_of(ct)
    assert body == b"plain" and h["cache-status"] == "afpa; fwd=vary-miss; fwd-status=200; stored"
    for fields, want in (((), b"plain"), ((GZ,), b"GZIPPED"), (("Accept-Encoding: deflate, gzip",), b"GZIPPED"),
                         (("Accept-Encoding: identity",), None)):
        _, ct = ask(rig, req(*fields))
        if want is None:  # a request of its own kind: not served another's variant
            assert be.t.value().startswith(b"GET /x")
            be.answer(resp(b"plain", *vary))
            assert answer_of(ct)[1]["cache-status"].startswith("afpa; fwd=vary-miss")
            continue
        status, h, body = answer_of(ct)
        assert (status, body, h["cache-status"]) == (200, want, "afpa; hit")
        assert ("content-encoding" in h) is (want == b"GZIPPED")
    assert len(rig.server.runtime.cache) == 3


def test_vary_star_is_never_reused(docroot):
    rig = Rig(docroot)
    be = Backend(rig)
    for _ in range(2):
        _, ct = ask(rig, req())
        be.answer(resp(b"v", "Cache-Control: max-age=60", "Vary: *"))
        status, h, body = answer_of(ct)
        assert body == b"v" and "stored" not in h["cache-status"]
    assert len(rig.server.runtime.cache) == 0


def _stored_then_stale(rig, be, *fields, body=b"stored body"):
    _, ct = ask(rig, req())
    be.answer(resp(body, "Cache-Control: max-age=5", *fields))
    assert "stored" in answer_of(ct)[1]["cache-status"]
    rig.later(10)


def test_stale_with_etag_is_revalidated_and_a_304_freshens_it(docroot):
    rig = Rig(docroot)
    be = Backend(rig)
    _stored_then_stale(rig, be, 'ETag: "v1"', "X-Version: 1")
    _, ct = ask(rig, req('If-None-Match: "other"'))
    sent = be.answer(resp(b"", 'ETag: "v1"', "Cache-Control: max-age=100", "X-Version: 2",
                          status="304 Not Modified"))
    assert b'If-None-Match: "v1"\r\n' in sent and b'"other"' not in sent
    status, h, body = answer_of(ct)
    assert (status, body) == (200, b"stored body")
    assert h["cache-status"] == "afpa; fwd=stale; fwd-status=304"
    assert h["x-version"] == "2" and h["cache-control"] == "max-age=100" and h["content-length"] == "11"
    # Fresh again for the new max-age, with the updated fields.
    rig.later(50)
    _, ct = ask(rig, req())
    status, h, body = answer_of(ct)
    assert (status, body, h["cache-status"], h["x-version"]) == (200, b"stored body", "afpa; hit", "2")
    assert len(rig.server.runtime.cache) == 1


def test_client_conditional_on_a_revalidated_response_gets_304(docroot):
    rig = Rig(docroot)
    be = Backend(rig)
    _stored_then_stale(rig, be, 'ETag: "v1"', "Last-Modified: Sun, 06 Nov 1994 08:49:37 GMT")
    _, ct = ask(rig, req("If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT"))
    sent = be.answer(resp(b"", 'ETag: "v1"', status="304 Not Modified"))
    assert b'If-None-Match: "v1"\r\n' in sent and b"If-Modified-Since" not in sent
    status, h, body = answer_of(ct)  # the client's If-Modified-Since, answered by afpa
    assert (status, body, h["cache-status"]) == (304, b"", "afpa; fwd=stale; fwd-status=304")
    assert h["etag"] == '"v1"' and h["last-modified"] == "Sun, 06 Nov 1994 08:49:37 GMT"


def test_last_modified_only_sends_if_modified_since_and_head_is_refreshed(docroot):
    rig = Rig(docroot)
    be = Backend(rig)
    _stored_then_stale(rig, be, "Last-Modified: Sun, 06 Nov 1994 08:49:37 GMT")
    client, ct = ask(rig, req(method="HEAD"))
    sent = be.answer(resp(b"", status="304 Not Modified"))
    assert sent.startswith(b"HEAD /x") and b"If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n" in sent
    raw = ct.value()
    assert raw.startswith(b"HTTP/1.1 200 OK") and b"fwd=stale; fwd-status=304" in raw
    assert raw.endswith(b"\r\n\r\n") and b"stored body" not in raw


def test_a_full_200_replaces_the_stale_response(docroot):
    rig = Rig(docroot)
    be = Backend(rig)
    _stored_then_stale(rig, be, 'ETag: "v1"')
    _, ct = ask(rig, req())
    be.answer(resp(b"new body", 'ETag: "v2"', "Cache-Control: max-age=60"))
    assert answer_of(ct)[1]["cache-status"] == "afpa; fwd=stale; fwd-status=200; stored"
    _, ct = ask(rig, req())
    status, h, body = answer_of(ct)
    assert (body, h["etag"], h["cache-status"]) == (b"new body", '"v2"', "afpa; hit")
    assert len(rig.server.runtime.cache) == 1


def test_stale_without_validators_is_fetched_in_full(docroot):
    rig = Rig(docroot)
    be = Backend(rig)
    _stored_then_stale(rig, be)
    _, ct = ask(rig, req())
    sent = be.answer(resp(b"again", "Cache-Control: max-age=60"))
    assert b"If-" not in sent and answer_of(ct)[2] == b"again"


@pytest.mark.parametrize("directive,status", [("must-revalidate", 504), ("proxy-revalidate", 504), ("", 502)])
def test_failed_revalidation_of_must_revalidate_is_504(docroot, directive, status):
    rig = Rig(docroot)
    be = Backend(rig)
    _stored_then_stale(rig, be, 'ETag: "v1"', *([f"Cache-Control: {directive}"] if directive else []))
    be.proto.transport.loseConnection()  # the pooled connection goes away
    be.proto.connectionLost(None)
    _, ct = ask(rig, req())
    rig.refuse()
    got, _, body = answer_of(ct)
    assert got == status and b"stored body" not in body


def test_a_304_with_set_cookie_is_answered_but_not_shared(docroot):
    rig = Rig(docroot)
    be = Backend(rig)
    _stored_then_stale(rig, be, 'ETag: "v1"')
    _, ct = ask(rig, req())
    be.answer(resp(b"", 'ETag: "v1"', "Set-Cookie: s=1", status="304 Not Modified"))
    status, h, body = answer_of(ct)
    assert (status, body, h["set-cookie"]) == (200, b"stored body", "s=1")
    assert len(rig.server.runtime.cache) == 0
    _, ct = ask(rig, req())
    be.answer(resp(b"fresh", "Cache-Control: max-age=60"))
    status, h, body = answer_of(ct)
    assert body == b"fresh" and "set-cookie" not in h


def test_revalidating_for_a_range_request_asks_about_the_whole_and_answers_the_range(docroot):
    rig = Rig(docroot)
    be = Backend(rig)
    _stored_then_stale(rig, be, 'ETag: "v1"')
    _, ct = ask(rig, req('If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT', 'If-Range: "v1"', "Range: bytes=0-1"))
    sent = be.answer(resp(b"", 'ETag: "v1"', status="304 Not Modified"))
    # afpa's validator replaces the client's; the stored whole is what is asked about
    # (cache.range_miss = "whole"), so neither Range nor If-Range goes along.
    assert b'If-None-Match: "v1"' in sent and b"If-Modified-Since" not in sent
    assert b"Range" not in sent
    # The client's own If-Modified-Since is ignored (no Last-Modified stored); its
    # If-Range matches the refreshed copy, so the range is cut from it.
    assert answer_of(ct)[0] == 206


def test_replacing_variants_many_times_keeps_heap_and_accounting_bounded():
    c = CacheStore(1 << 20, 1 << 20)
    for i in range(500):
        c.put(var("k", (i % 3,), 100), "sel")
    assert len(c) == 3 and c.bytes == 3 * var("k", (0,), 100).cost
    assert len(c._heap) <= 2 * len(c) + 65  # dead entries of replaced variants were dropped
    while c._evict_one():
        pass
    assert len(c) == 0 and c.bytes == 0 and "k" not in c


def test_tag_on_one_variant_purges_that_variant_only_and_purge_visits_every_variant():
    c = CacheStore(1 << 20, 1 << 20)
    gz, plain = var("k", ("gzip",), 100), var("k", ("identity",), 100)
    gz.set_tags((b"t1",))
    plain.set_tags((b"t2",))
    c.put(gz, "sel")
    c.put(plain, "sel")
    assert c.purge_tag(b"t1") == 1
    assert len(c) == 1 and c.tagged(b"t2") == 1 and c.tagged(b"t1") == 0
    c.put(var("k", ("br",), 100), "sel")
    assert c.purge("k") == 2 and len(c) == 0 and c.bytes == 0 and c.tagged(b"t2") == 0


def test_cache_status_for_a_request_with_its_own_cache_control(docroot):
    """RFC 9211: a request with directives that finds the URL but not its variant
    is a vary-miss (not a uri-miss); one whose directives refuse the stored copy
    is fwd=request."""
    rig = Rig(docroot)
    be = Backend(rig)
    vary = ("Cache-Control: max-age=60", "Vary: Accept-Encoding")
    _, ct = ask(rig, req(GZ))
    be.answer(resp(b"GZIPPED", *vary, "Content-Encoding: gzip"))
    _, ct = ask(rig, req("Cache-Control: max-stale=5"))
    be.answer(resp(b"plain", *vary))
    assert answer_of(ct)[1]["cache-status"] == "afpa; fwd=vary-miss; fwd-status=200; stored"
    _, ct = ask(rig, req("Cache-Control: no-cache", "Pragma: x"))
    be.answer(resp(b"plain", *vary))
    assert answer_of(ct)[1]["cache-status"] == "afpa; fwd=request; fwd-status=200; stored"
    _, ct = ask(rig, req("Cache-Control: max-age=600", target="/nothing"))
    be.answer(resp(b"n", "Cache-Control: max-age=60"))
    assert answer_of(ct)[1]["cache-status"] == "afpa; fwd=uri-miss; fwd-status=200; stored"


def test_head_miss_is_forwarded_not_stored_and_a_stored_get_answers_head(docroot):
    rig = Rig(docroot)
    be = Backend(rig)
    client, ct = rig.client()
    client.dataReceived(req(method="HEAD"))
    sent = be.answer(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 4\r\n\r\n")
    assert sent.startswith(b"HEAD /x ")
    [(status, h, _)] = parse_responses(ct.value(), (True,))
    assert (status, h["cache-status"]) == (200, "afpa; fwd=uri-miss; fwd-status=200; detail=head")
    assert len(rig.server.runtime.cache) == 0
    _, ct = ask(rig, req())
    assert be.answer(resp(b"body", "Cache-Control: max-age=60")).startswith(b"GET /x ")
    client, ct = rig.client()
    client.dataReceived(req(method="HEAD"))
    [(status, h, _)] = parse_responses(ct.value(), (True,))
    assert (status, h["cache-status"], h["content-length"]) == (200, "afpa; hit", "4")
    assert ct.value().endswith(b"\r\n\r\n") and not rig.pending() and be.t.value() == b""
