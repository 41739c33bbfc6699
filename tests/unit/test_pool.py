"""Backend pools: reuse newest first, bounded idle set, idle expiry by sweep."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from routing.pool import Backend, BackendPool, BackendProtocol


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


def test_backend_url_parsing():
    assert Backend.parse("http://127.0.0.1:8081") == Backend("127.0.0.1", 8081)
    assert Backend.parse("127.0.0.1:8081/") == Backend("127.0.0.1", 8081)
    for bad in ("https://x:1", "http://x:1/path", "http://:1", "http://x:99999"):
        try:
            Backend.parse(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")
