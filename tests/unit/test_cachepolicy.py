"""The sans-IO caching policy, with tables of examples from the RFC text
(RFC 9110 5.6.7, RFC 9111, RFC 5861, RFC 9213)."""

from __future__ import annotations

import pytest

from protocols.http.policy import cachepolicy as cp

SUN = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT, the RFC's own example


# -- HTTP-date (RFC 9110 5.6.7) --------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    (b"Sun, 06 Nov 1994 08:49:37 GMT", SUN),      # IMF-fixdate
    (b"Sunday, 06-Nov-94 08:49:37 GMT", SUN),     # obsolete RFC 850 format
    (b"Sun Nov  6 08:49:37 1994", SUN),           # ANSI C's asctime() format
    (b"Thu, 01 Jan 1970 00:00:00 GMT", 0.0),
    (b"Sun, 06 Nov 1994 08:49:37 GMT ", SUN),     # surrounding whitespace is not the value
    (b"sun, 06 Nov 1994 08:49:37 GMT", None),     # HTTP-date is case-sensitive
    (b"Sun, 06 nov 1994 08:49:37 GMT", None),
    (b"Sun, 06 Nov 1994 08:49:37 UTC", None),     # only "GMT"
    (b"Sun, 6 Nov 1994 08:49:37 GMT", None),      # day is 2DIGIT
    (b"Sun, 06 Nov 94 08:49:37 GMT", None),       # year is 4DIGIT
    (b"Sun, 31 Feb 1994 08:49:37 GMT", None),     # not a date
    (b"Sun, 06 Nov 1994 24:00:00 GMT", None),
    (b"Sun, 06 Nov 1994 08:49:37 +0000", None),   # RFC 5322 zones are not HTTP-dates
    (b"1994-11-06T08:49:37Z", None),
    (b"0", None),
    (b"-1", None),
    (b"", None),
])
def test_http_date(text, expected):
    assert cp.parse_http_date(text) == expected


def test_rfc850_year_interpreted_within_fifty_years():
    # RFC 9110 5.6.7: a two-digit year more than 50 years in the future is the
    # most recent past year with the same last two digits.
    now = cp.parse_http_date(b"Mon, 23 Nov 2026 00:00:00 GMT")
    assert cp.parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT", now) == SUN
    assert cp.parse_http_date(b"Thursday, 06-Nov-25 08:49:37 GMT", now) == cp.parse_http_date(
        b"Thu, 06 Nov 2025 08:49:37 GMT")


# -- Cache-Control directives (RFC 9111 5.2) ----------------------------------------------

@pytest.mark.parametrize("values,expected", [
    ([b"max-age=60"], {b"max-age": b"60"}),
    ([b"Max-Age=60, PUBLIC"], {b"max-age": b"60", b"public": None}),           # names are case-insensitive
    ([b'max-age="60"'], {b"max-age": b"60"}),                                  # quoted-string form
    ([b'no-cache="Set-Cookie, X-Foo", must-revalidate'],
     {b"no-cache": b"Set-Cookie, X-Foo", b"must-revalidate": None}),           # comma inside quotes
    ([b'private="a\\"b"'], {b"private": b'a"b'}),                              # quoted-pair undone
    ([b"no-store", b"max-age=5"], {b"no-store": None, b"max-age": b"5"}),      # several field lines
    ([b"max-age=5, max-age=5"], {b"max-age": b"5"}),                           # same value twice: first
    ([b"max-age=5, max-age=10"], {b"max-age": cp.CONFLICT}),                   # conflicting: stale
    ([b",, max-age=5 ,"], {b"max-age": b"5"}),                                 # empty list members
    ([b"max-age = 5, foo bar, public"], {b"public": None}),                    # invalid members skipped
    ([b""], {}),
])
def test_parse_directives(values, expected):
    assert cp.parse_directives(values) == expected


@pytest.mark.parametrize("value,expected", [
    (b"60", 60), (b"0", 0), (b"abc", None), (b"-1", None), (b"1.5", None), (None, None),
    (b"99999999999999999999", 2147483648),  # RFC 9111 1.2.2: overflow is 2^31
])
def test_delta_seconds(value, expected):
    assert cp.delta_seconds(value) == expected


