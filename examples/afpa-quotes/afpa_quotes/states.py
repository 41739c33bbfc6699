"""The state functions of the quotes protocol, and its request scope.

The protocol, one line each way (lines end in LF, CRLF accepted)::

    S: +OK quotes ready                 (the server speaks first)
    C: GET wilde
    S: +OK I can resist everything except temptation.
    C: GET nobody
    S: -ERR no quote for nobody
    C: HELLO
    S: -ERR bad command (GET <key> or QUIT)
    C: QUIT
    S: +OK bye                          (and the server closes)

Each function does one step and returns an outcome word; the table
(``tables/quotes.toml``) decides what runs next.  Answers are left on the
request scope (``req.head``, ``req.body``) for the runtime's Send Engine.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from afpa.cache.store import CacheObject
from afpa.machine.modules import state
from afpa.machine.scopes import WAIT, Request

KEY = re.compile(rb"[A-Za-z0-9_-]{1,64}")  # also keeps a key inside the quotes directory
NAMESPACE = "quotes"  # first part of our cache keys
OK = b"+OK "
BYE = b"+OK bye\r\n"
BAD = b"-ERR bad command (GET <key> or QUIT)\r\n"
TOO_LONG = b"-ERR line too long\r\n"
TIMEOUT = b"-ERR timeout\r\n"


@attrs.define(slots=True, eq=False)
class QuoteRequest(Request):
    """The request scope: one command.  ``line`` is the command without its
    line end; ``key`` the key a GET asks for."""

    line: bytes = b""
    key: bytes = b""


def _answer(req: QuoteRequest, line: bytes, status: int, close: bool = False) -> None:
    # status: for the runtime's request counters (its hundreds digit is the
    # class: 2 answered, 4 the client's mistake, 5 ours); 0 is not counted.
    req.head, req.status, req.close = line, status, close


# needs=() declares an (empty) contract: without one the checker would trust
# begin to provide every fact, and check nothing after it.
@state("connected", "command", needs=())
def begin(g: Any, conn: Any, req: QuoteRequest) -> str:
    """Start of every request: the connection's first (run at connect, the
    server speaks first) greets; every later one reads a command"""
    return "connected" if conn.requests == 0 else "command"


@state("ready", provides={"ready": ("response",)})
def greet(g: Any, conn: Any, req: QuoteRequest) -> str:
    """Put the greeting (built once, from the settings) on the request"""
    req.head = g.greeting
    return "ready"


@state("line", "need_more", "too_long", provides={"line": ("line",), "too_long": ("response",)})
def read_line(g: Any, conn: Any, req: QuoteRequest) -> str:
    """Take one line from the input; wait for more while it is incomplete"""
    buf = conn.inbuf
    # conn.scan: where the previous search stopped, so a line trickling in is
    # not searched again from its start on every read.
    end = buf.find(b"\n", max(conn.scan, conn.inpos))
    if end < 0:
        if len(buf) - conn.inpos > g.max_line:
            _answer(req, TOO_LONG, 400, close=True)
            return "too_long"
        if conn.scan <= conn.inpos < len(buf):
            # The first bytes of a line: the rest must come within line_timeout
            # (the runtime delivers ``timeout`` to this state; the table maps it).
            conn.arm(g.runtime.reactor.seconds() + g.line_timeout, WAIT)
        conn.scan = len(buf)
        return "need_more"
    if end - conn.inpos > g.max_line:
        _answer(req, TOO_LONG, 400, close=True)
        return "too_long"
    req.line = buf[conn.inpos:end].rstrip(b"\r")
    conn.inpos = conn.scan = end + 1
    return "line"


@state("told", provides={"told": ("response",)})
def line_timeout(g: Any, conn: Any, req: QuoteRequest) -> str:
    """A line begun but not finished in time: say so (the table closes after it)"""
    _answer(req, TIMEOUT, 408, close=True)
    return "told"


@state("get", "quit", "bad", needs=("line",),
       provides={"get": ("key",), "quit": ("response",), "bad": ("response",)})
def parse_command(g: Any, conn: Any, req: QuoteRequest) -> str:
    """GET <key> or QUIT; anything else is answered with an error (the connection stays)"""
    verb, _, arg = req.line.partition(b" ")
    verb = verb.upper()
    if verb == b"GET" and KEY.fullmatch(arg):
        req.key = arg
        return "get"
    if verb == b"QUIT" and not arg:
        _answer(req, BYE, 200, close=True)
        return "quit"
    _answer(req, BAD, 400)
    return "bad"


@state("hit", "miss", needs=("key",), provides={"hit": ("response",)})
def lookup(g: Any, conn: Any, req: QuoteRequest) -> str:
    """The fast path: a fresh quote in the cache is the answer, as stored"""
    now = g.runtime.reactor.seconds()
    obj = g.cache.get((NAMESPACE, req.key), now)
    if obj is None or obj.fresh_until < now:  # an expired quote is read again
        return "miss"
    req.head, req.body, req.status = obj.head, obj, 200
    return "hit"


@state("found", "unknown", needs=("key",), provides={"found": ("response",), "unknown": ("response",)})
def read_quote(g: Any, conn: Any, req: QuoteRequest) -> Deferred:
    """A miss: read <dir>/<key>.txt on a helper thread (never on the reactor),
    keep it in the cache for the configured time, and answer"""
    g.reads += 1
    d = g.runtime.helpers.run(_read, g.dir / (req.key.decode("ascii") + ".txt"))
    return d.addCallback(_stored, g, req)


def _read(path: Path) -> bytes | None:
    # Runs on a helper thread: only the file, no scope is touched here.
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None


def _stored(text: bytes | None, g: Any, req: QuoteRequest) -> str:
    if text is None:
        _answer(req, b"-ERR no quote for " + req.key + b"\r\n", 404)
        return "unknown"
    line = b" ".join(text.split()) + b"\r\n"  # a quote is one line on the wire
    now = g.runtime.reactor.seconds()
    # Stored as the bytes that go out: a hit sends them as they are.
    obj = CacheObject(key=(NAMESPACE, req.key), head=OK, fragments=(line,), size=len(line),
                      stored_at=now, fresh_until=now + g.ttl)
    g.cache.put(obj)
    req.head, req.body, req.status = obj.head, obj, 200
    return "found"


FUNCTIONS = [begin, greet, read_line, line_timeout, parse_command, lookup, read_quote]
