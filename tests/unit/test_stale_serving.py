"""Serving stale responses (RFC 5861 stale-while-revalidate / stale-if-error,
and the operator's cache.grace and cache.keep) on in-memory transports."""

from __future__ import annotations

import pytest

from tests.unit.test_cache_variants import Backend, answer_of, ask, req, resp
from tests.unit.test_remote_machine import Rig


def _stored_then_stale(rig, be, cc, *fields, late=10):
    _, ct = ask(rig, req())
    be.answer(resp(b"stored body", f"Cache-Control: {cc}", 'ETag: "v1"', *fields))
    assert "stored" in answer_of(ct)[1]["cache-status"]
    rig.later(5 + late)  # max-age=5: stale by `late` seconds


def _backend_gone(rig, be):
    """The pooled connection closes: the next request must connect again."""
    be.proto.transport.loseConnection()
    be.proto.connectionLost(None)


def _stale_served(rig):
    return dict(rig.server.g.stale_served)


def test_stale_while_revalidate_answers_at_once_and_refreshes_once(docroot):
    rig = Rig(docroot)
    be = Backend(rig)
    _stored_then_stale(rig, be, "max-age=5, stale-while-revalidate=30")
    answers = [answer_of(ask(rig, req())[1]) for _ in range(3)]  # before the backend answers
    for status, h, body in answers:
        assert (status, body) == (200, b"stored body")
        assert h["cache-status"] == "afpa; hit; ttl=-10; detail=stale-while-revalidate"
    sent = be.t.value()
    assert sent.count(b"GET /x HTTP/1.1") == 1 and b'If-None-Match: "v1"\r\n' in sent
    assert rig.pending() == 0 and len(rig.server.g.refreshing) == 1
    be.answer(resp(b"", 'ETag: "v1"', "Cache-Control: max-age=100", "X-Version: 2", status="304 Not Modified"))
    assert not rig.server.g.refreshing
    status, h, body = answer_of(ask(rig, req())[1])  # freshened in the background
    assert (status, body, h["cache-status"], h["x-version"]) == (200, b"stored body", "afpa; hit", "2")
    assert _stale_served(rig) == {"while-revalidate": 3, "if-error": 0, "grace": 0}


def test_background_200_replaces_and_a_later_stale_answer_refreshes_again(docroot):
    rig = Rig(docroot)
    be = Backend(rig)
    _stored_then_stale(rig, be, "max-age=5, stale-while-revalidate=30")
    assert answer_of(ask(rig, req('Range: bytes=0-1', 'If-None-Match: "x"'))[1])[0] == 206
    sent = be.answer(resp(b"new body", "Cache-Control: max-age=5, stale-while-revalidate=30", 'ETag: "v2"'))
    assert b"Range" not in sent and b'"x"' not in sent and sent.startswith(b"GET /x")
    status, h, body = answer_of(ask(rig, req())[1])
    assert (body, h["cache-status"], h["etag"]) == (b"new body", "afpa; hit", '"v2"')
    rig.later(10)
    assert answer_of(ask(rig, req())[1])[2] == b"new body"
    assert b'If-None-Match: "v2"' in be.t.value()  # a new refresh once the first one ended


def test_past_the_window_the_client_waits_for_the_revalidation(docroot):
    rig = Rig(docroot)
    be = Backend(rig)
    _stored_then_stale(rig, be, "max-age=5, stale-while-revalidate=3")
    _, ct = ask(rig, req())
    assert ct.value() == b""
    be.answer(resp(b"", 'ETag: "v1"', status="304 Not Modified"))
    assert answer_of(ct)[1]["cache-status"] == "afpa; fwd=stale; fwd-status=304"


def test_a_background_refresh_that_times_out_is_forgotten(docroot):
    rig = Rig(docroot, backend_first_byte_timeout=5.0)
    be = Backend(rig)
    _stored_then_stale(rig, be, "max-age=5, stale-while-revalidate=60")
    ask(rig, req())
    assert len(rig.server.g.refreshing) == 1
    rig.later(7)
    assert be.proto.transport.disconnecting  # the deadline cut the backend connection
    be.proto.connectionLost(None)  # (an in-memory transport does not report it itself)
    assert not rig.server.g.refreshing
    pool = next(iter(rig.server.g.pools.pools.values()))
    assert pool.failures == {"first_byte_timeout": 1}
    assert answer_of(ask(rig, req())[1])[2] == b"stored body"  # still within the window
    assert rig.pending() == 1  # and a new refresh is under way