@pytest.mark.parametrize("values,expected", [
    # RFC 9213 examples: a Structured Field Dictionary of Cache-Control directives.
    ([b"max-age=600, stale-while-revalidate=30"], {b"max-age": b"600", b"stale-while-revalidate": b"30"}),
    ([b"no-store"], {b"no-store": None}),
    ([b'no-cache="set-cookie, x"'], {b"no-cache": b"set-cookie, x"}),
    ([b"no-store=?0, max-age=5"], {b"max-age": b"5"}),     # a false boolean is absent
    ([b"max-age=-5"], {b"max-age": b"-"}),                  # negative: invalid as delta-seconds
    ([b"Max-Age=5"], None),                                 # SF keys are lower-case: invalid field
    ([b"max-age=5;"], None),
    ([b""], None),                                          # empty: not used
])
def test_parse_targeted(values, expected):
    assert cp.parse_targeted(values) == expected


# -- storing and freshness (RFC 9111 3, 4.2.1, 4.2.2; RFC 9213) --------------------------

def head(text: bytes) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    pairs = [tuple(line.split(b": ", 1)) for line in text.split(b"\r\n") if line]
    return [n.lower() for n, _ in pairs], pairs


def decide(resp: bytes, status: int = 200, req: bytes = b"", method: bytes = b"GET", **kw) -> cp.Decision:
    rl, rh = head(req)
    l, h = head(resp)
    kw.setdefault("now", SUN)
    return cp.decide(method, rl, rh, status, l, h, **kw)


DATE = b"Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"


@pytest.mark.parametrize("resp,status,req,lifetime", [
    # 4.2.1: s-maxage (shared cache) over max-age over Expires - Date.
    (b"Cache-Control: max-age=60", 200, b"", 60.0),
    (b"Cache-Control: s-maxage=30, max-age=60", 200, b"", 30.0),
    (b"Cache-Control: max-age=60, s-maxage=30", 200, b"", 30.0),
    (DATE + b"Expires: Sun, 06 Nov 1994 08:51:17 GMT", 200, b"", 100.0),
    (DATE + b"Expires: Sun, 06 Nov 1994 08:51:17 GMT\r\nCache-Control: max-age=5", 200, b"", 5.0),
    (DATE + b"Expires: Sunday, 06-Nov-94 08:51:17 GMT", 200, b"", 100.0),  # obsolete form accepted
    (DATE + b"Expires: 0", 200, b"", 0.0),                  # invalid Expires: already expired
    (DATE + b"Expires: Sun, 06 Nov 1994 08:00:00 GMT", 200, b"", 0.0),  # in the past
    (b"Cache-Control: max-age=abc", 200, b"", 0.0),         # invalid freshness: stale
    (b"Cache-Control: max-age=5, max-age=60", 200, b"", 0.0),  # conflicting duplicate: stale
    # Any final status with explicit freshness is storable, not only the heuristic ones.
    (b"Cache-Control: max-age=60", 302, b"", 60.0),
    (b"Cache-Control: max-age=60", 500, b"", 60.0),
    (b"Cache-Control: max-age=60", 204, b"", 60.0),         # bodiless too
    # 4.2.2 heuristic: 10% of Date - Last-Modified (here 1000 s), capped.
    (DATE + b"Last-Modified: Sun, 06 Nov 1994 08:32:57 GMT", 200, b"", 100.0),
    (DATE + b"Last-Modified: Sun, 06 Nov 1994 08:32:57 GMT", 404, b"", 100.0),
    (DATE + b"Last-Modified: Sun, 06 Nov 1994 08:32:57 GMT", 410, b"", 100.0),
    (DATE + b"Last-Modified: Thu, 01 Jan 1970 00:00:00 GMT", 200, b"", 86400.0),   # capped at a day
    (DATE + b"Last-Modified: Sun, 06 Nov 1994 09:00:00 GMT", 200, b"", 0.0),       # in the future
    (DATE + b"Last-Modified: Sun, 06 Nov 1994 08:32:57 GMT\r\nCache-Control: public", 302, b"", 100.0),
    # Authorization: only public / s-maxage / must-revalidate allow storing (3.5).
    (b"Cache-Control: public, max-age=60", 200, b"Authorization: Basic eDp5", 60.0),
    (b"Cache-Control: s-maxage=60", 200, b"Authorization: Basic eDp5", 60.0),
    (b"Cache-Control: must-revalidate, max-age=60", 200, b"Authorization: Basic eDp5", 60.0),
    # must-understand with an understood status overrides no-store (5.2.2.3).
    (b"Cache-Control: must-understand, no-store, max-age=60", 200, b"", 60.0),
    # no-cache: stored, revalidated before every use.
    (b"Cache-Control: no-cache, max-age=60", 200, b"", 60.0),
    (b"Cache-Control: no-cache", 200, b"", 0.0),
])
def test_storable_and_lifetime(resp, status, req, lifetime):
    d = decide(resp, status, req)
    assert d.store, d.reason
    assert d.lifetime == lifetime


