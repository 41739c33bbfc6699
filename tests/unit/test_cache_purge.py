"""Purge, ban and tag purge in the runtime store, and the HTTP module's part:
surrogate keys read from backend responses, never shown to clients."""

from __future__ import annotations

import pytest

from afpa.cache.store import OBJECT_OVERHEAD, TAG_OVERHEAD, CacheObject, CacheStore
from protocols.http.policy import invalidation
from tests.httpclient import parse_responses
from tests.unit.test_remote_machine import Rig

NOW = 1000.0


def obj(key, size=100, tags=(), fresh_until=NOW + 60):
    o = CacheObject(key, b"HTTP/1.1 200 OK\r\n", (b"x" * size,), size, NOW, fresh_until)
    o.set_tags(tags)
    return o


def store(budget=1 << 20):
    return CacheStore(budget, budget)


def test_purge_removes_one_object_and_gives_back_its_bytes():
    s = store()
    a, b = obj(("h", "/a")), obj(("h", "/b"))
    s.put(a)
    s.put(b)
    assert s.purge(("h", "/a")) == 1
    assert ("h", "/a") not in s and ("h", "/b") in s
    assert s.bytes == b.cost
    assert s.purge(("h", "/a")) == 0  # nothing left to purge
    assert s.purged == {"purge": 1, "ban": 0, "tag": 0}


def test_ban_purges_every_key_the_predicate_accepts():
    s = store()
    for path in ("/static/a.css", "/static/b.js", "/index.html"):
        s.put(obj(("h", path)))
    assert s.purge_where(lambda k: k[1].startswith("/static/")) == 2
    assert len(s) == 1 and ("h", "/index.html") in s
    assert s.purged["ban"] == 2


def test_tag_purge_reaches_every_object_with_the_tag():
    s = store()
    s.put(obj(("h", "/1"), tags=(b"product-1", b"all")))
    s.put(obj(("h", "/2"), tags=(b"product-2", b"all")))
    s.put(obj(("h", "/3")))
    assert s.purge_tag(b"product-1") == 1
    assert ("h", "/1") not in s
    assert s.tagged(b"product-1") == 0 and s.tagged(b"all") == 1
    assert s.purge_tag(b"all") == 1
    assert len(s) == 1 and s.tagged(b"all") == 0
    assert s.purge_tag(b"nobody-has-this") == 0
    assert s._tags == {}  # the index holds nothing for objects that are gone


def test_tags_are_charged_to_the_object():
    plain, tagged = obj(("h", "/a")), obj(("h", "/a"), tags=(b"abc", b"de"))
    assert tagged.cost == plain.cost + 2 * TAG_OVERHEAD + 5


