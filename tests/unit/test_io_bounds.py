"""Connection I/O and memory bounds: nothing is read after a closing answer,
queued output per client is bounded, the cache charges what it holds, and
responses in flight stay within a budget."""

from __future__ import annotations

import gc
import os
import tracemalloc

from twisted.internet.testing import StringTransport

from afpa.cache.store import CacheObject, CacheStore, fragments_of
from tests.conftest import MemoryServer
from tests.httpclient import parse_responses


def get(path: str, host: str = "test") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


class QueueingTransport(StringTransport):
    """A StringTransport that reports what it holds the way a TCP transport
    does (``_tempDataLen``, ``dataBuffer``, ``offset``): nothing is taken by
    the peer until the test calls :meth:`drain`."""

    dataBuffer = b""
    offset = 0

    @property
    def _tempDataLen(self) -> int:
        return len(self.value())

    def drain(self) -> bytes:
        """The client reads everything; the transport asks its producer for more."""
        out = self.value()
        self.clear()
        if self.producer is not None and not self.streaming:
            self.producer.resumeProducing()
        return out


def connect(mem, transport_class=StringTransport):
    proto = mem.server.factory().buildProtocol(None)
    t = transport_class()
    proto.makeConnection(t)
    return proto, t


# -- item 3: nothing after a closing answer ----------------------------------

def test_nothing_is_acted_on_after_a_400_that_closes(mem):
    proto, t = connect(mem)
    proto.dataReceived(get("/hello.txt"))  # cached now
    t.clear()
    proto.dataReceived(b"GET /bad HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n" + get("/hello.txt"))
    proto.dataReceived(get("/hello.txt") + get("/page.html"))  # read before the close completes
    [(status, h, _)] = parse_responses(t.value())
    assert status == 400 and h["connection"] == "close"
    assert t.disconnecting and t.producerState == "paused"  # reading stopped
    assert "/page.html" not in str([k for k in mem.server.runtime.cache._index])


# -- item 4: output queued for a client that does not read --------------------

def test_pipelined_hits_wait_for_a_client_that_does_not_read(docroot):
    data = os.urandom(60 * 1024)
    (docroot / "60k.bin").write_bytes(data)
    mem = MemoryServer(str(docroot), output_buffer=256 * 1024)
    proto, t = connect(mem, QueueingTransport)
    proto.dataReceived(get("/60k.bin"))
    t.drain()
    proto.dataReceived(get("/60k.bin") * 40)
    # Answering stops once more than output_buffer is queued for the client.
    assert 256 * 1024 < len(t.value()) <= 256 * 1024 + 2 * len(data)
    assert proto.conn.busy
    # Input that keeps coming is buffered, then no longer read.
    proto.dataReceived(get("/60k.bin") * 2000)
    assert proto.reading_paused and t.producerState == "paused"
    got = []
    for _ in range(5000):
        got += parse_responses(t.drain())
        if len(got) == 2040:
            break
    assert len(got) == 2040 and all(b == data for _, _, b in got)
    assert not proto.conn.busy and not proto.reading_paused and t.producerState == "producing"
    assert not t.disconnecting


# -- item 5: the cache budget bounds memory -----------------------------------

def _held_by(build) -> tuple[int, object]:
    """Bytes still allocated (tracemalloc) after ``build()`` returned, with its result kept."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = build()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, result
    finally:
        tracemalloc.stop()


def test_cache_bytes_charge_long_keys_and_overhead():
    budget = 1 << 20

    def fill():
        c = CacheStore(budget, 1 << 20)
        for i in range(5000):
            host = b"h%05d." % i + b"x" * 240
            target = b"/%05d/" % i + b"t" * 2000
            body = b"b" * 50
            c.put(CacheObject((host, target), b"HTTP/1.1 200 OK\r\n" + b"f" * 180, fragments_of(body),
                              len(body), 0.0, 10.0, b"HTTP/1.1 304 Not Modified\r\n", b'"e%d"' % i,
                              1000, (1, 2, 3, 4)))
        return c

    held, c = _held_by(fill)
    assert c.bytes <= budget and c.evicted > 0
    # The true footprint of what the store keeps stays within its budget (plus
    # a little for the index and heap themselves).
    assert held <= budget * 1.1 + 64 * 1024, f"store holds {held} bytes for a budget of {budget}"


def test_replaced_objects_are_not_kept_alive_by_the_store():
    def churn():
        c = CacheStore(1 << 20, 1 << 20)
        for i in range(200):
            for _ in range(3):  # a newer version replaces the stored one
                c.put(CacheObject(("h", "/k%d" % i), b"H", fragments_of(os.urandom(4000)), 4000, 0.0, 1.0))
        return c

    held, c = _held_by(churn)
    assert held <= c.bytes * 1.1 + 64 * 1024


def test_overlong_host_is_refused_and_long_target_is_414(mem):
    for data in (get("/hello.txt", host="a" * 300),
                 b"GET http://" + b"a" * 300 + b"/hello.txt HTTP/1.1\r\nHost: a\r\n\r\n"):
        proto, t = connect(mem)
        proto.dataReceived(data)
        [(status, _, body)] = parse_responses(t.value())
        assert status == 400 and b"Host too long" in body
    proto, t = connect(mem)
    proto.dataReceived(get("/hello.txt", host="a" * 250 + ":8080"))
    assert parse_responses(t.value())[0][0] == 200
    proto, t = connect(mem)
    proto.dataReceived(get("/" + "x" * (9 * 1024)))
    assert parse_responses(t.value())[0][0] == 414
    assert len(mem.server.runtime.cache) == 1


# -- item 7: responses in flight stay within a budget --------------------------

def test_in_flight_store_reservations():
    c = CacheStore(1000, 1000)
    assert c.reserve(600) and not c.reserve(500) and c.reserve(400)
    c.unreserve(600)
    assert c.inflight_bytes == 400
    o = CacheObject("k", b"", fragments_of(os.urandom(100)), 100, 0.0, 1.0)
    c.pin(o)
    assert not c.put(o) and c.pinned_bytes == o.cost  # rejected, yet being sent: counted
    c.release(o)
    assert c.pinned_bytes == 0


def test_slow_readers_of_distinct_files_stay_within_the_in_flight_budget(docroot):
    files = {}
    for i in range(20):
        files[f"/f{i}.bin"] = os.urandom(200 * 1024)
        (docroot / f"f{i}.bin").write_bytes(files[f"/f{i}.bin"])
    budget = 1 << 20
    mem = MemoryServer(str(docroot), cache_bytes=budget)
    cache = mem.server.runtime.cache
    clients = []
    for path in files:  # twenty readers that take nothing yet
        proto, t = connect(mem)
        proto.dataReceived(get(path))
        clients.append((path, t))
        assert cache.pinned_bytes + cache.inflight_bytes <= budget
        assert cache.bytes <= budget
    busy = 0
    for path, t in clients:
        for _ in range(100):
            if t.producer is None:
                break
            t.producer.resumeProducing()
        [(status, h, body)] = parse_responses(t.value())
        assert status == 200 and body == files[path]
        busy += h["cache-status"].endswith("detail=busy")
    assert busy >= 10  # past the budget, files were streamed instead of held whole
    assert cache.pinned_bytes == cache.inflight_bytes == 0