@pytest.mark.parametrize("resp,status,req,method,reason", [
    (b"Cache-Control: max-age=60", 200, b"", b"POST", "method"),
    (b"Cache-Control: max-age=60", 200, b"", b"HEAD", "method"),
    (b"Cache-Control: max-age=60", 206, b"", b"GET", "status"),     # partial: not the whole response
    (b"Cache-Control: max-age=60", 304, b"", b"GET", "status"),
    (b"Cache-Control: max-age=60", 103, b"", b"GET", "status"),
    (b"Cache-Control: no-store, max-age=60", 200, b"", b"GET", "no-store"),
    (b"Cache-Control: must-understand, no-store", 299, b"", b"GET", "must-understand"),
    (b"Cache-Control: max-age=60", 200, b"Cache-Control: no-store", b"GET", "request-no-store"),
    (b"Cache-Control: private, max-age=60", 200, b"", b"GET", "private"),
    (b"Cache-Control: max-age=60\r\nSet-Cookie: a=b", 200, b"", b"GET", "set-cookie"),
    (b"Cache-Control: max-age=60\r\nVary: *", 200, b"", b"GET", "vary-star"),
    (b"Cache-Control: max-age=60\r\nVary: Accept, *", 200, b"", b"GET", "vary-star"),
    (b"Cache-Control: max-age=60", 200, b"Authorization: Basic eDp5", b"GET", "authorization"),
    (b"", 200, b"", b"GET", "no-freshness"),
    (DATE + b"Last-Modified: Sun, 06 Nov 1994 08:32:57 GMT", 302, b"", b"GET", "no-freshness"),  # not heuristic
    (DATE + b"Last-Modified: garbage", 200, b"", b"GET", "no-freshness"),
])
def test_not_storable(resp, status, req, method, reason):
    d = decide(resp, status, req, method)
    assert (d.store, d.reason) == (False, reason)


def test_heuristic_fraction_and_cap_are_settings():
    resp = DATE + b"Last-Modified: Sun, 06 Nov 1994 08:32:57 GMT"
    assert decide(resp, heuristic_fraction=0.5).lifetime == 500.0
    assert decide(resp, heuristic_max=60.0).lifetime == 60.0
    assert decide(resp, heuristic_fraction=0.0).reason == "no-freshness"  # 0 turns heuristics off
    assert decide(resp).heuristic and not decide(b"Cache-Control: max-age=1").heuristic


def test_missing_date_uses_now():
    d = decide(b"Expires: Sun, 06 Nov 1994 08:50:37 GMT", now=SUN)
    assert (d.date, d.lifetime) == (None, 60.0)


@pytest.mark.parametrize("resp,flags", [
    (b"Cache-Control: max-age=60, must-revalidate", {"must_revalidate": True}),
    (b"Cache-Control: max-age=60, proxy-revalidate", {"must_revalidate": True}),
    (b"Cache-Control: s-maxage=60", {"must_revalidate": True}),   # s-maxage implies proxy-revalidate
    (b"Cache-Control: max-age=60, immutable", {"immutable": True}),
    (b"Cache-Control: no-cache", {"no_cache": True}),
    (b"Cache-Control: max-age=600, stale-while-revalidate=30, stale-if-error=86400",  # RFC 5861 3, 4
     {"stale_while_revalidate": 30.0, "stale_if_error": 86400.0}),
    (b"Cache-Control: max-age=60\r\nVary: Accept-Encoding, accept-language", {"vary": (b"accept-encoding",
                                                                                      b"accept-language")}),
])
def test_decision_flags(resp, flags):
    d = decide(resp)
    assert d.store
    for name, value in flags.items():
        assert getattr(d, name) == value


def test_no_cache_and_private_with_fields_store_without_them():
    d = decide(b'Cache-Control: max-age=60, no-cache="Set-Cookie2, X-Token"')
    assert d.store and not d.no_cache and d.strip == {b"set-cookie2", b"x-token"}
    d = decide(b'Cache-Control: max-age=60, private="X-User"')
    assert d.store and d.strip == {b"x-user"}


