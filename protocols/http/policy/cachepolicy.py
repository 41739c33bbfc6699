"""HTTP caching policy (RFC 9111, RFC 5861, RFC 9213), sans-IO.

Theory of operation
-------------------
Everything the HTTP module decides about caching lives here, as plain functions
over parsed messages and numbers, with no Twisted and no clock of its own (the
caller passes ``now``): which responses may be stored, for how long they are
fresh (explicit or heuristic), their current age, whether a stored response may
answer a request that carries its own directives, which variant a request
selects, and what an unsafe request invalidates.  The states in ``states.py``
and ``remote.py`` ask; this module answers.

What a stored response needs for those decisions travels with it as
:class:`StoredMeta` (``CacheObject.meta``); the runtime's cache store never
looks inside it.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urljoin, urlsplit

import attrs

from protocols.http.wire import paths
from protocols.http.wire.errors import HttpError


@attrs.define(slots=True, eq=False)
class StoredMeta:
    """The HTTP facts kept with a stored response (``CacheObject.meta``).

    Times are POSIX seconds on the server's clock.  ``request_time`` and
    ``response_time`` are when the request that fetched it was sent and when its
    head arrived (RFC 9111 4.2.3); ``date`` is the origin's ``Date`` (or
    ``response_time`` when it sent none); ``age_value`` its ``Age``.
    ``lifetime`` is the freshness lifetime in seconds (``heuristic`` when it was
    not explicit).  ``vary`` lists the lower-case request field names the
    response varies on (``None``: no Vary; ``("*",)`` never reused) and
    ``secondary`` the selecting values of the request that stored it.
    """

    date: float = 0.0
    request_time: float = 0.0
    response_time: float = 0.0
    age_value: float = 0.0
    lifetime: float = 0.0
    heuristic: bool = False
    must_revalidate: bool = False       # must-revalidate / proxy-revalidate / s-maxage
    no_cache: bool = False              # stored, but revalidated before every use
    immutable: bool = False
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    vary: tuple[bytes, ...] | None = None
    secondary: tuple[Any, ...] = ()


# -- HTTP-date (RFC 9110 5.6.7) -------------------------------------------------

_MONTHS = {m: i for i, m in enumerate((b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug",
                                        b"Sep", b"Oct", b"Nov", b"Dec"), 1)}
_DAY = rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAY = rb"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTH = rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = rb"([0-9]{2}):([0-9]{2}):([0-9]{2})"
_IMF_FIXDATE = re.compile(_DAY + rb", ([0-9]{2}) " + _MONTH + rb" ([0-9]{4}) " + _TIME + rb" GMT")
_RFC850 = re.compile(_LONG_DAY + rb", ([0-9]{2})-" + _MONTH + rb"-([0-9]{2}) " + _TIME + rb" GMT")
_ASCTIME = re.compile(_DAY + rb" " + _MONTH + rb" ([0-9 ][0-9]) " + _TIME + rb" ([0-9]{4})")


def parse_http_date(value: bytes | None, now: float | None = None) -> float | None:
    """POSIX seconds of an HTTP-date, or None when ``value`` is not one.

    Only the three forms of RFC 9110 5.6.7 are accepted, exactly: IMF-fixdate
    (``Sun, 06 Nov 1994 08:49:37 GMT``), the obsolete RFC 850 form
    (``Sunday, 06-Nov-94 08:49:37 GMT``) and asctime (``Sun Nov  6 08:49:37 1994``).
    The day name is checked for its syntax only.  A two-digit RFC 850 year that
    would lie more than 50 years after ``now`` (when given) is taken as the most
    recent past year with those digits, as the RFC says.
    """
    if value is None:
        return None
    value = value.strip(b" \t")
    m = _IMF_FIXDATE.fullmatch(value)
    if m is not None:
        day, month, year, hh, mm, ss = m.groups()
        year_n = int(year)
    else:
        m = _RFC850.fullmatch(value)
        if m is not None:
            day, month, year, hh, mm, ss = m.groups()
            year_n = 1900 + int(year)
            if now is not None:
                this_year = time.gmtime(now).tm_year
                year_n = this_year - this_year % 100 + int(year)
                if year_n > this_year + 50:
                    year_n -= 100
        else:
            m = _ASCTIME.fullmatch(value)
            if m is None:
                return None
            month, day, hh, mm, ss, year = m.groups()
            year_n = int(year)
    d, h, mi, sec = int(day), int(hh), int(mm), int(ss)
    if h > 23 or mi > 59 or sec > 60:  # 60: a leap second, as the grammar allows
        return None
    stamp = calendar.timegm((year_n, _MONTHS[month], d, h, mi, sec, 0, 0, 0))
    if d < 1 or time.gmtime(stamp - (sec == 60)).tm_mday != d:
        return None  # e.g. 31 Feb is not a date
    return float(stamp)


# -- directives (RFC 9111 5.2) -----------------------------------------------------

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_DIRECTIVE = re.compile(rb"[ \t]*([" + _TCHAR + rb"]+)(?:=(?:([" + _TCHAR + rb"]+)|\"((?:[^\"\\]|\\.)*)\"))?[ \t]*")
CONFLICT = b"\x00conflict"  # the value of a directive repeated with different arguments


def parse_directives(values: Sequence[bytes]) -> dict[bytes, bytes | None]:
    """Cache-Control directives (RFC 9111 5.2) from one or more field values.

    Names are case-insensitive (returned lower-case); an argument is a token or a
    quoted-string (unquoted, ``\\`` escapes undone); a directive without one maps
    to None.  A list member that is not ``token [ "=" ( token / quoted-string ) ]``
    is skipped.  Duplicates: the first occurrence wins, except that the same
    directive given again with a *different* argument maps to :data:`CONFLICT`,
    which every numeric reader treats as invalid, so a response with two
    different ``max-age`` is stale (RFC 9111 4.2.1 allows either; stale is the
    choice that can never serve something for longer than the origin meant).
    """
    if len(values) == 1:  # the common case: remembered (an origin says the same thing every time)
        value = values[0]
        known = _ONE_VALUE.get(value)
        if known is None:
            known = _parse_directives(values)
            if len(_ONE_VALUE) < 512 and len(value) <= 256:
                _ONE_VALUE[value] = known
        return dict(known)  # the caller's own copy
    return _parse_directives(values)


_ONE_VALUE: dict[bytes, dict[bytes, bytes | None]] = {}


def _parse_directives(values: Sequence[bytes]) -> dict[bytes, bytes | None]:
    out: dict[bytes, bytes | None] = {}
    for value in values:
        for member in _split_list(value):
            m = _DIRECTIVE.fullmatch(member)
            if m is None:
                continue
            name = m.group(1).lower()
            arg = m.group(2)
            if arg is None and m.group(3) is not None:
                arg = re.sub(rb"\\(.)", rb"\1", m.group(3))
            if name not in out:
                out[name] = arg
            elif out[name] != arg:
                out[name] = CONFLICT
    return out


def _split_list(value: bytes) -> list[bytes]:
    """Split a list field on commas outside quoted strings."""
    if b'"' not in value:
        return [p for p in value.split(b",") if p.strip(b" \t")]
    out, cur, quoted, escaped = [], bytearray(), False, False
    for c in value:
        if escaped:
            escaped = False
        elif quoted and c == 0x5C:
            escaped = True
        elif c == 0x22:
            quoted = not quoted
        elif c == 0x2C and not quoted:
            if bytes(cur).strip(b" \t"):
                out.append(bytes(cur))
            cur = bytearray()
            continue
        cur.append(c)
    if bytes(cur).strip(b" \t"):
        out.append(bytes(cur))
    return out


def delta_seconds(value: bytes | None) -> int | None:
    """A delta-seconds argument (RFC 9111 1.2.2), or None when absent or invalid.
    Values too large to hold are 2147483648, as the RFC says."""
    if value is None or not value.isdigit():
        return None
    return min(int(value), 2147483648)


# Targeted fields are Structured Field Dictionaries (RFC 8941 3.2): the keys are
# the Cache-Control directive names, a bare key is true, ``key=?0`` false.
_SF_KEY = rb"[a-z*][a-z0-9_\-.*]*"
_SF_BARE = rb"(?:-?[0-9]{1,15}(?:\.[0-9]{1,3})?|\"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\"\\])*\"|[A-Za-z*][" + _TCHAR + rb":/]*|\?[01])"
_SF_PARAMS = rb"(?:;[ ]*" + _SF_KEY + rb"(?:=" + _SF_BARE + rb")?)*"
_SF_MEMBER = re.compile(rb"(" + _SF_KEY + rb")(?:=(" + _SF_BARE + rb"))?" + _SF_PARAMS)


def parse_targeted(values: list[bytes]) -> dict[bytes, bytes | None] | None:
    """The directives of a targeted cache-control field (RFC 9213), or None when
    the field is empty or not a valid Structured Field Dictionary (then it is
    ignored, as RFC 9213 2.1 says).  Strings are unquoted; ``?0`` drops the key;
    a repeated key keeps its last value (RFC 8941 dictionaries)."""
    out: dict[bytes, bytes | None] = {}
    text = b",".join(values).strip(b" \t")
    if not text:
        return None
    for member in _split_list(text):
        member = member.strip(b" \t")
        m = _SF_MEMBER.fullmatch(member)
        if m is None:
            return None
        key, item = m.group(1), m.group(2)
        if item == b"?0":
            out.pop(key, None)
            continue
        if item is not None and item.startswith(b'"'):
            item = re.sub(rb"\\(.)", rb"\1", item[1:-1])
        elif item == b"?1":
            item = None
        elif item is not None and item.startswith(b"-"):
            item = b"-"  # negative: invalid as delta-seconds
        out[key] = item
    return out or None


def field_names(arg: bytes | None) -> frozenset[bytes]:
    """The lower-case field names of a ``no-cache="a, b"`` / ``private="a"`` argument."""
    if not arg or arg is CONFLICT:
        return frozenset()
    return frozenset(n.strip(b" \t").lower() for n in arg.split(b",") if n.strip(b" \t"))


# -- storing a response (RFC 9111 3, 4.2) ----------------------------------------

# RFC 9110 15.1: reusable with heuristic freshness unless the response says otherwise.
HEURISTIC_STATUS = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
# Statuses whose caching rules afpa implements (RFC 9111 5.2.2.3 must-understand):
# every final status it can store whole; 206 and 304 are not complete responses.
UNDERSTOOD_STATUS = frozenset({200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501})
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})


@attrs.define(slots=True, eq=False)
class Decision:
    """What :func:`decide` made of a response.

    ``store``: whether a shared cache may store it (``reason`` says why not).
    ``lifetime``/``heuristic``: its freshness lifetime.  ``strip``: lower-case
    field names to leave out of the stored head (``no-cache="f"``,
    ``private="f"``) and ``hide``: fields never shown to clients (targeted
    cache-control fields).  ``vary``: the selecting field names (None: no Vary;
    ``(b"*",)``: never reusable).  A response refused for its method, status
    or ``no-store`` carries only ``store``, ``reason`` and ``hide``; ``date``
    and ``age_value`` are read only for a response that may be stored.
    """

    store: bool = False
    reason: str = ""
    lifetime: float = 0.0
    heuristic: bool = False
    must_revalidate: bool = False
    no_cache: bool = False
    immutable: bool = False
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    date: float | None = None
    age_value: float = 0.0
    strip: frozenset[bytes] = frozenset()
    hide: frozenset[bytes] = frozenset()
    vary: tuple[bytes, ...] | None = None


def _fields(lnames: list[bytes], headers: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for lname, (_, value) in zip(lnames, headers):
        out.setdefault(lname, []).append(value)
    return out


def _values(lnames: list[bytes], headers: list[tuple[bytes, bytes]], lname: bytes) -> list[bytes]:
    """The values of the fields named ``lname`` (lower-case), in order."""
    n = lnames.count(lname)  # scans in C
    if n == 0:
        return []
    if n == 1:
        return [headers[lnames.index(lname)][1]]
    return [value for name, (_, value) in zip(lnames, headers) if name == lname]


def age_value(values: list[bytes] | None) -> float:
    """The ``Age`` field's value (RFC 9111 5.1): the first member of the first
    line; anything but a non-negative integer is ignored (0)."""
    if not values:
        return 0.0
    first = values[0].split(b",", 1)[0].strip(b" \t")
    n = delta_seconds(first)
    return float(n) if n is not None else 0.0


def decide(method: bytes, req_lnames: list[bytes], req_headers: list[tuple[bytes, bytes]],
           status: int, lnames: list[bytes], headers: list[tuple[bytes, bytes]], *,
           now: float, heuristic_fraction: float = 0.1, heuristic_max: float = 86400.0,
           targeted: tuple[bytes, ...] = (b"afpa-cache-control", b"cdn-cache-control"),
           policy: Any = None) -> Decision:
    """Whether a shared cache may store this response, and for how long it is fresh.

    ``targeted`` lists the lower-case targeted cache-control fields afpa obeys,
    most specific first (RFC 9213): the first present and valid one replaces
    ``Cache-Control`` and ``Expires``.  ``now`` stands in for a missing or
    invalid ``Date``.

    Stored when (RFC 9111 3): the method is GET; the status is final and
    understood (not 206 or 304); no ``no-store`` in the response (unless
    ``must-understand`` and an understood status) or the request; not
    ``private``; no ``Set-Cookie`` (a shared response must not carry another
    user's cookie); not ``Vary: *``; a request with ``Authorization`` only when
    ``public``, ``s-maxage`` or ``must-revalidate`` allows it; and the response
    has explicit freshness, or is heuristically cacheable (status or
    ``public``) with a ``Last-Modified``, or ``no-cache`` (stored, always
    revalidated).

    ``policy`` is the route's operator policy (``routing.policy.CachePolicy``):
    ``ignore_cache_control`` ignores the response's Cache-Control, targeted
    fields and Expires (``no-store`` and ``private`` too); ``default_ttl`` is
    the lifetime of a response with a status in :data:`HEURISTIC_STATUS` and
    no explicit or heuristic freshness (with ``ignore_cache_control`` it wins
    over the heuristic too); ``set_cookie = "strip"`` stores a Set-Cookie
    response without the field; ``min_ttl``/``max_ttl`` clamp the lifetime.
    """
    d = Decision()

    def refuse(reason: str) -> Decision:
        d.store = False
        d.reason = reason
        return d

    # The refusals that need no field dict come first (a no-store pass-through
    # answer stops here): only the directive fields are read.
    hide = [t for t in targeted if t in lnames]
    if hide:
        d.hide = frozenset(hide)
    if method != b"GET":
        return refuse("method")
    if status < 200 or status in (206, 304):
        return refuse("status")
    cc = None
    for name in hide:
        cc = parse_targeted(_values(lnames, headers, name))
        if cc is not None:
            break
    explicit_source = cc is not None
    ignore = policy is not None and policy.ignore_cache_control
    if ignore:
        cc, explicit_source = {}, True  # operator's word: no directive, no Expires
    elif cc is None:
        cc = parse_directives(_values(lnames, headers, b"cache-control"))
    if b"must-understand" in cc:
        if status not in UNDERSTOOD_STATUS:
            return refuse("must-understand")
    elif b"no-store" in cc:
        return refuse("no-store")
    fields = _fields(lnames, headers)

    # What a response that may be stored says about its reuse.
    vary = fields.get(b"vary")
    if vary is not None:
        names = tuple(sorted({n.strip(b" \t").lower() for v in vary for n in v.split(b",")
                              if n.strip(b" \t")}))
        d.vary = (b"*",) if b"*" in names else names
    d.must_revalidate = (b"must-revalidate" in cc or b"proxy-revalidate" in cc or b"s-maxage" in cc)
    d.immutable = b"immutable" in cc
    for attr, directive in (("stale_while_revalidate", b"stale-while-revalidate"),
                            ("stale_if_error", b"stale-if-error")):
        n = delta_seconds(cc.get(directive))
        if n is not None:
            setattr(d, attr, float(n))

    if b"cache-control" in req_lnames and b"no-store" in parse_directives(
            [v for n, (_, v) in zip(req_lnames, req_headers) if n == b"cache-control"]):
        return refuse("request-no-store")
    private = field_names(cc.get(b"private"))
    if b"private" in cc and not private:
        return refuse("private")  # unqualified: for one user only
    strip_cookie = b"set-cookie" in fields
    if strip_cookie and (policy is None or policy.set_cookie != "strip"):
        return refuse("set-cookie")
    if d.vary == (b"*",):
        return refuse("vary-star")
    if b"authorization" in req_lnames and not (
            b"public" in cc or b"s-maxage" in cc or b"must-revalidate" in cc):
        return refuse("authorization")
    d.strip = private | field_names(cc.get(b"no-cache"))
    if b"no-cache" in cc and not d.strip:
        d.no_cache = True
    if strip_cookie:
        d.strip |= {b"set-cookie"}  # set_cookie = "strip": shared without it

    # Date and Age only matter to a response that may be stored: parsed after
    # the refusals (a no-store pass-through answer skips the date parsing).
    d.date = parse_http_date(fields[b"date"][0], now) if len(fields.get(b"date", ())) == 1 else None
    d.age_value = age_value(fields.get(b"age"))

    # Freshness lifetime (RFC 9111 4.2.1): s-maxage, max-age, Expires - Date.
    date = d.date if d.date is not None else now
    lifetime: float | None = None
    for directive in (b"s-maxage", b"max-age"):
        if directive in cc:
            n = delta_seconds(cc[directive])
            lifetime = float(n) if n is not None else 0.0  # invalid: stale (4.2.1)
            break
    if lifetime is None and not explicit_source and b"expires" in fields:
        expires = fields[b"expires"]
        when = parse_http_date(expires[0], now) if len(set(expires)) == 1 else None
        lifetime = max(0.0, when - date) if when is not None else 0.0  # invalid: already expired
    if lifetime is None and ignore and policy.default_ttl is not None and status in HEURISTIC_STATUS:
        lifetime = policy.default_ttl  # the operator's TTL rather than a guess
    if lifetime is None:
        last_modified = fields.get(b"last-modified")
        lm = parse_http_date(last_modified[0], now) if last_modified else None
        if (lm is not None and heuristic_fraction > 0
                and (status in HEURISTIC_STATUS or b"public" in cc)):
            lifetime = min(max(0.0, date - lm) * heuristic_fraction, heuristic_max)
            d.heuristic = True
        elif d.no_cache:
            lifetime = 0.0
        elif policy is not None and policy.default_ttl is not None and status in HEURISTIC_STATUS:
            lifetime = policy.default_ttl
        else:
            return refuse("no-freshness")
    if policy is not None:
        lifetime = policy.clamp(lifetime)
    d.lifetime = lifetime
    d.store = True
    return d


# -- age (RFC 9111 4.2.3) -------------------------------------------------------------

def corrected_initial_age(date: float | None, age: float, request_time: float, response_time: float) -> float:
    """The age of a response when it arrived (RFC 9111 4.2.3): the larger of its
    apparent age (arrival minus ``Date``) and its ``Age`` plus the response delay."""
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    corrected_age_value = age + (response_time - request_time)
    return max(apparent_age, corrected_age_value)


def born(meta: StoredMeta) -> float:
    """When the origin made the stored response, by RFC 9111 4.2.3's reckoning:
    its arrival minus its corrected initial age.  ``CacheObject.stored_at`` holds
    this, so a hit's Age is ``now - stored_at`` with no further arithmetic."""
    return meta.response_time - corrected_initial_age(meta.date, meta.age_value, meta.request_time,
                                                      meta.response_time)


def current_age(meta: StoredMeta, now: float) -> float:
    """A stored response's age at ``now``: its corrected initial age plus the
    time it has been resident since it arrived (RFC 9111 4.2.3)."""
    return now - born(meta)


def stored_meta(d: Decision, request_time: float, response_time: float) -> StoredMeta:
    """The :class:`StoredMeta` of a response :func:`decide` allowed to store.
    ``date`` is the origin's, or ``response_time`` when it sent none (RFC 9110
    6.6.1: a cache records the receipt time as its Date)."""
    return StoredMeta(date=d.date if d.date is not None else response_time, request_time=request_time,
                      response_time=response_time, age_value=d.age_value, lifetime=d.lifetime,
                      heuristic=d.heuristic, must_revalidate=d.must_revalidate, no_cache=d.no_cache,
                      immutable=d.immutable, stale_while_revalidate=d.stale_while_revalidate,
                      stale_if_error=d.stale_if_error, vary=d.vary)


def fresh_until(meta: StoredMeta) -> float:
    """When a stored response stops being fresh: ``response_time - corrected
    initial age + lifetime``; ``-inf`` for ``no-cache`` (stale on every use)."""
    if meta.no_cache:
        return float("-inf")
    return born(meta) + meta.lifetime


# -- requests (RFC 9111 5.2.1, 5.4) ------------------------------------------------------

def request_directives(value: bytes) -> dict[bytes, bytes | None]:
    """The request's directives from the parser's ``req.cache_control``."""
    return parse_directives((value,))


@attrs.define(slots=True, eq=False)
class Usable:
    """What :func:`usable` decided: ``use`` the stored response or not, and
    whether the request's own directives were what refused it (``forced``)."""

    use: bool
    forced: bool = False
    only_if_cached: bool = False


def usable(cc: dict[bytes, bytes | None], fresh_until_: float, age: float,
           must_revalidate: bool, now: float) -> Usable:
    """May a stored response (fresh until ``fresh_until_``, ``age`` seconds old)
    answer a request with directives ``cc`` (RFC 9111 5.2.1)?

    ``no-cache`` never (it must be revalidated; forwarded until revalidation is
    built); ``max-age=N`` only when ``age <= N``; ``min-fresh=N`` only when still
    fresh ``N`` seconds from now; ``max-stale[=N]`` lets a stale response be
    used (up to ``N`` seconds past its lifetime), unless it says
    ``must-revalidate`` / ``no-cache``.  Invalid arguments are ignored, except
    that an invalid ``max-stale`` value means no stale response is acceptable.
    """
    only = b"only-if-cached" in cc
    if b"no-cache" in cc:
        return Usable(False, True, only)
    fresh = fresh_until_ >= now
    max_age = delta_seconds(cc.get(b"max-age"))
    if max_age is not None and age > max_age:
        return Usable(False, True, only)
    min_fresh = delta_seconds(cc.get(b"min-fresh"))
    if min_fresh is not None and fresh_until_ - now < min_fresh:
        return Usable(False, True, only)
    if fresh:
        return Usable(True, False, only)
    if b"max-stale" in cc and not must_revalidate and fresh_until_ != float("-inf"):
        arg = cc[b"max-stale"]
        if arg is None:
            return Usable(True, False, only)
        limit = delta_seconds(arg)
        if limit is not None and now - fresh_until_ <= limit:
            return Usable(True, False, only)
    return Usable(False, False, only)


# -- invalidation (RFC 9111 4.4) -------------------------------------------------------

def invalidated(method: bytes, status: int, host: bytes, target: bytes, scheme: bytes,
                location: bytes | None = None, content_location: bytes | None = None) -> list[tuple[bytes, bytes]]:
    """Cache keys ``(host, target)`` a response invalidates: for an unsafe method
    (anything but GET, HEAD, OPTIONS, TRACE) with a non-error status (2xx, 3xx),
    the target URI and the ``Location`` / ``Content-Location`` URIs when they
    have the same origin (scheme and host)."""
    if method in SAFE_METHODS or not (200 <= status < 400):
        return []
    out = [(host, target)]
    for ref in (location, content_location):
        if not ref:
            continue
        key = _same_origin_key(ref.strip(b" \t"), host, target, scheme)
        if key is not None and key not in out:
            out.append(key)
    return out


def _same_origin_key(ref: bytes, host: bytes, base: bytes, scheme: bytes) -> tuple[bytes, bytes] | None:
    try:
        text = ref.decode("ascii")
        absolute = urljoin(scheme.decode() + "://" + host.decode("ascii") + base.decode("ascii"), text)
        parts = urlsplit(absolute)
    except (UnicodeDecodeError, ValueError):
        return None
    if parts.scheme.lower() != scheme.decode() or parts.netloc.lower().encode() != host.lower():
        return None
    path = parts.path.encode() or b"/"
    try:
        if b"%" in path or b"/." in path or b"//" in path:
            path = paths.normalise(path)
    except HttpError:  # a path the parser would refuse is never a key
        return None
    return host, path + (b"?" + parts.query.encode() if parts.query else b"")


# -- variants (RFC 9111 4.1) ----------------------------------------------------

# Content codings whose acceptance splits Accept-Encoding variants; any other
# coding a request names is kept in its key literally (see secondary_key).
_ALIASES = {b"x-gzip": b"gzip", b"x-compress": b"compress"}


def vary_names(resp: Any) -> tuple[bytes, ...] | None:
    """The request field names a response varies on: lower-case, sorted, without
    duplicates (so ``Vary: b, a`` and ``Vary: a, b, a`` select alike); None when
    it has no Vary, ``(b"*",)`` when it can never be reused."""
    names: set[bytes] = set()
    seen = False
    for lname, (_, value) in zip(resp.lnames, resp.headers):
        if lname == b"vary":
            seen = True
            names.update(t.strip(b" \t").lower() for t in value.split(b",") if t.strip(b" \t"))
    if not seen or not names:
        return None
    if b"*" in names:
        return (b"*",)
    return tuple(sorted(names))


def _accepted_codings(value: bytes) -> tuple[bytes, ...]:
    """The content codings an Accept-Encoding value accepts (q > 0), as a sorted
    tuple: ``gzip, deflate`` and ``deflate;q=0.5, gzip`` give the same one.
    ``identity`` is in it unless refused (``identity;q=0``, or ``*;q=0`` without
    naming it); ``*`` is in it when other codings are accepted."""
    q: dict[bytes, bool] = {}
    for item in value.split(b","):
        name, _, params = item.partition(b";")
        name = name.strip(b" \t").lower()
        if not name:
            continue
        ok = True
        for param in params.split(b";"):
            k, _, v = param.partition(b"=")
            if k.strip(b" \t").lower() == b"q":
                try:
                    ok = float(v.strip(b" \t")) > 0
                except ValueError:
                    ok = False
        q[_ALIASES.get(name, name)] = ok
    star = q.pop(b"*", None)
    accepted = {name for name, ok in q.items() if ok}
    if b"identity" not in q and star is not False:
        accepted.add(b"identity")
    if star:
        accepted.add(b"*")
    return tuple(sorted(accepted))


def secondary_key(vary: tuple[bytes, ...], req: Any) -> tuple[Any, ...] | None:
    """The request's selecting values for the Vary names ``vary`` (RFC 9111 4.1),
    as a secondary cache key; None for ``Vary: *`` (never matches).

    Each value is the request's field lines for that name joined with ``, ``
    and whitespace collapsed (None when the request lacks the field).
    ``Accept-Encoding`` is reduced to the set of codings it accepts (see
    :func:`_accepted_codings`), since that is all an origin choosing a coding
    can act on: ``gzip, deflate`` and ``deflate, gzip`` share a variant, while
    a request without the field (the origin sends identity) keeps its own."""
    if vary == (b"*",):
        return None
    out: list[Any] = []
    for name in vary:
        values = [v for n, (_, v) in zip(req.lnames, req.headers) if n == name]
        if not values:
            # "cookie=<name>" (never a field name): a route's key cookie.
            out.append(_cookie(req, name[7:]) if name.startswith(b"cookie=") else None)
            continue
        joined = b", ".join(values)
        if name == b"accept-encoding":
            out.append(_accepted_codings(joined))
        else:
            out.append(b" ".join(joined.split()))
    return tuple(out)


def _cookie(req: Any, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in the request's ``Cookie`` field lines
    (the first one named so), or None."""
    for lname, (_, value) in zip(req.lnames, req.headers):
        if lname == b"cookie":
            for pair in value.split(b";"):
                k, sep, v = pair.partition(b"=")
                if sep and k.strip(b" \t") == name:
                    return v.strip(b" \t")
    return None


# -- cache keys (the operator's key rules, routing.policy.CachePolicy) -----------

def key_target(policy: Any, path: bytes, query: bytes, target: bytes) -> bytes:
    """The target part of a cache key under a route's ``query`` rule: the
    target as sent (``keep``), its parameters sorted so their order does not
    matter (``sort``), or the path alone (``ignore``)."""
    rule = policy.query
    if rule == "ignore":
        return path
    if rule == "sort" and b"&" in query:
        return path + b"?" + b"&".join(sorted(p for p in query.split(b"&") if p))
    return target
