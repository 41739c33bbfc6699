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

from typing import Any

import attrs


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
