"""The HTTP module's global and request scopes."""

from __future__ import annotations

import os
from typing import Any

import attrs

from afpa.scopes import Request
from protocols.http.responses import DateCache
from routing.router import Route, Router


@attrs.define(slots=True, eq=False)
class HttpRequest(Request):
    """One HTTP request: what the parser found, and what the states decided."""

    method: bytes = b""
    target: bytes = b""
    path: bytes = b""
    query: bytes = b""
    version: int = 11
    headers: list | None = None  # [(name, value)] as received
    host: bytes = b""
    keep_alive: bool = True
    content_length: int = -1
    chunked: bool = False
    expect_continue: bool = False
    if_none_match: bytes | None = None
    if_modified_since: bytes | None = None
    if_match: bytes | None = None
    if_unmodified_since: bytes | None = None
    scan_hint: int = 0
    key: Any = None
    stale: Any = None            # the stale cached object being revalidated
    route: Route | None = None
    cache_status: bytes = b""


@attrs.define(slots=True, eq=False)
class HttpGlobal:
    """Per-server data of the HTTP module."""

    runtime: Any
    settings: Any
    cache: Any
    helpers: Any
    reactor: Any
    router: Router
    dates: DateCache

    @classmethod
    def build(cls, settings: Any, runtime: Any) -> HttpGlobal:
        """``make_global`` of the HTTP module."""
        root = os.path.realpath(settings.root)
        if not os.path.isdir(root):
            raise ValueError(f"document root {settings.root!r} is not a directory")
        return cls(runtime=runtime, settings=settings, cache=runtime.cache, helpers=runtime.helpers,
                   reactor=runtime.reactor, router=Router.single(Route("docroot", root=root)),
                   dates=DateCache())
