"""The Send Engine: the runtime-intrinsic state that writes a response.

It sends what a protocol's state function left on the request scope
(``req.head`` and ``req.body``) and returns:

- ``sent``: everything is written or handed to the transport, keep the connection;
- ``close``: the same, then close (``req.close`` was set);
- ``aborted``: the client went away before the body was out.

Small bodies go out inside the call that asked for them.  When the transport has
nothing queued, bytes are handed straight to the socket with one ``sendmsg``
(head and fragments as a scatter/gather list, no joining), which spares the
reactor a write-readiness round trip; whatever the socket does not take goes
through the transport as usual.  A cached body the store keeps in a memory file
(objects of more than one fragment) goes with ``sendfile`` instead, after the
head: the kernel takes references to the file's pages rather than copying the
bytes, which was most of the server's work on a large hit.  Those direct
writes need Twisted's private buffer state, so they live in
:mod:`afpa.net.twisted_private` (on its public path every byte goes through
the transport).  Bodies that do not fit the socket at once are
sent by a pull producer, at most 64 KiB at a time into the transport, so Twisted's
producer/consumer flow control paces us to the client and a large body is never
buffered whole.  Files too large to cache are read by helper threads
(``runtime.helpers``) a chunk ahead of the socket.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer
from zope.interface import implementer

from afpa.cache.store import FRAGMENT, CacheObject
from afpa.machine.modules import UnmetNeed
from afpa.machine.scopes import WORK
# Imported by name: the hit path calls push with no attribute lookup.
from afpa.net.twisted_private import push, push_file, queue_of, queued

BATCH = 64              # buffers per sendmsg (well under IOV_MAX)
FILE_CHUNK = 256 * 1024  # bytes a helper thread reads per trip
# Bytes of a memory-file body put into the transport when the socket is full:
# enough to be called back once the socket has room (the kernel reports it
# writable only when a good part of its send buffer is free), little to copy.
PIECE = 16 * 1024


@attrs.define(slots=True, eq=False)
class FileBody:
    """A body streamed from an open file descriptor, never cached: the file's
    bytes ``start:end`` (``end`` -1: to ``size``, the whole file by default)."""

    fd: int
    size: int
    start: int = 0
    end: int = -1

    @property
    def stop(self) -> int:
        """Where sending ends (exclusive offset)."""
        return self.size if self.end < 0 else self.end

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            try:
                os.close(self.fd)
            finally:
                self.fd = -1


@attrs.define(slots=True, eq=False)
class Pieces:
    """A body made of byte buffers (bytes or memoryviews) that belong to a cache
    object, e.g. the ranges of a partial response: sent like the object's own
    fragments, with ``obj`` pinned while they are out."""

    obj: CacheObject
    fragments: list


def owned(bufs: list) -> list[bytes]:
    """``bufs`` as bytes for a transport, which takes nothing else: memoryview
    pieces (the ranges of a partial response) are copied, only once the socket
    did not take them at once."""
    return [b if b.__class__ is bytes else bytes(b) for b in bufs]


def skip(bufs: list, n: int) -> list:
    """``bufs`` without their first ``n`` bytes (a cut buffer becomes a view: no copy)."""
    i = 0
    for b in bufs:
        if n < len(b):
            break
        n -= len(b)
        i += 1
    rest = bufs[i:]
    if n:
        rest[0] = memoryview(rest[0])[n:]
    return rest


def write(conn: Any, bufs: list[bytes]) -> None:
    """Write ``bufs`` in order: straight to the socket if possible, the rest queued."""
    rest = push(conn, bufs)
    if rest:
        conn.transport.writeSequence(owned(rest))


def send_engine(g: Any, conn: Any, req: Any) -> str | Deferred:
    """Write ``req.head`` and ``req.body``; persistence and flow control included.

    Raises :class:`UnmetNeed` when no state left a response (``req.head`` empty):
    sending nothing would leave the client waiting for an answer that never comes.
    """
    if not req.head:
        raise UnmetNeed("needs 'response', but no state put one on the request")
    body = req.body
    done = "close" if req.close else "sent"
    req.sent_head = True
    if body is None:
        rest = push(conn, [req.head])
        if rest:
            conn.transport.writeSequence(owned(rest))
            return _backlogged(g, conn, done)
        return done
    cls = body.__class__
    if cls is CacheObject or cls is Pieces:
        frags = body.fragments
        if len(frags) <= 1:
            rest = push(conn, [req.head, *frags])
            if rest:
                conn.transport.writeSequence(owned(rest))
                return _backlogged(g, conn, done)
            return done
        if cls is CacheObject and body.file is not None:
            # Head, then the body straight from its memory file's pages.
            n = push_file(conn, req.head, body.file.fd, 0, body.size)
            if n == len(req.head) + body.size:
                return done
            rest = skip([req.head, *frags], n)
        else:
            rest = push(conn, [req.head, *frags[:BATCH]])
            if not rest and len(frags) <= BATCH:
                return done
            rest += frags[BATCH:]
        if cls is CacheObject:
            sender = _MemorySender(g.runtime, conn, rest, done, body)
            sender.file = body.file
        else:
            sender = _MemorySender(g.runtime, conn, rest, done, body.obj)
    elif cls is FileBody:
        sender = _FileSender(g.runtime, conn, [req.head], done, body)
    else:
        raise TypeError(f"the Send Engine cannot send a {type(body).__name__}")
    return sender.start()


def _backlogged(g: Any, conn: Any, done: str) -> str | Deferred:
    """Only reached when the socket did not take a whole response (never on a
    hit the client keeps up with).  Past ``output_buffer`` queued bytes, the
    request is not over until the transport has drained: the machine waits, so
    no further pipelined request is answered and reading stops, and a client
    that never reads cannot make us queue without bound.  On the public path
    (no Twisted privates) the queue cannot be measured: every response handed
    to the transport waits for it to drain."""
    held = queued(conn.transport)
    if held is not None and held <= g.runtime.settings.output_buffer:
        return done
    return _Drain(g.runtime, conn, [], done, None).start()


@implementer(IPullProducer)
class _Sender:
    """Pull producer: the transport calls ``resumeProducing`` whenever its buffer
    has drained (the 'send window open' event), and we write the next bytes."""

    def __init__(self, runtime: Any, conn: Any, bufs: list[bytes], outcome: str, body: Any):
        self.runtime = runtime
        self.conn = conn
        self.bufs = bufs
        self.outcome = outcome
        self.body = body
        self.finished = Deferred()
        self.over = False

    def start(self) -> Deferred:
        """Register with the transport; the Deferred fires with the outcome."""
        self._touch()
        self.conn.transport.registerProducer(self, False)
        return self.finished

    def _touch(self) -> None:
        # Progress pushes the send deadline out: only a stalled client times out.
        self.conn.arm(self.runtime.reactor.seconds() + self.runtime.settings.send_timeout, WORK)

    def _drain(self) -> bool:
        """Send queued buffers until the socket is full.  Returns True when bytes
        were left in the transport, which then calls us back once it has drained."""
        conn = self.conn
        while self.bufs:
            rest = push(conn, self.bufs[:BATCH])
            if rest:
                conn.transport.write(owned(rest[:1])[0])
                self.bufs = rest[1:] + self.bufs[BATCH:]
                return True
            self.bufs = self.bufs[BATCH:]
        return False

    def _end(self, outcome: str) -> None:
        if self.over:
            return
        self.over = True
        self._release()
        if outcome != "aborted":
            self.conn.transport.unregisterProducer()
        self.finished.callback(outcome)

    def _release(self) -> None:
        raise NotImplementedError

    def stopProducing(self) -> None:
        """The connection is gone."""
        self._end("aborted")


class _Drain(_Sender):
    """Waits for the transport holding a response to drain.  Registered on the
    byte-queueing transport itself (under TLS too), whose buffer empties before
    it calls ``resumeProducing``."""

    registering = False

    def start(self) -> Deferred:
        self._touch()
        self.target = queue_of(self.conn.transport) or self.conn.transport
        self.registering = True
        self.target.registerProducer(self, False)
        self.registering = False
        return self.finished

    def resumeProducing(self) -> None:
        # Called at registration (still queued: keep waiting) and once drained;
        # when the queue cannot be measured (public path), only the latter counts.
        if self.over:
            return
        held = queued(self.target)
        if held is None:
            drained = not self.registering  # public path: only a drained transport calls back
        else:
            drained = held <= self.runtime.settings.output_buffer
        if drained:
            self._end(self.outcome)

    def _end(self, outcome: str) -> None:
        if self.over:
            return
        self.over = True
        if outcome != "aborted":
            self.target.unregisterProducer()
        self.finished.callback(outcome)

    def _release(self) -> None:
        pass


class _MemorySender(_Sender):
    """Sends the fragments of a cache object, pinned for the duration.  Once
    only body bytes are left and the object has a memory file, each round
    hands the rest to the socket with ``sendfile`` (no copy); what the socket
    does not take goes through the transport a fragment at a time as before,
    so a client that stops reading holds at most one fragment here."""

    file: Any = None  # the object's MemFile when its whole body is being sent

    def start(self) -> Deferred:
        self.runtime.cache.pin(self.body)
        return super().start()

    def _drain(self) -> bool:
        file = self.file
        if file is not None:
            left = 0
            for b in self.bufs:
                left += len(b)
            size = self.body.size
            if left <= size:  # the head is out: the rest is the body's tail
                n = push_file(self.conn, b"", file.fd, size - left, left)
                if n == left:
                    self.bufs = []
                    return False
                if n:
                    self.bufs = skip(self.bufs, n)
                # The socket is full (or failing, or not ours): a piece into the
                # transport, which calls us back once it has drained.  Only a
                # piece: its bytes are copied, and once the socket has room
                # again sendfile sends the rest without copying.
                first = self.bufs[0]
                if len(first) > PIECE:
                    self.conn.transport.write(bytes(memoryview(first)[:PIECE]))
                    self.bufs[0] = memoryview(first)[PIECE:]
                else:
                    self.conn.transport.write(owned(self.bufs[:1])[0])
                    self.bufs = self.bufs[1:]
                return True
        return super()._drain()

    def resumeProducing(self) -> None:
        if self.over:
            return
        self._touch()
        if not self.bufs or not self._drain():
            self._end(self.outcome)

    def _release(self) -> None:
        self.runtime.cache.release(self.body)


class _FileSender(_Sender):
    """Streams a file: a helper thread reads the next chunk while the socket sends."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.offset = self.body.start
        self.stop = self.body.stop
        self.reading = False
        self.waiting = False
        self.ready: bytes | None = None

    def start(self) -> Deferred:
        self._read()
        return super().start()

    def _read(self) -> None:
        # One chunk ahead at most: a read landing while ``ready`` is still
        # unsent would replace it (a hole in the body).
        if self.offset >= self.stop or self.reading or self.over or self.ready is not None:
            return
        self.reading = True
        n = min(FILE_CHUNK, self.stop - self.offset)
        self.runtime.helpers.run(os.pread, self.body.fd, n, self.offset).addCallbacks(
            self._got, self._failed)

    def _got(self, data: bytes) -> None:
        self.reading = False
        if self.over:
            return
        if not data:
            # The file shrank under us: cut the connection rather than send a
            # response that looks complete and is not.
            self._failed(None)
            return
        self.offset += len(data)
        self.ready = data
        if self.waiting:
            self.waiting = False
            self.resumeProducing()

    def _failed(self, _reason: Any) -> None:
        if not self.over:
            self.conn.transport.abortConnection()
            self._end("aborted")

    def resumeProducing(self) -> None:
        if self.over:
            return
        self._touch()
        while self.bufs or self.ready is not None:
            if not self.bufs:
                data, self.ready = self.ready, None
                self.bufs = [data[i:i + FRAGMENT] for i in range(0, len(data), FRAGMENT)]
            if self._drain():
                # Read ahead only once the last fragment is due: a client that
                # stalls holds one chunk here, not two.
                if len(self.bufs) <= 1:
                    self._read()
                return  # the transport calls back when it has drained
        if self.offset >= self.stop and not self.reading:
            self._end(self.outcome)
        else:
            self._read()
            self.waiting = True  # a helper read is under way; _got resumes us

    def _release(self) -> None:
        self.body.close()
