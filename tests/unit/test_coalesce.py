"""Request coalescing and hit-for-miss on in-memory transports (see
protocols/http/states/coalesce.py): one backend fetch per key for concurrent misses."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.python.failure import Failure

from tests.httpclient import parse_responses
from tests.unit.test_remote_machine import Rig

GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
CACHEABLE = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 5\r\n\r\nhello"
COOKIE = b"HTTP/1.1 200 OK\r\nSet-Cookie: s=1\r\nContent-Length: 5\r\n\r\nhello"


def _clients(rig, n, request=GET):
    out = []
    for _ in range(n):
        c, t = rig.client()
        c.dataReceived(request)
        out.append(t)
    return out


def _metric(rig, name):
    for family in rig.server.g.metrics():
        if family.name == name:
            return family.samples[0].value
    raise KeyError(name)


def test_waiters_are_answered_from_the_leaders_stored_response(docroot):
    rig = Rig(docroot)
    leader, *waiters = _clients(rig, 5)
    assert rig.pending() == 1  # one backend connect for five misses
    backend, bt = rig.accept()
    assert all(t.value() == b"" for t in waiters)
    backend.dataReceived(CACHEABLE[:-3])
    assert all(t.value() == b"" for t in waiters)  # answered once the object is complete
    backend.dataReceived(CACHEABLE[-3:])
    [(status, headers, body)] = parse_responses(leader.value())
    assert (status, body) == (200, b"hello") and headers["cache-status"] == "afpa; fwd=uri-miss; fwd-status=200; stored"
    for t in waiters:
        [(status, headers, body)] = parse_responses(t.value())
        assert (status, body) == (200, b"hello")
        assert headers["cache-status"] == "afpa; fwd=uri-miss; fwd-status=200; collapsed"
        assert "age" in headers
        assert t.value().count(b"\r\nDate: ") == 1  # the origin's, kept; never a second one
    assert rig.pending() == 0 and bt.value().count(b"GET /x") == 1
    assert _metric(rig, "afpa_cache_collapsed") == 4
    assert not rig.server.g.flights.inflight
    # The next request is an ordinary hit.
    [t] = _clients(rig, 1)
    assert parse_responses(t.value())[0][1]["cache-status"] == "afpa; hit"
    assert t.value().count(b"\r\nDate: ") == 1


def test_waiter_conditional_and_head_answered_from_the_object(docroot):
    rig = Rig(docroot)
    _clients(rig, 1)
    [head] = _clients(rig, 1, b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\n")
    backend, _ = rig.accept()
    backend.dataReceived(CACHEABLE.replace(b"max-age=60", b"max-age=60\r\nETag: \"v1\""))
    [(status, headers, body)] = parse_responses(head.value(), head_only=(True,))
    assert status == 200 and headers["content-length"] == "5" and head.value().endswith(b"\r\n\r\n")


def test_uncacheable_answer_releases_waiters_at_once_and_sets_hit_for_miss(docroot):
    rig = Rig(docroot, hit_for_miss=120.0)
    leader, *waiters = _clients(rig, 3)
    backend, bt = rig.accept()
    backend.dataReceived(COOKIE[:-5])  # the head alone says it will not be stored
    assert rig.pending() == 2  # both waiters went forward before the leader's body arrived
    assert not rig.server.g.flights.inflight
    backend.dataReceived(COOKIE[-5:])
    backends = [(backend, bt)]
    for _ in waiters:
        b, t = rig.accept()
        b.dataReceived(COOKIE)
        backends.append((b, t))
    for t in waiters:
        [(status, headers, body)] = parse_responses(t.value())
        assert (status, body) == (200, b"hello")
        assert headers["cache-status"] == "afpa; fwd=uri-miss; collapsed=?0; fwd-status=200"
    assert parse_responses(leader.value())[0][2] == b"hello"
    # Hit-for-miss: three new concurrent misses all go forward (on the three
    # pooled connections), none waits.
    for _, t in backends:
        t.clear()
    later = _clients(rig, 3)
    assert not rig.server.g.flights.inflight
    assert [t.value().count(b"GET /x") for _, t in backends] == [1, 1, 1]
    assert _metric(rig, "afpa_cache_hit_for_miss") == 3
    for b, _ in backends:
        b.dataReceived(COOKIE)
    for t in later:
        assert parse_responses(t.value())[0][1]["cache-status"] == "afpa; fwd=uri-miss; fwd-status=200"


def test_hit_for_miss_expires(docroot):
    rig = Rig(docroot, hit_for_miss=30.0)
    _clients(rig, 1)
    backend, _ = rig.accept()
    backend.dataReceived(COOKIE)
    assert len(rig.server.g.flights.uncacheable) == 1
    rig.later(31)  # the sweep forgets it
    assert not rig.server.g.flights.uncacheable
    leader, waiter = _clients(rig, 2)
    assert rig.pending() == 1  # coalesced again
    backend, _ = rig.accept()
    backend.dataReceived(CACHEABLE)
    assert parse_responses(waiter.value())[0][1]["cache-status"].endswith("; collapsed")


def test_backend_error_releases_waiters_without_hit_for_miss(docroot):
    rig = Rig(docroot)
    leader, *waiters = _clients(rig, 3)
    rig.refuse()
    assert parse_responses(leader.value())[0][0] == 502
    assert rig.pending() == 2  # the waiters made their own attempts (as Varnish retries them)
    for t in waiters:
        b, _t = rig.accept()
        b.dataReceived(CACHEABLE)
        [(status, headers, body)] = parse_responses(t.value())
        assert (status, body) == (200, b"hello") and "collapsed=?0" in headers["cache-status"]
    assert not rig.server.g.flights.uncacheable


def test_5xx_answer_releases_waiters_without_hit_for_miss(docroot):
    rig = Rig(docroot)
    _clients(rig, 2)
    backend, _ = rig.accept()
    backend.dataReceived(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
    assert rig.pending() == 1 and not rig.server.g.flights.uncacheable


def test_waiter_times_out_and_forwards_itself(docroot):
    rig = Rig(docroot, coalesce_timeout=5.0)
    leader, waiter = _clients(rig, 2)
    rig.accept()  # the leader's backend never answers (its first-byte timeout is 60 s)
    rig.later(3)
    assert rig.pending() == 0
    rig.later(3)
    assert rig.pending() == 1  # the waiter gave up waiting and connected itself
    b, _ = rig.accept()
    b.dataReceived(CACHEABLE)
    [(status, headers, body)] = parse_responses(waiter.value())
    assert (status, body) == (200, b"hello")
    assert headers["cache-status"] == "afpa; fwd=uri-miss; collapsed=?0; fwd-status=200; stored"
    assert leader.value() == b""


def test_waiter_whose_client_leaves_is_dropped(docroot):
    rig = Rig(docroot)
    client, _ = rig.client()
    client.dataReceived(GET)
    waiter, _ = rig.client()
    waiter.dataReceived(GET)
    flight = rig.server.g.flights.inflight[(b"t", b"/x")]
    assert len(flight.waiters) == 1
    waiter.connectionLost(Failure(ConnectionDone()))
    assert not flight.waiters
    backend, _ = rig.accept()
    backend.dataReceived(CACHEABLE)
    assert _metric(rig, "afpa_cache_collapsed") == 0


def test_leader_client_leaving_releases_waiters(docroot):
    rig = Rig(docroot)
    leader, _ = rig.client()
    leader.dataReceived(GET)
    [waiter] = _clients(rig, 1)
    backend, bt = rig.accept()
    bt._lenient = True  # a StringTransport cannot report the loss that aborting it causes
    leader.connectionLost(Failure(ConnectionRefusedError("reset")))
    assert rig.pending() == 1  # the waiter forwards itself
    b, _ = rig.accept()
    b.dataReceived(CACHEABLE)
    assert parse_responses(waiter.value())[0][2] == b"hello"


def test_max_waiters_bounds_the_queue_and_zero_disables(docroot):
    rig = Rig(docroot, coalesce_max_waiters=2)
    _clients(rig, 5)
    assert rig.pending() == 3  # the leader and two past the bound
    rig = Rig(docroot, coalesce_max_waiters=0)
    _clients(rig, 3)
    assert rig.pending() == 3


def test_requests_with_credentials_or_directives_neither_lead_nor_wait(docroot):
    rig = Rig(docroot)
    _clients(rig, 1)
    _clients(rig, 1, b"GET /x HTTP/1.1\r\nHost: t\r\nAuthorization: Basic eDp5\r\n\r\n")
    _clients(rig, 1, b"GET /x HTTP/1.1\r\nHost: t\r\nCache-Control: no-cache\r\n\r\n")
    # A WebSocket handshake's exchange lasts as long as its tunnel: never waited for.
    ws = b"GET /x HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    _clients(rig, 2, ws)
    assert rig.pending() == 5


def test_uncacheable_leader_does_not_serialise_a_different_key(docroot):
    rig = Rig(docroot)
    _clients(rig, 1)
    _clients(rig, 1, b"GET /y HTTP/1.1\r\nHost: t\r\n\r\n")
    assert rig.pending() == 2
