"""Purge and ban for DNS: what the admin API's ``/cache/purge`` and
``/cache/ban`` requests mean in terms of the DNS module's cache keys (the
lowercased wire name, QTYPE and QCLASS; a 0xFF byte before it for DO queries).

- ``POST /cache/purge {"host": "www.example.com"}``: every stored answer for
  that name (any type);
- ``POST /cache/ban {"host": "example.com"}``: the name and every name below it.

DNS answers carry no surrogate keys, so ``/cache/tag`` is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

from protocols.dns import wire


def _name(spec: Mapping[str, Any], how: str) -> bytes:
    extra = sorted(set(spec) - {"host", "soft"})
    if extra:
        raise ValueError(f"DNS {how} takes 'host' (a domain name), not {extra[0]!r}")
    host = spec.get("host")
    if not isinstance(host, str) or not host.strip():
        raise ValueError("'host' must be a domain name (e.g. \"www.example.com\")")
    try:
        return wire.encode_name(host.strip()).lower()
    except ValueError as exc:
        raise ValueError(f"'host': {exc}") from None


def _owner(key: Hashable) -> bytes | None:
    """The wire name a cache key was stored under (None: not a DNS key)."""
    if not isinstance(key, bytes):
        return None
    if key[:1] == b"\xff":
        key = key[1:]
    return key[:-4] if len(key) > 4 else None


def keys(spec: Mapping[str, Any], g: Any) -> list[bytes]:
    """The cache keys of every stored type of the named name (types ever answered)."""
    name = _name(spec, "purge")
    out = []
    for qtype in list(g.by_qtype):
        tail = qtype.to_bytes(2, "big") + b"\x00\x01"
        out += [name + tail, b"\xff" + name + tail]
    return out


def predicate(spec: Mapping[str, Any]) -> Callable[[Hashable], bool]:
    """Keys of the named domain and every name below it."""
    name = _name(spec, "ban")

    def under(key: Hashable) -> bool:
        owner = _owner(key)
        if owner is None:
            return False
        if owner == name:
            return True
        # below it: owner ends with ".<name>" on a label boundary (walk the labels)
        pos = 0
        while pos < len(owner) and owner[pos]:
            pos += owner[pos] + 1
            if owner[pos:] == name:
                return True
        return False

    return under


def tag(text: str) -> Any:
    """DNS answers have no tags."""
    raise ValueError("DNS answers carry no tags; purge by 'host' (/cache/purge or /cache/ban)")
