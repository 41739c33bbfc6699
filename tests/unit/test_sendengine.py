"""The Send Engine's producers against a scripted socket and transport."""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from afpa.cache.store import CacheObject, CacheStore, fragments_of
from afpa.config import Settings
from afpa.machine.scopes import Connection, Runtime
from afpa.net.sendengine import FILE_CHUNK, FileBody, Pieces, send_engine


class ScriptedSocket:
    """Accepts ``budgets`` bytes per call in turn (then everything)."""

    def __init__(self, *budgets):
        self.budgets = list(budgets)
        self.data = bytearray()

    def _take(self, data: bytes) -> int:
        n = self.budgets.pop(0) if self.budgets else len(data)
        n = min(n, len(data))
        self.data += data[:n]
        if n == 0:
            raise BlockingIOError
        return n

    def send(self, data):
        return self._take(bytes(data))

    def sendmsg(self, bufs):
        return self._take(b"".join(bytes(b) for b in bufs))


class FakeTransport:
    """The parts of a Twisted TCP transport the Send Engine looks at; the test
    drains the buffer (into the same socket) and calls the producer back."""

    def __init__(self, sock):
        self.sock = sock
        self._tempDataLen = 0
        self.dataBuffer = b""
        self.pending: list[bytes] = []
        self.connected, self.disconnecting = True, False
        self.producer = None

    def write(self, data):
        assert isinstance(data, bytes)  # as Twisted's transports insist
        self.pending.append(data)
        self._tempDataLen += len(data)

    def writeSequence(self, seq):
        for d in seq:
            self.write(d)

    def registerProducer(self, producer, streaming):
        assert not streaming
        self.producer = producer
        producer.resumeProducing()

    def unregisterProducer(self):
        self.producer = None

    def drain(self):
        """The kernel took the buffer: the 'send window open' event (which, as in
        Twisted, only comes when there was something buffered)."""
        if not self.pending:
            return
        self.sock.data += b"".join(self.pending)
        self.pending, self._tempDataLen = [], 0
        if self.producer is not None:
            self.producer.resumeProducing()


class ManualHelpers:
    def __init__(self):
        self.calls = []

    def run(self, fn, *args):
        d = Deferred()
        self.calls.append((d, fn, args))
        return d

    def fire_next(self):
        d, fn, args = self.calls.pop(0)
        d.callback(fn(*args))


class G:
    def __init__(self, helpers):
        self.runtime = Runtime(Clock(), Settings(), CacheStore(1 << 30, 1 << 30), helpers)


class Req:
    def __init__(self, head, body):
        self.head, self.body, self.close, self.sent_head = head, body, False, False


def connection(sock):
    t = FakeTransport(sock)
    conn = Connection(t, None, None)
    conn.sock = sock
    return conn, t


def send_file(tmp_path, data, sock, rounds, direct=True):
    """Send ``data`` from a file after the head ``HEAD`` to ``sock``, completing
    helper reads and draining the transport up to ``rounds`` times; the
    outcomes so far and the transport.  ``direct=False``: no direct socket
    writes (the public send path)."""
    path = tmp_path / "f"
    path.write_bytes(data)
    helpers = ManualHelpers()
    g = G(helpers)
    conn, t = connection(sock)
    if not direct:
        conn.sock = None
    fd = os.open(path, os.O_RDONLY)
    outcomes = []
    send_engine(g, conn, Req(b"HEAD", FileBody(fd, len(data)))).addCallback(outcomes.append)
    for _ in range(rounds):
        if outcomes:
            break
        while helpers.calls:
            helpers.fire_next()
        t.drain()
    return outcomes, t


def test_file_sender_never_waits_for_a_read_it_did_not_start(tmp_path):
    """A read completing while the transport still held bytes, then a socket that
    takes everything at once, once left the sender waiting forever."""
    data = os.urandom(3 * FILE_CHUNK + 123)
    sock = ScriptedSocket(10, 0)  # head partly taken, then the socket is full
    outcomes, t = send_file(tmp_path, data, sock, rounds=100)  # reads complete while the transport is busy
    assert outcomes == ["sent"]
    assert bytes(sock.data) == b"HEAD" + data
    assert t.producer is None


def test_memory_sender_pins_until_done():
    body = os.urandom(300 * 1024)
    g = G(ManualHelpers())
    obj = CacheObject("k", b"", fragments_of(body), len(body), 0, 1)
    g.runtime.cache.put(obj)
    sock = ScriptedSocket(1000, 0)
    conn, t = connection(sock)
    done = send_engine(g, conn, Req(b"H", obj))
    outcomes = []
    done.addCallback(outcomes.append)
    assert obj.refs == 1
    g.runtime.cache.remove("k")      # evicted mid-send
    for _ in range(50):
        if outcomes:
            break
        t.drain()
    assert outcomes == ["sent"] and bytes(sock.data) == b"H" + body
    assert obj.refs == 0 and g.runtime.cache.pinned_bytes == 0


def test_pieces_send_memoryviews_pinned_and_queue_only_bytes():
    """A range body: memoryview slices of an object's fragments go to the socket
    as they are; what the socket does not take reaches the transport as bytes."""
    body = os.urandom(300 * 1024)
    g = G(ManualHelpers())
    obj = CacheObject("k", b"", fragments_of(body), len(body), 0, 1)
    frags = obj.fragments
    pieces = [memoryview(frags[0])[100:], frags[1], memoryview(frags[2])[:5], b"--end"]
    want = body[100:65536 * 2] + body[65536 * 2:65536 * 2 + 5] + b"--end"
    for budgets in [(), (1000, 0), (70000, 0)]:
        sock = ScriptedSocket(*budgets)
        conn, t = connection(sock)
        done = send_engine(g, conn, Req(b"H", Pieces(obj, list(pieces))))
        outcomes = []
        if isinstance(done, str):
            outcomes.append(done)
        else:
            done.addCallback(outcomes.append)
        for _ in range(50):
            if outcomes:
                break
            t.drain()
        t.drain()
        assert outcomes == ["sent"] and bytes(sock.data) == b"H" + want
        assert obj.refs == 0


def test_file_body_range_streams_from_an_offset(tmp_path):
    data = os.urandom(2 * FILE_CHUNK + 999)
    path = tmp_path / "f"
    path.write_bytes(data)
    helpers = ManualHelpers()
    g = G(helpers)
    sock = ScriptedSocket()
    conn, t = connection(sock)
    fd = os.open(path, os.O_RDONLY)
    start, stop = FILE_CHUNK - 7, 2 * FILE_CHUNK + 500
    done = send_engine(g, conn, Req(b"H", FileBody(fd, len(data), start, stop)))
    outcomes = []
    done.addCallback(outcomes.append)
    for _ in range(100):
        if outcomes:
            break
        while helpers.calls:
            helpers.fire_next()
        t.drain()
    assert outcomes == ["sent"] and bytes(sock.data) == b"H" + data[start:stop]


def test_file_sender_reads_at_most_one_chunk_ahead(tmp_path):
    """Without direct socket writes (the public path: every byte through the
    transport), a read finishing while the previous chunk still waited to be
    sent once replaced that chunk: the client got a body with a hole in it."""
    data = os.urandom(5 * FILE_CHUNK + 7)
    sock = ScriptedSocket()
    outcomes, t = send_file(tmp_path, data, sock, rounds=1000, direct=False)  # the disk outruns the client
    assert outcomes == ["sent"]
    assert bytes(sock.data) == b"HEAD" + data
