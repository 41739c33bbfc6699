"""Kinds of values only HTTP's settings and routes take (HTTP field names,
http:// URLs, proxy networks, sibling addresses, cache policy words), next to
the runtime's general ones in :mod:`afpa.config`.  They live here, below both
``routing`` (per-route cache policy) and ``protocols/http`` (its settings), so
neither imports the other upward."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from afpa.config import TEXT, Detail, Kind, parse_hostport

_Detail = Detail
_text = TEXT.check


def _no(value: Any) -> Any:
    raise ValueError

def _url(value: Any) -> str:
    text = _text(value).strip()
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() != "http":
        raise _Detail(f"{text!r}: only http:// backends are supported")
    if not (rest if sep else text).strip("/"):
        raise ValueError
    return text


def _members(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError
    out = []
    for text in value:
        try:
            host, port = parse_hostport(text, "")
        except ValueError:
            raise _Detail(f"{text!r} is not HOST:PORT") from None
        if not host or not port:
            raise _Detail(f"{text!r} needs a host and a port other than 0")
        member = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if member in out:
            raise _Detail(f"{text!r} is listed twice")
        out.append(member)
    return tuple(out)



def proxy_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``"10.0.0.0/8"`` or ``"127.0.0.1"`` -> network; ValueError naming the entry."""
    if not isinstance(text, str):
        raise _Detail(f"{text!r} is not a string")
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError:
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise _Detail(f"{text!r} is not an IP address or CIDR") from None
        raise _Detail(f"{text!r} has host bits set (did you mean {loose}?)") from None



def _dot_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError
    for name in value:
        if not name.startswith(".") or "/" in name or name in (".", ".."):
            raise _Detail(f"{name!r} is not a path segment starting with a dot")
    return tuple(value)



def _field_name(value: Any) -> str:
    text = _text(value).strip()
    if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", text):
        raise ValueError
    return text


def _proxies(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError
    return tuple(str(proxy_network(v)) for v in value)


def _names(token_re: str, lower: bool) -> Callable[[Any], tuple[str, ...]]:
    def check(value: Any) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError
        for name in value:
            if not re.fullmatch(token_re, name):
                raise _Detail(f"{name!r} is not a valid name")
        return tuple(dict.fromkeys(n.lower() if lower else n for n in value))
    return check

_TOKEN_RE = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"


PROXY = Kind("an IP address or CIDR (e.g. 10.0.0.0/8, ::1)", lambda v: str(proxy_network(v)))
URL = Kind("an http:// URL (e.g. http://127.0.0.1:8081)", _url)
PROXIES = Kind("a list of IP addresses or CIDRs (e.g. [\"10.0.0.0/8\", \"::1\"])", _proxies)
FIELD_NAME = Kind("an HTTP field name (e.g. Afpa-Cache-Control)", _field_name)
RANGE_MISS = Kind('"whole" or "forward"', lambda v: _text(v) if v in ("whole", "forward") else _no(v))
CACHE_QUERY = Kind('"keep", "sort" or "ignore"',
                   lambda v: _text(v) if v in ("keep", "sort", "ignore") else _no(v))
SET_COOKIE = Kind('"pass" or "strip"', lambda v: _text(v) if v in ("pass", "strip") else _no(v))
FIELD_NAMES = Kind("a list of HTTP field names (e.g. [\"X-Device\"])", _names(_TOKEN_RE, True))
COOKIE_NAMES = Kind("a list of cookie names (e.g. [\"lang\"])", _names(_TOKEN_RE, False))
MEMBERS = Kind('a list of HOST:PORT sibling addresses (e.g. ["127.0.0.1:9301", "127.0.0.1:9302"])',
               _members)
DOT_NAMES = Kind("a list of path segment names starting with a dot (e.g. [\".well-known\"])", _dot_names)