@pytest.mark.parametrize("resp,lifetime,hide", [
    # RFC 9213: the first valid targeted field replaces Cache-Control and Expires.
    (b"Cache-Control: no-store\r\nCDN-Cache-Control: max-age=60", 60.0, {b"cdn-cache-control"}),
    (b"Cache-Control: max-age=5\r\nCDN-Cache-Control: max-age=60\r\nAfpa-Cache-Control: max-age=600",
     600.0, {b"cdn-cache-control", b"afpa-cache-control"}),
    (b"Cache-Control: max-age=5\r\nAfpa-Cache-Control: Max-Age=9\r\nCDN-Cache-Control: max-age=60",
     60.0, {b"cdn-cache-control", b"afpa-cache-control"}),     # invalid own field: next one used
    (DATE + b"Expires: Sun, 06 Nov 1994 08:51:17 GMT\r\nCDN-Cache-Control: public", None,
     {b"cdn-cache-control"}),                                   # Expires ignored too
    (b"Cache-Control: max-age=60\r\nCDN-Cache-Control: foo bar", 60.0, {b"cdn-cache-control"}),
])
def test_targeted_fields(resp, lifetime, hide):
    d = decide(resp)
    assert d.hide == hide
    if lifetime is None:
        assert not d.store
    else:
        assert d.store and d.lifetime == lifetime


def test_targeted_no_store_refuses_what_cache_control_allows():
    assert decide(b"Cache-Control: max-age=60\r\nCDN-Cache-Control: no-store").reason == "no-store"


def test_operator_named_targeted_field():
    d = decide(b"Cache-Control: no-store\r\nEdge-Control: max-age=7", targeted=(b"edge-control",))
    assert (d.store, d.lifetime, d.hide) == (True, 7.0, {b"edge-control"})


# -- age (RFC 9111 4.2.3, 5.1) -------------------------------------------------------------

@pytest.mark.parametrize("values,expected", [
    ([b"60"], 60.0), ([b"60, 70"], 60.0), ([b"60", b"70"], 60.0),  # the first member
    ([b"abc"], 0.0), ([b"-5"], 0.0), ([b"1.5"], 0.0), (None, 0.0),  # invalid: ignored
])
def test_age_value(values, expected):
    assert cp.age_value(values) == expected


@pytest.mark.parametrize("date,age,request_time,response_time,expected", [
    (1000.0, 0.0, 1000.0, 1000.0, 0.0),
    (1000.0, 0.0, 1009.0, 1010.0, 10.0),    # apparent age (response_time - date) wins
    (1000.0, 30.0, 1000.0, 1002.0, 32.0),   # Age plus the response delay wins
    (1100.0, 0.0, 1000.0, 1001.0, 1.0),     # a Date in the future: apparent age is 0
    (None, 5.0, 1000.0, 1000.5, 5.5),
])
def test_corrected_initial_age(date, age, request_time, response_time, expected):
    assert cp.corrected_initial_age(date, age, request_time, response_time) == expected


def test_current_age_adds_resident_time_and_fresh_until():
    meta = cp.StoredMeta(date=1000.0, request_time=1000.0, response_time=1002.0, age_value=30.0, lifetime=100.0)
    assert cp.current_age(meta, 1002.0) == 32.0
    assert cp.current_age(meta, 1012.0) == 42.0
    assert cp.fresh_until(meta) == 1002.0 - 32.0 + 100.0
    meta.no_cache = True
    assert cp.fresh_until(meta) == float("-inf")


def test_stored_meta_takes_the_arrival_time_when_date_is_missing():
    d = decide(b"Cache-Control: max-age=60")
    meta = cp.stored_meta(d, 99.0, 100.0)
    assert (meta.date, meta.lifetime, meta.request_time, meta.response_time) == (100.0, 60.0, 99.0, 100.0)


# -- request directives (RFC 9111 5.2.1, 5.4) -----------------------------------------------

NOW = 1000.0


