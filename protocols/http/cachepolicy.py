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
            out.append(None)
            continue
        joined = b", ".join(values)
        if name == b"accept-encoding":
            out.append(_accepted_codings(joined))
        else:
            out.append(b" ".join(joined.split()))
    return tuple(out)
