"""Purge, ban and surrogate keys for HTTP: what the admin API's requests mean in
terms of the HTTP module's cache keys, and the tags a backend response carries.

A cached HTTP response is stored under ``(host, target)``: the request's ``Host``
(lower-cased, with the port when the client sent one) and its normalised
origin-form target (path and query).  The admin API hands its JSON requests
here (see :class:`afpa.machine.modules.ProtocolModule` ``invalidation``); the store only
sees keys, predicates over keys and tags.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from protocols.http.policy import cachepolicy

from protocols.http.wire import paths
from protocols.http.wire.errors import HttpError
from protocols.http.wire.parser import ABSOLUTE_TARGET, HOST, MAX_HOST

MAX_REGEX = 256  # characters; a ban pattern is a short path expression, not a program
_TARGET_CHARS = re.compile(rb"/[\x21-\x22\x24-\x7e]*")
_SPACE = re.compile(rb"[ \t]+")


def tags_of(msg: Any) -> tuple[bytes, ...]:
    """The surrogate keys of a backend response: ``Surrogate-Key`` (separated by
    spaces) and ``Cache-Tag`` (separated by commas), every field line of either,
    without duplicates."""
    out: dict[bytes, None] = {}
    for lname, (_, value) in zip(msg.lnames, msg.headers):
        if lname == b"surrogate-key":
            parts = _SPACE.split(value)
        elif lname == b"cache-tag":
            parts = value.split(b",")
        else:
            continue
        for p in parts:
            p = p.strip(b" \t")
            if p:
                out[p] = None
    return tuple(out)


def _text(spec: Mapping[str, Any], name: str, required: bool = True) -> bytes | None:
    value = spec.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name!r} must be a non-empty string")
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{name!r} must be ASCII (percent-encode the rest)") from None


def _host(raw: bytes) -> bytes:
    if len(raw) > MAX_HOST or HOST.fullmatch(raw) is None:
        raise ValueError(f"not a valid host: {raw.decode()!r}")
    return raw.lower()


def _target(raw: bytes) -> bytes:
    """A path (and query) as the parser would have normalised it into a key."""
    if _TARGET_CHARS.fullmatch(raw) is None:
        raise ValueError(f"not an origin-form path (starts with '/', no spaces or '#'): {raw.decode()!r}")
    path, sep, query = raw.partition(b"?")
    if b"%" in path or b"/." in path or b"//" in path:
        try:
            path = paths.normalise(path)
        except HttpError as exc:
            raise ValueError(f"path refused: {exc.detail}") from None
    return path + sep + query


def routed_key(router: Any, host: bytes, target: bytes) -> tuple[bytes, bytes]:
    """The cache key of ``(host, target)`` under its route's ``query`` rule
    (``[route.cache] query``), for purges and invalidations, which name URLs."""
    path, _, query = target.partition(b"?")
    route = router.choose(host, path)
    return host, cachepolicy.key_target(route.cache, path, query, target)


def keys(spec: Mapping[str, Any], g: Any = None) -> list[Hashable]:
    """Cache keys to purge: ``{"url": "http://host[:port]/path?query"}`` or
    ``{"host": ..., "path": "/path?query"}``.  With the module's global ``g``,
    the URL's route's key rules apply (a query sorted or ignored there is
    sorted or ignored here); entries that differ by key headers or cookies are
    variants of that key, so all of them go."""
    out = _keys(spec)
    if g is not None and g.router.keyed:
        out = [routed_key(g.router, *key) for key in out]
    return out


def _keys(spec: Mapping[str, Any]) -> list[tuple[bytes, bytes]]:
    if "url" in spec:
        url = _text(spec, "url")
        m = ABSOLUTE_TARGET.fullmatch(url)
        if m is None or m.group(1).lower() not in (b"http", b"https") or not m.group(2):
            raise ValueError(f"not an http:// URL with a host: {url.decode()!r}")
        rest = m.group(3) or b"/"
        if rest[:1] == b"?":
            rest = b"/" + rest
        return [(_host(m.group(2)), _target(rest))]
    host, path = _text(spec, "host"), _text(spec, "path")
    return [(_host(host), _target(path))]


def predicate(spec: Mapping[str, Any]) -> Callable[[Hashable], bool]:
    """A ban: ``{"prefix": "/static/"}`` (the target starts with it) or
    ``{"regex": "..."}`` (Python ``re.search`` on the target, path and query), either
    optionally limited to ``"host"``."""
    host = _text(spec, "host", required=False)
    host = _host(host) if host is not None else None
    if ("prefix" in spec) == ("regex" in spec):
        raise ValueError("give exactly one of 'prefix' or 'regex'")
    if "prefix" in spec:
        prefix = _text(spec, "prefix")
        if not prefix.startswith(b"/"):
            raise ValueError(f"'prefix' must start with '/': {prefix.decode()!r}")

        def match(target: bytes) -> bool:
            return target.startswith(prefix)
    else:
        pattern = _text(spec, "regex")
        if len(pattern) > MAX_REGEX:
            raise ValueError(f"'regex' longer than {MAX_REGEX} characters")
        try:
            search = re.compile(pattern).search
        except re.error as exc:
            raise ValueError(f"'regex' is not a valid regular expression: {exc}") from None

        def match(target: bytes) -> bool:
            return search(target) is not None

    def test(key: Hashable) -> bool:
        if not (isinstance(key, tuple) and len(key) == 2):
            return False
        return (host is None or key[0] == host) and match(key[1])

    return test


def tag(text: Any) -> Hashable:
    """The stored form of a surrogate key named in a purge request."""
    if not isinstance(text, str) or not text.strip() or len(text) > 1024:
        raise ValueError(f"a tag must be a non-empty string of at most 1024 characters, got {text!r}")
    return text.strip().encode("utf-8")
