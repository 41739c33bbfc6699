"""Backend pools: reuse newest first, bounded idle set, idle expiry by sweep."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from routing.pool import Backend, BackendPool, BackendProtocol, Pools


def connected(pool):
    proto = BackendProtocol(pool)
    proto.makeConnection(StringTransport())
    return proto


def test_reuse_newest_first_and_bounded():
    pool = BackendPool(Clock(), Backend("127.0.0.1", 9), max_idle=2)
    a, b, c = connected(pool), connected(pool), connected(pool)
    for p in (a, b, c):
        pool.release(p, now=0.0)
    assert pool.idle == [a, b] and c.transport.disconnecting  # over the bound: closed
    assert pool.take_idle() is b and pool.reused == 1


def test_idle_connections_expire_and_closed_ones_are_forgotten():
    pool = BackendPool(Clock(), Backend("127.0.0.1", 9), idle_timeout=30)
    old, new = connected(pool), connected(pool)
    pool.release(old, now=0.0)
    pool.release(new, now=20.0)
    pool.sweep(now=40.0)
    assert old.transport.disconnecting and pool.idle == [new]
    new.connectionLost(None)
    assert pool.idle == [] and pool.take_idle() is None


def test_pools_close_the_idle_connections_of_every_backend():
    pools = Pools(Clock())
    a, b = pools.get(Backend("127.0.0.1", 9)), pools.get(Backend("127.0.0.1", 10))
    pa, pb = connected(a), connected(b)
    a.release(pa, now=0.0)
    b.release(pb, now=0.0)
    pools.close_idle()
    assert pa.transport.disconnecting and pb.transport.disconnecting
    assert a.idle == [] and b.idle == []


def test_backend_url_parsing():
    assert Backend.parse("http://127.0.0.1:8081") == Backend("127.0.0.1", 8081)
    assert Backend.parse("127.0.0.1:8081/") == Backend("127.0.0.1", 8081)
    for bad in ("https://x:1", "http://x:1/path", "http://:1", "http://x:99999"):
        try:
            Backend.parse(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")


def test_failures_counted_and_logged_once_per_interval():
    from twisted.logger import capturedLogs

    from routing.pool import LOG_EVERY
    clock = Clock()
    pool = BackendPool(clock, Backend("127.0.0.1", 9))
    with capturedLogs() as events:
        for _ in range(20):
            pool.failed("refused")
        pool.failed("malformed_head", "invalid status line from backend")
        clock.advance(LOG_EVERY + 1)
        pool.failed("refused")
    lines = [e["log_format"].format(**e) for e in events]
    assert lines == ["backend http://127.0.0.1:9: connection refused",
                     "backend http://127.0.0.1:9: malformed response head: invalid status line from backend",
                     "backend http://127.0.0.1:9: connection refused (19 more since the last report)"]
    assert pool.failures == {"refused": 21, "malformed_head": 1}


def test_waiters_served_in_order_with_connections_given_back():
    pool = BackendPool(Clock(), Backend("127.0.0.1", 9), max_connections=1, max_queue=2)
    got = []
    a = connected(pool)
    pool.count = 1
    assert not pool.may_open()
    first, second = (lambda p: got.append(("first", p))), (lambda p: got.append(("second", p)))
    assert pool.enqueue(first) and pool.enqueue(second) and not pool.enqueue(lambda p: None)
    pool.release(a, now=0.0)
    assert got == [("first", a)] and pool.idle == []
    a.connectionLost(None)  # the slot it held is free: the next waiter may open one
    assert got == [("first", a), ("second", None)] and pool.count == 0
