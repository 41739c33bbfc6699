"""Graceful shutdown (``Server.drain``) on in-memory transports and a Clock."""

from __future__ import annotations

import os

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from tests.conftest import MemoryServer
from tests.httpclient import parse_responses


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()


def lost(proto) -> None:
    """What the reactor does once a closing transport has flushed and closed."""
    assert proto.transport.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))


def pump(t) -> None:
    for _ in range(100):
        if t.producer is None:
            return
        t.producer.resumeProducing()


def test_idle_closed_at_once_busy_finish_with_connection_close(docroot):
    data = os.urandom(100 * 1024)
    (docroot / "big.bin").write_bytes(data)
    mem = MemoryServer(str(docroot), max_object_bytes=32 * 1024)
    fresh, fresh_t = mem.connect()
    kept, kept_t = mem.connect()
    kept.dataReceived(get("/hello.txt"))
    assert parse_responses(kept_t.value())[0][0] == 200 and not kept_t.disconnecting
    partial, partial_t = mem.connect()
    partial.dataReceived(b"GET /hello.txt HTTP/1.1\r\nHost: test\r\n")
    stream, stream_t = mem.connect()
    stream.dataReceived(get("/big.bin") + get("/hello.txt"))  # a file streaming, one more queued
    assert stream_t.producer is not None

    fired = []
    mem.server.drain(30).addCallback(fired.append)
    # Between requests: closed at once.  Mid-request: left to finish.
    assert fresh_t.disconnecting and kept_t.disconnecting
    assert not partial_t.disconnecting and not stream_t.disconnecting
    lost(fresh)
    lost(kept)
    assert fired == []

    # The request still arriving is answered, says so, and its connection closes.
    partial.dataReceived(b"\r\n")
    [(status, h, body)] = parse_responses(partial_t.value())
    assert (status, body, h["connection"]) == (200, b"hello world\n", "close")
    lost(partial)
    assert fired == []

    # The streaming response ends complete; the pipelined request after it is not taken.
    pump(stream_t)
    [(status, h, body)] = parse_responses(stream_t.value())
    assert status == 200 and body == data
    assert stream_t.disconnecting
    assert fired == []
    lost(stream)
    assert fired == [0]  # the last connection gone: drained, nothing cut
    assert mem.server.connections == set() and mem.server.live == set()


def test_deadline_cuts_what_is_left_and_new_connections_are_refused(docroot):
    mem = MemoryServer(str(docroot))
    slow, slow_t = mem.connect()
    slow.dataReceived(b"GET /hello.txt HTTP/1.1\r\n")  # a client that never finishes its head
    fired = []
    mem.server.drain(5).addCallback(fired.append)
    late, late_t = mem.connect()  # accepted just before the listener closed
    assert late_t.disconnecting
    lost(late)
    mem.clock.advance(4.9)
    assert fired == [] and not slow_t.disconnecting
    mem.clock.advance(0.2)
    assert fired == [1] and slow_t.disconnected  # cut at the deadline
    assert slow_t.value() == b""


def test_drain_with_nothing_open_fires_at_once(docroot):
    mem = MemoryServer(str(docroot))
    fired = []
    mem.server.drain(30).addCallback(fired.append)
    assert fired == [0]
    assert not mem.clock.getDelayedCalls()  # no deadline timer left behind


def test_stop_cuts_a_drain_short(docroot):
    mem = MemoryServer(str(docroot))
    slow, slow_t = mem.connect()
    slow.dataReceived(b"GET /hello.txt HTTP/1.1\r\n")
    fired = []
    mem.server.drain(30).addCallback(fired.append)
    mem.server.stop()  # a second signal
    assert fired == [1] and slow_t.disconnecting
    assert not mem.clock.getDelayedCalls()
