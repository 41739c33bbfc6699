"""The Send Engine's producers against a scripted socket and transport."""

from __future__ import annotations

import os
import socket

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from afpa.cache.store import FRAGMENT, CacheObject, CacheStore, fragments_of
from afpa.config import Settings
from afpa.machine.scopes import Connection, Runtime
from afpa.net import twisted_private
from afpa.net.sendengine import FILE_CHUNK, PIECE, FileBody, Pieces, send_engine

SOCKETS: dict[int, ScriptedSocket] = {}


@pytest.fixture(autouse=True)
def scripted_sendfile(monkeypatch):
    """``sendfile`` to a scripted socket reads the file and offers the bytes to
    the socket, which takes its next budget of them."""
    def sendfile(out_fd, in_fd, offset, count):
        return SOCKETS[out_fd]._take(os.pread(in_fd, count, offset))
    monkeypatch.setattr(twisted_private, "sendfile", sendfile)
    yield
    SOCKETS.clear()


class ScriptedSocket:
    """Accepts ``budgets`` bytes per call in turn (then everything)."""

    def __init__(self, *budgets):
        self.budgets = list(budgets)
        self.data = bytearray()
        self.calls = 0
        self.fd = -1000 - len(SOCKETS)
        SOCKETS[self.fd] = self

    def fileno(self):
        return self.fd

    def _take(self, data: bytes) -> int:
        self.calls += 1
        n = self.budgets.pop(0) if self.budgets else len(data)
        n = min(n, len(data))
        self.data += data[:n]
        if n == 0:
            raise BlockingIOError
        return n

    def send(self, data, flags=0):
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
    sock = ScriptedSocket(1000, 0, 0)  # head and a little (or the head, then nothing), then full
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


def _stored(g, size):
    body = os.urandom(size)
    obj = CacheObject("k", b"", fragments_of(body), len(body), 0, 1)
    g.runtime.cache.put(obj)
    assert obj.file is not None  # the store moved it to a memory file
    return body, obj


def _send(g, conn, head, obj):
    outcomes = []
    done = send_engine(g, conn, Req(head, obj))
    if isinstance(done, str):
        outcomes.append(done)
    else:
        done.addCallback(outcomes.append)
    return outcomes


def test_memory_file_body_goes_by_sendfile_in_one_call_each():
    """A socket that takes everything: the head (one send) and the whole body
    (one sendfile), nothing through the transport."""
    g = G(ManualHelpers())
    body, obj = _stored(g, 300 * 1024)
    sock = ScriptedSocket()
    conn, t = connection(sock)
    assert _send(g, conn, b"HEAD", obj) == ["sent"]
    assert bytes(sock.data) == b"HEAD" + body and sock.calls == 2 and not t.pending
    assert obj.refs == 0


def test_memory_file_partial_sends_keep_order_and_queue_one_fragment_at_most():
    """Whatever the socket takes per call (the head cut, the body cut inside and
    at fragment boundaries), the client gets head and body whole, in order; the
    transport holds at most one fragment (as bytes) at a time, the object stays
    pinned until the last byte."""
    size = 300 * 1024
    for budgets in [(2, 0, 0), (4, 0, 0), (4, 1000, 0, 70000, 0, 0), (4, FRAGMENT, 0, FRAGMENT + 3, 0),
                    (4, 0, 100, 0, 5, 0, 0, 0)]:
        g = G(ManualHelpers())
        body, obj = _stored(g, size)
        sock = ScriptedSocket(*budgets)
        conn, t = connection(sock)
        outcomes = _send(g, conn, b"HEAD", obj)
        for _ in range(100):
            if outcomes:
                break
            assert obj.refs == 1
            assert t._tempDataLen <= FRAGMENT and all(d.__class__ is bytes for d in t.pending)
            t.drain()
        assert outcomes == ["sent"], budgets
        assert bytes(sock.data) == b"HEAD" + body, budgets
        assert obj.refs == 0 and t.producer is None


def test_memory_file_stalled_client_holds_one_piece_and_keeps_the_work_deadline():
    """A client that stops reading: one piece waits in the transport, nothing
    more is read from the object, and the send deadline (WORK) stays armed, so
    the connection's timer cuts the stalled send."""
    from afpa.machine.scopes import WORK

    g = G(ManualHelpers())
    body, obj = _stored(g, 1024 * 1024)
    sock = ScriptedSocket(100000, *([0] * 50))
    conn, t = connection(sock)
    outcomes = _send(g, conn, b"HEAD", obj)  # the transport is never drained
    assert outcomes == [] and obj.refs == 1
    assert t._tempDataLen == len(t.pending[0]) <= PIECE and len(t.pending) == 1
    assert len(sock.data) + t._tempDataLen < len(body)
    assert conn.timer == WORK


def test_memory_file_client_leaving_mid_body_is_aborted_and_released():
    g = G(ManualHelpers())
    body, obj = _stored(g, 1024 * 1024)
    sock = ScriptedSocket(5000, 0, 0, 7000, 0)
    conn, t = connection(sock)
    outcomes = _send(g, conn, b"HEAD", obj)
    t.drain()  # one round more, then the client goes
    assert outcomes == []
    t.producer.stopProducing()  # what Twisted does when the connection is lost
    assert outcomes == ["aborted"] and obj.refs == 0
    assert g.runtime.cache.pinned_bytes == 0


def test_memory_file_public_path_sends_every_byte_through_the_transport():
    """No direct socket (the public path, TLS): the same object goes through the
    transport, one fragment per drain, as bytes."""
    g = G(ManualHelpers())
    body, obj = _stored(g, 200 * 1024 + 7)
    sock = ScriptedSocket()
    conn, t = connection(sock)
    conn.sock = None
    outcomes = _send(g, conn, b"HEAD", obj)
    for _ in range(20):
        if outcomes:
            break
        assert all(d.__class__ is bytes for d in t.pending)
        t.drain()
    assert outcomes == ["sent"] and bytes(sock.data) == b"HEAD" + body
    assert sock.calls == 0


def test_memory_file_ranges_are_sent_from_the_views(monkeypatch):
    """A range of a memory-file object (Pieces) goes out as views (sendmsg), not
    as the whole file."""
    g = G(ManualHelpers())
    body, obj = _stored(g, 300 * 1024)
    monkeypatch.setattr(twisted_private, "sendfile", None)  # never called for pieces
    sock = ScriptedSocket(1000, 0)
    conn, t = connection(sock)
    frags = obj.fragments
    pieces = [frags[0][100:], frags[1], frags[2][:5]]
    outcomes = []
    done = send_engine(g, conn, Req(b"H", Pieces(obj, pieces)))
    done.addCallback(outcomes.append)
    for _ in range(20):
        if outcomes:
            break
        t.drain()
    assert outcomes == ["sent"] and bytes(sock.data) == b"H" + body[100:2 * FRAGMENT + 5]


def test_push_file_with_the_real_sendfile(monkeypatch):
    """push_file over a real (in-memory, AF_UNIX) socket with the kernel's
    sendfile: head and file bytes arrive in order."""
    monkeypatch.setattr(twisted_private, "sendfile", os.sendfile)
    monkeypatch.setattr(twisted_private, "MSG_MORE", 0)  # not for AF_UNIX sockets
    g = G(ManualHelpers())
    body, obj = _stored(g, 100 * 1024)
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        conn, t = connection(a)
        n = twisted_private.push_file(conn, b"HEAD", obj.file.fd, 0, len(body))
        assert n > 4
        got = bytearray()
        while len(got) < n:
            got += b.recv(1 << 20)
        assert bytes(got) == (b"HEAD" + body)[:n]
