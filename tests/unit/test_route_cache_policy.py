"""Operator cache policy per route ([cache] and [route.cache]): parsing and
checks, what cachepolicy.decide makes of each knob, and the key rules, TTLs and
Set-Cookie stripping driven through the HTTP machine on in-memory transports."""

from __future__ import annotations

import pytest

from protocols.http.policy import invalidation
from protocols.http.policy.cachepolicy import decide, key_target
from routing.policy import CachePolicy
from routing.router import build_router, route_from_rule
from tests.unit.test_cache_variants import Backend, answer_of, ask, req, resp
from protocols.http.settings import HttpSettings
from tests.conftest import settings_from_file
from tests.unit.test_remote_machine import Rig

REMOTE = {"to": "remote", "backend": "http://127.0.0.1:9"}


# -- parsing and checks ------------------------------------------------------------

def test_route_cache_table_is_parsed_and_inherits_the_top_level_cache(tmp_path):
    s = HttpSettings(root=str(tmp_path), backend="http://127.0.0.1:9", cache_default_ttl=60.0, cache_max_ttl=600.0,
                     routes=({**REMOTE, "prefix": "/static/",
                              "cache": {"max_ttl": 86400, "ignore_cache_control": True, "set_cookie": "strip",
                                        "query": "ignore", "key_headers": ["X-Device", "x-device"],
                                        "key_cookies": ["lang"]}},
                             {**REMOTE, "prefix": "/api/"}))
    router = build_router(s)
    static, api = router.routes
    assert static.cache == CachePolicy(default_ttl=60.0, max_ttl=86400.0, ignore_cache_control=True,
                                       set_cookie="strip", query="ignore", key_headers=("x-device",),
                                       key_cookies=("lang",))
    assert static.cache.selector == (b"x-device", b"cookie=lang")
    assert api.cache == router.default.cache == CachePolicy(default_ttl=60.0, max_ttl=600.0)
    assert router.keyed
    assert not build_router(HttpSettings(root=str(tmp_path), routes=({**REMOTE, "cache": {"max_ttl": 5}},))).keyed


