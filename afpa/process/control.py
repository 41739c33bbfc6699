"""The control channel between a supervisor and one of its workers.

One AF_UNIX stream socket (a socketpair: the supervisor keeps one end, the
worker inherits the other as file descriptor :data:`WORKER_FD`) carries JSON
objects, one per line (UTF-8, ``\\n``-terminated), in both directions:

    request  {"id": 7, "op": "ping", "args": {}}              (optionally "fds": N)
    reply    {"id": 7, "ok": true, "result": {...}}
             {"id": 7, "ok": false, "error": "one line"}

Either side may send requests; each side answers the other's requests by
``id`` (ids are per sender).  A request may carry open file descriptors
(SCM_RIGHTS, how the supervisor hands its listening sockets over): the sender
passes them with the request and ``"fds": N`` says how many belong to it; they
arrive before the line that names them and the handler gets them as a list.

Nothing here knows what an op means: :class:`Channel` runs handlers from a
dict and matches replies to requests.  A reply that does not come within the
request's timeout, or a channel that closes first, fails the request's
Deferred with :class:`ControlError`; it never hangs.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger(namespace="afpa.process.control")

WORKER_FD = 3               # where a worker finds its end of the channel
MAX_LINE = 64 << 20         # bytes: room for a large metrics snapshot, not for a runaway peer

# handler(args, fds) -> dict, or a Deferred firing with one
Handler = Callable[[dict, list[int]], Any]


class ControlError(Exception):
    """A request failed: the peer answered an error, timed out or went away."""


@implementer(IFileDescriptorReceiver)
class Channel(Protocol):
    """One end of a control channel (JSON lines, see the module docstring).

    ``handlers`` maps op names to functions answering the peer's requests;
    ``on_lost(reason)`` runs once when the channel closes (the peer exited,
    or, seen from a worker, the supervisor died)."""

    def __init__(self, handlers: dict[str, Handler], reactor: Any,
                 on_lost: Callable[[Failure], None] | None = None):
        self.handlers = handlers
        self.reactor = reactor
        self.on_lost = on_lost
        self.open = False
        self._buffer = b""
        self._next_id = 0
        self._pending: dict[int, tuple[Deferred, Any]] = {}
        self._fds: deque[int] = deque()  # received, not yet claimed by a request

    # -- sending ----------------------------------------------------------------

    def request(self, op: str, args: dict | None = None, timeout: float = 10.0,
                fds: tuple[int, ...] | list[int] = ()) -> Deferred:
        """Ask the peer to run ``op``; the Deferred fires with its result dict, or
        fails with :class:`ControlError` (error reply, timeout, channel closed).
        ``fds`` stay owned by the caller and must stay open until sent."""
        d: Deferred = Deferred()
        if not self.open:
            d.errback(ControlError("control channel closed"))
            return d
        self._next_id += 1
        rid = self._next_id
        timer = self.reactor.callLater(timeout, self._timed_out, rid, timeout)
        self._pending[rid] = (d, timer)
        msg: dict[str, Any] = {"id": rid, "op": op, "args": args or {}}
        for fd in fds:
            self.transport.sendFileDescriptor(fd)
        if fds:
            msg["fds"] = len(fds)
        self._send(msg)
        return d

    def _send(self, msg: dict) -> None:
        if self.open:
            self.transport.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    def _timed_out(self, rid: int, timeout: float) -> None:
        d, _ = self._pending.pop(rid, (None, None))
        if d is not None:
            d.errback(ControlError(f"no answer within {timeout:g} s"))

    # -- receiving ----------------------------------------------------------------

    def connectionMade(self) -> None:
        self.open = True

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self._fds.append(descriptor)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if not sep:
                if len(self._buffer) > MAX_LINE:
                    log.error("control channel: a line longer than {n} bytes; closing", n=MAX_LINE)
                    self.transport.loseConnection()
                return
            self._buffer = rest
            try:
                msg = json.loads(line)
            except ValueError:
                log.error("control channel: not JSON: {line!r}", line=line[:200])
                continue
            if isinstance(msg, dict):
                self._message(msg)

    def _message(self, msg: dict) -> None:
        rid = msg.get("id")
        if "op" in msg:
            n = msg.get("fds", 0)
            fds = [self._fds.popleft() for _ in range(min(n, len(self._fds)))]
            self._serve(rid, msg["op"], msg.get("args") or {}, fds)
            return
        d, timer = self._pending.pop(rid, (None, None))
        if d is None:
            return  # answered after its timeout: already failed
        timer.cancel()
        if msg.get("ok"):
            d.callback(msg.get("result") or {})
        else:
            d.errback(ControlError(str(msg.get("error", "failed"))))

    def _serve(self, rid: Any, op: str, args: dict, fds: list[int]) -> None:
        handler = self.handlers.get(op)
        if handler is None:
            for fd in fds:
                _close(fd)
            self._send({"id": rid, "ok": False, "error": f"unknown op {op!r}"})
            return
        d = maybeDeferred(handler, args, fds)

        def ok(result: Any) -> None:
            self._send({"id": rid, "ok": True, "result": result if result is not None else {}})

        def failed(f: Failure) -> None:
            if not f.check(ControlError, ValueError, KeyError, TypeError):
                log.failure("control op {op} failed", f, op=op)
            self._send({"id": rid, "ok": False, "error": f.getErrorMessage() or f.type.__name__})

        d.addCallbacks(ok, failed)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.open = False
        pending, self._pending = self._pending, {}
        for d, timer in pending.values():
            timer.cancel()
            d.errback(ControlError("the other end went away before answering"))
        while self._fds:
            _close(self._fds.popleft())
        if self.on_lost is not None:
            self.on_lost(reason)


def _close(fd: int) -> None:
    import os
    try:
        os.close(fd)
    except OSError:
        pass
