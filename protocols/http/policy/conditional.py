"""Conditional requests against a cached object's validators (RFC 9110 13.2.2).

Evaluated in the RFC's order: If-Match, else If-Unmodified-Since (412 when they
fail); then If-None-Match, else If-Modified-Since (304 for GET/HEAD when the
client's copy is current).
"""

from __future__ import annotations

from typing import Any

from protocols.http.policy.cachepolicy import parse_http_date as _parse_date  # None: ignored (RFC 9110 13.1.3)


def _tags(value: bytes) -> list[bytes]:
    return [t.strip(b" \t") for t in value.split(b",") if t.strip(b" \t")]


def _weak_match(value: bytes, etag: bytes | None) -> bool:
    if etag is None:
        return False
    tags = _tags(value)
    if b"*" in tags:
        return True
    plain = etag.removeprefix(b"W/")
    return any(t.removeprefix(b"W/") == plain for t in tags)


def _strong_match(value: bytes, etag: bytes | None) -> bool:
    tags = _tags(value)
    if b"*" in tags:
        return etag is not None
    return etag is not None and not etag.startswith(b"W/") and etag in tags


def evaluate(req: Any, etag: bytes | None, last_modified: int | None) -> int:
    """0 to send the object, 304 (not modified) or 412 (precondition failed)."""
    if req.if_match is not None:
        if not _strong_match(req.if_match, etag):
            return 412
    elif req.if_unmodified_since is not None and last_modified is not None:
        since = _parse_date(req.if_unmodified_since)
        if since is not None and last_modified > since:
            return 412
    if req.method not in (b"GET", b"HEAD"):
        return 0
    if req.if_none_match is not None:
        return 304 if _weak_match(req.if_none_match, etag) else 0
    if req.if_modified_since is not None and last_modified is not None:
        since = _parse_date(req.if_modified_since)
        if since is not None and last_modified <= since:
            return 304
    return 0