@pytest.mark.parametrize("table,message", [
    ({"max_ttl": -1}, "route 2: cache.max_ttl: expected a positive number of seconds, got -1"),
    ({"default_ttl": "1h"}, "route 2: cache.default_ttl: expected a positive number of seconds, got '1h' (a string)"),
    ({"ignore_cache_control": "yes"}, "route 2: cache.ignore_cache_control: expected true or false, got 'yes' (a string)"),
    ({"set_cookie": "keep"}, "route 2: cache.set_cookie: expected \"pass\" or \"strip\", got 'keep'"),
    ({"query": "drop"}, "route 2: cache.query: expected \"keep\", \"sort\" or \"ignore\", got 'drop'"),
    ({"key_headers": "X-Device"}, "route 2: cache.key_headers: expected a list of HTTP field names"),
    ({"key_headers": ["X Device"]}, "route 2: cache.key_headers: 'X Device' is not a valid name"),
    ({"key_cookies": ["a;b"]}, "route 2: cache.key_cookies: 'a;b' is not a valid name"),
    ({"min_ttl": 60, "max_ttl": 10}, "route 2: cache.min_ttl (60) is larger than max_ttl (10)"),
    ({"ttl": 5}, "route 2: cache.ttl: unknown key"),
    ("short", "route 2: cache: must be a table ([route.cache])"),
])
def test_bad_route_cache_settings_are_one_line_errors_naming_the_route(tmp_path, table, message):
    s = HttpSettings(root=str(tmp_path), routes=(REMOTE, {**REMOTE, "cache": table}))
    with pytest.raises(ValueError) as info:
        build_router(s)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_top_level_cache_keys_are_checked_in_the_config_file(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[cache]\ndefault_ttl = 30\nquery = "sort"\nkey_cookies = ["lang"]\nset_cookie = "strip"\n')
    s = settings_from_file(good).module_settings
    assert (s.cache_default_ttl, s.cache_query, s.cache_key_cookies, s.cache_set_cookie) == (
        30.0, "sort", ("lang",), "strip")
    bad = tmp_path / "bad.toml"
    bad.write_text("[cache]\nmax_ttl = -1\n")
    with pytest.raises(ValueError, match=r"bad.toml: cache.max_ttl: expected a positive number of seconds, got -1$"):
        settings_from_file(bad)


def test_route_from_rule_without_cache_gets_the_default_policy(tmp_path):
    assert route_from_rule(dict(REMOTE), "route 1", str(tmp_path)).cache == CachePolicy()


# -- decide with each knob ---------------------------------------------------------

NOW = 1_800_000_000.0


def _decide(status=200, *fields, policy=None):
    headers = [tuple(f.split(b": ", 1)) for f in fields]
    return decide(b"GET", [], [], status, [n.lower() for n, _ in headers], headers, now=NOW, policy=policy)


def test_default_ttl_applies_only_without_explicit_or_heuristic_freshness():
    p = CachePolicy(default_ttl=300.0)
    assert not _decide(200).store                               # no policy: nothing to go on
    d = _decide(200, policy=p)
    assert d.store and d.lifetime == 300.0 and not d.heuristic
    assert _decide(200, b"Cache-Control: max-age=10", policy=p).lifetime == 10.0
    d = _decide(200, b"Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT", policy=p)
    assert d.heuristic and d.lifetime == 86400.0                # heuristic first (capped)
    assert not _decide(500, policy=p).store                     # not a status cached by default
    assert not _decide(200, b"Cache-Control: no-store", policy=p).store


def test_min_and_max_ttl_clamp_every_lifetime():
    p = CachePolicy(min_ttl=60.0, max_ttl=3600.0)
    assert _decide(200, b"Cache-Control: max-age=5", policy=p).lifetime == 60.0
    assert _decide(200, b"Cache-Control: max-age=99999", policy=p).lifetime == 3600.0
    assert _decide(200, b"Cache-Control: max-age=600", policy=p).lifetime == 600.0
    d = _decide(200, b"Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT", policy=CachePolicy(max_ttl=100.0))
    assert d.heuristic and d.lifetime == 100.0


def test_ignore_cache_control_lets_default_ttl_decide():
    p = CachePolicy(default_ttl=120.0, ignore_cache_control=True)
    for field in (b"Cache-Control: no-store", b"Cache-Control: private", b"Cache-Control: max-age=5",
                  b"Expires: Thu, 01 Jan 1970 00:00:00 GMT", b"Afpa-Cache-Control: max-age=9"):
        d = _decide(200, field, policy=p)
        assert d.store and d.lifetime == 120.0, field
    d = _decide(200, b"Cache-Control: no-cache, must-revalidate", b"Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT",
                policy=p)
    assert d.store and d.lifetime == 120.0 and not d.no_cache and not d.must_revalidate
    # Without a default_ttl, only the heuristic is left.
    only = CachePolicy(ignore_cache_control=True)
    assert not _decide(200, b"Cache-Control: max-age=60", policy=only).store
    assert _decide(200, b"Cache-Control: max-age=60", b"Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT",
                   policy=only).heuristic
    # Obeyed when not ignored.
    assert not _decide(200, b"Cache-Control: no-store", policy=CachePolicy(default_ttl=120.0)).store


def test_set_cookie_pass_refuses_strip_stores_without_it():
    cookie = (b"Set-Cookie: sid=1", b"Cache-Control: max-age=60")
    d = _decide(200, *cookie, policy=CachePolicy())
    assert not d.store and d.reason == "set-cookie"
    d = _decide(200, *cookie, policy=CachePolicy(set_cookie="strip"))
    assert d.store and d.lifetime == 60.0 and b"set-cookie" in d.strip


@pytest.mark.parametrize("rule,target,want", [
    ("keep", b"/p?b=1&a=2", b"/p?b=1&a=2"),
    ("sort", b"/p?b=1&a=2", b"/p?a=2&b=1"),
    ("sort", b"/p?a=2&b=1", b"/p?a=2&b=1"),
    ("sort", b"/p?b=1&&a=2", b"/p?a=2&b=1"),
    ("sort", b"/p?x", b"/p?x"),
    ("ignore", b"/p?b=1", b"/p"),
    ("ignore", b"/p", b"/p"),
])
def test_key_target(rule, target, want):
    path, _, query = target.partition(b"?")
    assert key_target(CachePolicy(query=rule), path, query, target) == want


# -- through the HTTP machine ---------------------------------------------------------

FRESH = "Cache-Control: max-age=60"


def _stored(rig, be, request, body=b"v", *fields):
    _, ct = ask(rig, request)
    sent = be.answer(resp(body, FRESH, *fields))
    assert answer_of(ct)[1]["cache-status"].endswith("; stored")
    return sent


def _hit(rig, request):
    _, ct = ask(rig, request)
    status, h, body = answer_of(ct)
    return h["cache-status"], body


def test_sorted_query_shares_an_entry_and_the_backend_sees_the_query_as_sent(docroot):
    rig = Rig(docroot, cache_query="sort")
    be = Backend(rig)
    sent = _stored(rig, be, req(target="/x?b=1&a=2"), b"sorted")
    assert sent.startswith(b"GET /x?b=1&a=2 HTTP/1.1")
    assert _hit(rig, req(target="/x?a=2&b=1")) == ("afpa; hit", b"sorted")
    assert _hit(rig, req(target="/x?b=1&a=2")) == ("afpa; hit", b"sorted")
    # Purge by URL finds it, whichever order the URL gives.
    g = rig.server.g
    [key] = invalidation.keys({"url": "http://t/x?a=2&b=1"}, g)
    assert rig.server.runtime.cache.purge(key) == 1 and len(rig.server.runtime.cache) == 0


def test_ignored_query_on_one_route_only(docroot):
    rig = Rig(docroot, routes=({**REMOTE, "prefix": "/q/", "cache": {"query": "ignore"}},))
    be = Backend(rig)
    _stored(rig, be, req(target="/q/p?utm=1"), b"one")
    assert _hit(rig, req(target="/q/p?utm=2")) == ("afpa; hit", b"one")
    assert _hit(rig, req(target="/q/p")) == ("afpa; hit", b"one")
    _stored(rig, be, req(target="/x?a=1"), b"a")          # the default route keeps its query
    _, ct = ask(rig, req(target="/x?a=2"))
    assert be.answer(resp(b"a2", FRESH)).startswith(b"GET /x?a=2 ")
    assert answer_of(ct)[2] == b"a2"
    # A POST to the route invalidates its (query-less) entry.
    _, ct = ask(rig, req("Content-Length: 0", method="POST", target="/q/p?x=9"))
    assert be.answer(resp(b"ok")).startswith(b"POST /q/p?x=9 ")
    assert answer_of(ct)[2] == b"ok"
    _, ct = ask(rig, req(target="/q/p?utm=1"))
    assert be.answer(resp(b"two", FRESH)).startswith(b"GET /q/p?utm=1 ")
    assert answer_of(ct)[1]["cache-status"] == "afpa; fwd=uri-miss; fwd-status=200; stored"


def test_key_header_and_cookie_split_entries_and_purge_by_url_takes_them_all(docroot):
    rig = Rig(docroot, cache_key_headers=("X-Device",), cache_key_cookies=("lang",))
    be = Backend(rig)
    assert not rig.server.g.router.keyed                  # no route chosen before the lookup
    mobile, desktop = "X-Device: mobile", "X-Device: desktop"
    _stored(rig, be, req(mobile, "Cookie: a=1; lang=fr"), b"m-fr")
    _, ct = ask(rig, req(desktop, "Cookie: lang=fr"))
    be.answer(resp(b"d-fr", FRESH))
    assert answer_of(ct)[1]["cache-status"] == "afpa; fwd=vary-miss; fwd-status=200; stored"
    _stored(rig, be, req(mobile, "Cookie: lang=en"), b"m-en")
    assert _hit(rig, req(mobile, "Cookie: lang=fr; b=2")) == ("afpa; hit", b"m-fr")
    assert _hit(rig, req(desktop, "Cookie: lang=fr")) == ("afpa; hit", b"d-fr")
    assert _hit(rig, req(mobile, "Cookie: lang=en")) == ("afpa; hit", b"m-en")
    _, ct = ask(rig, req())                               # neither: an entry of its own
    assert be.answer(resp(b"none", FRESH)).startswith(b"GET /x ")
    _, h, body = answer_of(ct)
    assert "vary" not in h                                # the key rules are afpa's, not the client's
    cache = rig.server.runtime.cache
    assert len(cache) == 4
    [key] = invalidation.keys({"url": "http://t/x"}, rig.server.g)
    assert cache.purge(key) == 4 and len(cache) == 0


def test_set_cookie_strip_stores_the_response_without_it(docroot):
    rig = Rig(docroot, cache_set_cookie="strip")
    be = Backend(rig)
    _, ct = ask(rig, req())
    be.answer(resp(b"page", FRESH, "Set-Cookie: sid=secret"))
    _, h, _ = answer_of(ct)
    assert h["cache-status"].endswith("; stored") and h["set-cookie"] == "sid=secret"  # its own cookie
    _, ct = ask(rig, req())
    _, h, body = answer_of(ct)
    assert (h["cache-status"], body) == ("afpa; hit", b"page") and "set-cookie" not in h
    assert b"secret" not in ct.value()


def test_set_cookie_pass_is_the_default(docroot):
    rig = Rig(docroot)
    be = Backend(rig)
    for _ in range(2):
        _, ct = ask(rig, req())
        be.answer(resp(b"page", FRESH, "Set-Cookie: sid=1"))
        _, h, _ = answer_of(ct)
        assert "stored" not in h["cache-status"] and h["set-cookie"] == "sid=1"


def test_default_ttl_and_max_ttl_through_the_machine(docroot):
    rig = Rig(docroot, routes=({**REMOTE, "prefix": "/d/", "cache": {"default_ttl": 30}},
                               {**REMOTE, "prefix": "/m/", "cache": {"max_ttl": 10}}))
    be = Backend(rig)
    _, ct = ask(rig, req(target="/d/x"))
    be.answer(resp(b"no freshness"))
    assert answer_of(ct)[1]["cache-status"].endswith("; stored")
    _stored(rig, be, req(target="/m/x"), b"clamped")
    rig.later(20)
    assert _hit(rig, req(target="/d/x")) == ("afpa; hit", b"no freshness")
    _, ct = ask(rig, req(target="/m/x"))                  # 60 s said, 10 s allowed: stale
    assert be.answer(resp(b"again", FRESH)).startswith(b"GET /m/x ")
    assert answer_of(ct)[1]["cache-status"].startswith("afpa; fwd=stale")


def test_set_cookie_strip_keeps_a_revalidated_entry_stored_without_the_304s_cookie(docroot):
    rig = Rig(docroot, cache_set_cookie="strip")
    be = Backend(rig)
    _, ct = ask(rig, req())
    be.answer(resp(b"page", "Cache-Control: max-age=5", 'ETag: "v1"'))
    rig.later(10)
    _, ct = ask(rig, req())
    sent = be.answer(resp(b"", 'ETag: "v1"', "Cache-Control: max-age=100", "Set-Cookie: sid=2",
                          status="304 Not Modified"))
    assert b'If-None-Match: "v1"' in sent
    assert answer_of(ct)[1]["cache-status"] == "afpa; fwd=stale; fwd-status=304"
    _, ct = ask(rig, req())
    _, h, body = answer_of(ct)
    assert (h["cache-status"], body) == ("afpa; hit", b"page") and "set-cookie" not in h