def test_tag_index_is_cleaned_when_an_object_is_evicted_or_replaced():
    o = obj(("h", "/1"), tags=(b"t",))
    s = store(budget=2 * o.cost + OBJECT_OVERHEAD // 2)
    s.put(o)
    s.put(obj(("h", "/2"), tags=(b"t",)))
    s.put(obj(("h", "/3"), tags=(b"u",)))  # over budget: evicts one of the first two
    assert s.evicted == 1 and s.tagged(b"t") == 1 and s.tagged(b"u") == 1
    s.put(obj(("h", "/3")))  # replaced by a version without the tag
    assert s.tagged(b"u") == 0 and b"u" not in s._tags
    s.remove(("h", "/3"))
    [left] = [k for k in (("h", "/1"), ("h", "/2")) if k in s]
    s.remove(left)
    assert s._tags == {} and s.bytes == 0


def test_soft_purge_keeps_the_object_but_stale():
    s = store()
    o = obj(("h", "/a"), tags=(b"t",))
    s.put(o)
    assert s.purge(("h", "/a"), soft=True, now=NOW + 10) == 1
    assert ("h", "/a") in s and s.bytes == o.cost
    assert s.get(("h", "/a"), NOW + 10) is o and s.stale == 1  # stale at once
    assert o.fresh_until < NOW + 10
    assert s.purge_tag(b"t", soft=True, now=NOW + 20) == 1
    assert o.fresh_until < NOW + 10  # already stale: not made "fresher" again
    assert s.purge_where(lambda k: True, soft=True, now=NOW) == 1
    assert len(s) == 1


def test_purging_an_object_being_sent_keeps_it_pinned_until_the_send_ends():
    s = store()
    o = obj(("h", "/a"))
    s.put(o)
    s.pin(o)
    assert s.purge(("h", "/a")) == 1
    assert s.bytes == 0 and s.pinned_bytes == o.cost
    s.release(o)
    assert s.pinned_bytes == 0


# -- HTTP: keys and predicates from admin requests ----------------------------

def test_purge_url_names_the_key_the_parser_makes():
    assert invalidation.keys({"url": "http://Example.COM:8080/a/./b?x=1"}) == [(b"example.com:8080", b"/a/b?x=1")]
    assert invalidation.keys({"url": "http://h"}) == [(b"h", b"/")]
    assert invalidation.keys({"host": "h", "path": "/p%7e"}) == [(b"h", b"/p~")]


@pytest.mark.parametrize("spec", [{"url": "ftp://h/x"}, {"url": "/x"}, {"url": "http:///x"}, {"url": 5},
                                  {"host": "h"}, {"host": "h h", "path": "/"}, {"host": "h", "path": "x"},
                                  {"url": "http://h/\u00e9"}])
def test_bad_purge_specs_are_refused(spec):
    with pytest.raises(ValueError):
        invalidation.keys(spec)


def test_ban_predicates():
    by_prefix = invalidation.predicate({"prefix": "/static/"})
    assert by_prefix((b"a", b"/static/x.css")) and by_prefix((b"b", b"/static/"))
    assert not by_prefix((b"a", b"/stat")) and not by_prefix((b"a", b"/x/static/"))
    on_host = invalidation.predicate({"prefix": "/", "host": "A"})
    assert on_host((b"a", b"/x")) and not on_host((b"b", b"/x"))
    by_re = invalidation.predicate({"regex": r"\.css(\?|$)"})
    assert by_re((b"a", b"/x.css")) and by_re((b"a", b"/x.css?v=2")) and not by_re((b"a", b"/x.cssx"))
    assert not by_prefix("not an http key")


@pytest.mark.parametrize("spec, problem", [
    ({"regex": "("}, "not a valid regular expression"),
    ({"regex": "a" * 257}, "longer than 256"),
    ({"prefix": "static"}, "must start with '/'"),
    ({}, "exactly one of"),
    ({"prefix": "/", "regex": "x"}, "exactly one of"),
])
def test_bad_bans_are_refused_with_a_reason(spec, problem):
    with pytest.raises(ValueError, match=problem):
        invalidation.predicate(spec)


# -- HTTP: surrogate keys on backend responses -----------------------------------

def _fetch(rig, path, answer):
    client, ct = rig.client()
    client.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    if answer is not None:
        backend, _ = rig.accept()
        backend.dataReceived(answer)
    return parse_responses(ct.value())[0]


def test_surrogate_keys_are_stored_as_tags_and_never_reach_the_client(docroot):
    rig = Rig(docroot)
    answer = (b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nSurrogate-Key: page  product-7\r\n"
              b"Cache-Tag: blue, product-7,green\r\nCache-Tag: red\r\nContent-Length: 2\r\n\r\nok")
    status, headers, body = _fetch(rig, b"/p", answer)
    assert (status, body) == (200, b"ok")
    assert "surrogate-key" not in headers and "cache-tag" not in headers
    stored = rig.server.runtime.cache._index[(b"t", b"/p")]
    assert stored.tags == (b"page", b"product-7", b"blue", b"green", b"red")
    assert b"Surrogate-Key" not in stored.head and b"Cache-Tag" not in stored.head
    status, headers, _ = _fetch(rig, b"/p", None)  # a hit: from the stored head
    assert headers["cache-status"] == "afpa; hit"
    assert "surrogate-key" not in headers and "cache-tag" not in headers
    assert rig.server.runtime.cache.purge_tag(b"product-7") == 1