@pytest.mark.parametrize("cc", ["must-revalidate", "proxy-revalidate", "no-cache"])
def test_must_revalidate_is_never_served_stale(docroot, cc):
    rig = Rig(docroot, grace=60.0)
    be = Backend(rig)
    _stored_then_stale(rig, be, f"max-age=5, {cc}, stale-while-revalidate=60, stale-if-error=60")
    _backend_gone(rig, be)
    _, ct = ask(rig, req())
    assert ct.value() == b""  # waits for the revalidation
    rig.refuse()
    status, h, body = answer_of(ct)
    assert status == (502 if cc == "no-cache" else 504) and b"stored body" not in body
    assert _stale_served(rig) == {"while-revalidate": 0, "if-error": 0, "grace": 0}


def test_stale_if_error_when_the_backend_refuses(docroot):
    rig = Rig(docroot)
    be = Backend(rig)
    _stored_then_stale(rig, be, "max-age=5, stale-if-error=60")
    _backend_gone(rig, be)
    _, ct = ask(rig, req())
    rig.refuse()
    status, h, body = answer_of(ct)
    assert (status, body) == (200, b"stored body")
    assert h["cache-status"] == "afpa; fwd=stale; ttl=-10; detail=stale-if-error"
    assert _stale_served(rig)["if-error"] == 1


@pytest.mark.parametrize("late,want", [(10, 200), (61, 503)])
def test_stale_if_error_on_a_5xx_within_its_window(docroot, late, want):
    rig = Rig(docroot)
    be = Backend(rig)
    _stored_then_stale(rig, be, "max-age=5, stale-if-error=60", late=late)
    _, ct = ask(rig, req())
    be.answer(resp(b"down", status="503 Service Unavailable"))
    status, h, body = answer_of(ct)
    assert status == want
    if want == 200:
        assert body == b"stored body"
        assert h["cache-status"] == "afpa; fwd=stale; fwd-status=503; ttl=-10; detail=stale-if-error"
        assert be.proto.transport.disconnecting  # its 503 body was not read: not reused
    else:
        assert body == b"down"


def test_no_stale_if_error_without_the_directive(docroot):
    rig = Rig(docroot)
    be = Backend(rig)
    _stored_then_stale(rig, be, "max-age=5")
    _backend_gone(rig, be)
    _, ct = ask(rig, req())
    rig.refuse()
    assert answer_of(ct)[0] == 502


def test_grace_serves_stale_without_the_directive(docroot):
    rig = Rig(docroot, grace=30.0)
    be = Backend(rig)
    _stored_then_stale(rig, be, "max-age=5")
    status, h, body = answer_of(ask(rig, req())[1])
    assert (body, h["cache-status"]) == (b"stored body", "afpa; hit; ttl=-10; detail=grace")
    assert b'If-None-Match: "v1"' in be.t.value()
    assert _stale_served(rig)["grace"] == 1


def test_keep_drops_a_response_stale_for_longer(docroot):
    rig = Rig(docroot, keep=20.0)
    be = Backend(rig)
    _stored_then_stale(rig, be, "max-age=5, stale-while-revalidate=60", late=30)
    _, ct = ask(rig, req())
    sent = be.answer(resp(b"again", "Cache-Control: max-age=5"))
    assert b"If-None-Match" not in sent
    assert answer_of(ct)[1]["cache-status"] == "afpa; fwd=uri-miss; fwd-status=200; stored"


def test_stale_served_metric(docroot):
    rig = Rig(docroot, grace=30.0)
    be = Backend(rig)
    _stored_then_stale(rig, be, "max-age=5")
    ask(rig, req())
    text = "\n".join(str(m) for m in rig.server.g.metrics())
    assert "afpa_cache_stale_served" in text