@pytest.mark.parametrize("cc,fresh_until,age,strict,use,forced", [
    (b"", 1100.0, 10.0, False, True, False),
    (b"", 900.0, 10.0, False, False, False),                 # stale
    (b"no-cache", 1100.0, 10.0, False, False, True),         # revalidate: forwarded
    (b"max-age=20", 1100.0, 10.0, False, True, False),
    (b"max-age=5", 1100.0, 10.0, False, False, True),        # older than the client accepts
    (b"max-age=0", 1100.0, 0.0, False, True, False),         # age 0 is not older than 0
    (b"min-fresh=50", 1100.0, 10.0, False, True, False),
    (b"min-fresh=200", 1100.0, 10.0, False, False, True),    # not fresh long enough
    (b"max-stale", 900.0, 10.0, False, True, False),         # any staleness accepted
    (b"max-stale=200", 900.0, 10.0, False, True, False),
    (b"max-stale=50", 900.0, 10.0, False, False, False),     # stale for longer
    (b"max-stale", 900.0, 10.0, True, False, False),         # must-revalidate wins (5.2.2.2)
    (b"max-stale=abc", 900.0, 10.0, False, False, False),
    (b"max-age=abc", 1100.0, 10.0, False, True, False),      # invalid argument ignored
    (b"only-if-cached", 1100.0, 10.0, False, True, False),
])
def test_usable(cc, fresh_until, age, strict, use, forced):
    u = cp.usable(cp.request_directives(cc), fresh_until, age, strict, NOW)
    assert (u.use, u.forced) == (use, forced)


def test_max_stale_never_uses_a_no_cache_entry():
    assert not cp.usable(cp.request_directives(b"max-stale"), float("-inf"), 1.0, False, NOW).use


def test_only_if_cached_is_reported():
    assert cp.usable(cp.request_directives(b"only-if-cached, no-cache"), 1100.0, 1.0, False, NOW).only_if_cached


# -- invalidation (RFC 9111 4.4) --------------------------------------------------------------

@pytest.mark.parametrize("method,status,location,content_location,expected", [
    (b"PUT", 200, None, None, [(b"h", b"/a/b")]),
    (b"POST", 201, b"/a/new", None, [(b"h", b"/a/b"), (b"h", b"/a/new")]),
    (b"DELETE", 204, None, b"c?x=1", [(b"h", b"/a/b"), (b"h", b"/a/c?x=1")]),         # relative
    (b"PATCH", 303, b"http://h/z", b"http://other/z", [(b"h", b"/a/b"), (b"h", b"/z")]),  # other host: not
    (b"POST", 200, b"https://h/z", None, [(b"h", b"/a/b")]),                           # other scheme: not
    (b"PURGEX", 200, None, None, [(b"h", b"/a/b")]),                                   # unknown: unsafe
    (b"POST", 200, b"/a/%7Euser/./x", None, [(b"h", b"/a/b"), (b"h", b"/a/~user/x")]),  # as keyed
    (b"POST", 404, b"/x", None, []),                                                    # error: nothing
    (b"POST", 500, None, None, []),
    (b"GET", 200, b"/x", None, []),                                                     # safe methods
    (b"OPTIONS", 200, None, None, []),
])
def test_invalidated(method, status, location, content_location, expected):
    assert cp.invalidated(method, status, b"h", b"/a/b", b"http", location, content_location) == expected


def test_conditionals_and_if_range_use_the_one_strict_http_date_parser():
    """A date that is not an HTTP-date (here with a numeric zone, which a lenient
    e-mail parser accepts) is ignored by If-Modified-Since (RFC 9110 13.1.3) and
    never matches If-Range (13.1.5); the IMF-fixdate of the same instant works."""
    from types import SimpleNamespace

    from protocols.http.policy import conditional, ranges

    lm = 784111777  # Sun, 06 Nov 1994 08:49:37 GMT
    def req(since):
        return SimpleNamespace(if_match=None, if_unmodified_since=None, if_none_match=None,
                               if_modified_since=since, method=b"GET")
    assert conditional.evaluate(req(b"Sun, 06 Nov 1994 08:49:37 GMT"), None, lm) == 304
    assert conditional.evaluate(req(b"Sun, 06 Nov 1994 08:49:37 +0000"), None, lm) == 0
    assert ranges.if_range_holds(b"Sun, 06 Nov 1994 08:49:37 GMT", None, lm)
    assert not ranges.if_range_holds(b"Sun, 06 Nov 1994 08:49:37 +0000", None, lm)


def test_parse_directives_gives_each_caller_its_own_dict():
    """A remembered value's directives are a fresh dict every time: changing one
    answer never changes the next."""
    first = cp.parse_directives([b"max-age=60, no-cache"])
    first[b"max-age"] = b"1"
    first.pop(b"no-cache")
    assert cp.parse_directives([b"max-age=60, no-cache"]) == {b"max-age": b"60", b"no-cache": None}
