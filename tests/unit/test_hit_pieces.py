"""The ready-made pieces of the hit path: the request-scope factory and the
mutable fields of a response head must give exactly what the plain
constructions give."""

from __future__ import annotations

import attrs
import pytest

from afpa.machine.scopes import Request, request_factory
from protocols.http.module import MODULE
from protocols.http.scopes import HttpRequest
from protocols.http.wire.responses import DateCache, finish_head


def test_http_request_factory_gives_every_default():
    made = MODULE.make_request(None)
    plain = HttpRequest()
    assert type(made) is HttpRequest
    for field in attrs.fields(HttpRequest):
        assert getattr(made, field.name) == getattr(plain, field.name), field.name
    # A fresh object each time: nothing is shared between requests.
    assert MODULE.make_request(None) is not made


def test_request_factory_refuses_defaults_it_cannot_write_as_literals():
    @attrs.define(slots=True, eq=False)
    class WithList(Request):
        items: list = attrs.Factory(list)

    @attrs.define(slots=True, eq=False)
    class WithInf(Request):
        until: float = float("inf")

    for cls in (WithList, WithInf):
        with pytest.raises(ValueError):
            request_factory(cls)


class _G:
    dates = DateCache()


def _plain(g, req, head, now, age, dated=False):
    conn = (b"Connection: close\r\n" if req.close else
            b"Connection: keep-alive\r\n" if req.version == 10 else b"")
    return b"".join((head, b"" if dated else g.dates.get(now), b"" if age is None else b"Age: %d\r\n" % age,
                     b"Cache-Status: ", req.cache_status, b"\r\n", conn, b"\r\n"))


@pytest.mark.parametrize("age", [None, 0, 1, 1023, 1024, 86400, -1])
@pytest.mark.parametrize("close,version", [(False, 11), (True, 11), (False, 10), (True, 10)])
@pytest.mark.parametrize("status", [b"afpa; hit", b"afpa; hit; ttl=-3; detail=grace", b"afpa; fwd=uri-miss"])
@pytest.mark.parametrize("dated", [False, True])
def test_finish_head_fields(age, close, version, status, dated):
    req = HttpRequest(close=close, version=version, cache_status=status)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
    now = 1_700_000_000.25
    for _ in range(2):  # the second time from the remembered pieces
        assert finish_head(_G(), req, head, now, age, dated) == _plain(_G(), req, head, now, age, dated)
