"""The runtime verbs: THE list of what a protocol module may do to a connection.

A protocol module never touches a Twisted transport; its states act on
connections through these functions and nothing else.  Each takes a
connection scope (:class:`afpa.machine.scopes.Connection`): the client
connection a state runs on, or the outbound connection of an exchange (once
:func:`attach` has bound it to a connected outbound protocol).

Writing and closing

- :func:`write` ``(conn, bufs)``: bytes to the other end, in order, after
  anything written before (straight to the socket when nothing is queued).
- :func:`close` ``(conn)``: close once the bytes written are out.
- :func:`abort` ``(conn)``: cut the connection now (a reset); nothing queued is sent.

Reading and back-pressure

- :func:`pause_reading` / :func:`resume_reading` ``(conn)``: stop / restart
  reading from the other end.
- :func:`pace` ``(reader, writer)``: while ``writer``'s send buffer is full,
  ``reader`` is not read (a body relayed from one connection to the other never
  piles up); :func:`unpace` ``(writer)`` ends it.

Relaying (the splice)

- :func:`splice` ``(reactor, conn, host, port, timeout, idle_timeout)``: connect
  to a server, replay ``conn``'s unread input, relay bytes both ways until
  either side closes.
- :func:`splice_to` ``(reactor, conn, outbound, idle_timeout)``: the same with an
  outbound connection already open (a backend that agreed to switch protocols).

Outbound exchanges

- :func:`exchange` ``(g, machine, req, peer)``: a new exchange running a
  companion machine over an outbound connection (``start()`` runs it).
- :func:`attach` ``(conn, proto)`` / :func:`detach` ``(conn)``: bind an
  exchange's connection scope to a connected outbound protocol (e.g. one a
  ``routing.pool.BackendPool`` handed out), or unbind it.

The Send Engine (``afpa.send_engine``) writes a state's response itself; the
cache-hit path goes through it, never through these functions, so a hit pays
no extra call.
"""

from __future__ import annotations

from typing import Any

from afpa.machine.scopes import Connection
from afpa.net import twisted_private
from afpa.net.outbound import Exchange
from afpa.net.sendengine import write
from afpa.net.splice import splice, splice_to

__all__ = ["write", "close", "abort", "pause_reading", "resume_reading", "pace", "unpace",
           "splice", "splice_to", "exchange", "attach", "detach"]


def close(conn: Connection) -> None:
    """Close ``conn`` once the bytes written to it are out."""
    t = conn.transport
    if t is not None:
        t.loseConnection()


def abort(conn: Connection) -> None:
    """Cut ``conn`` now (a reset): nothing still queued for it is sent."""
    t = conn.transport
    if t is not None:
        t.abortConnection()


def pause_reading(conn: Connection) -> None:
    """Stop reading from ``conn`` (its input is not being consumed)."""
    if conn.driver is not None:
        conn.driver.pause_reading()  # a client connection keeps its own account
    elif conn.transport is not None:
        conn.transport.pauseProducing()


def resume_reading(conn: Connection) -> None:
    """Read from ``conn`` again."""
    if conn.driver is not None:
        conn.driver.resume_reading()
    elif conn.transport is not None:
        conn.transport.resumeProducing()


class _Throttle:
    """A streaming producer standing for a connection's reading side."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection):
        self.conn = conn

    def pauseProducing(self) -> None:
        pause_reading(self.conn)

    def resumeProducing(self) -> None:
        resume_reading(self.conn)

    def stopProducing(self) -> None:
        pass


def pace(reader: Connection, writer: Connection) -> None:
    """Stop reading ``reader`` whenever ``writer``'s send buffer is full, and
    read it again once that buffer has drained, until :func:`unpace`."""
    if reader.driver is not None:
        producer: Any = _Throttle(reader)  # through the driver, which tracks pausing
    else:
        producer = reader.transport  # an outbound connection: its transport pauses itself
    writer.transport.registerProducer(producer, True)


def unpace(writer: Connection) -> None:
    """End :func:`pace` on ``writer`` (nothing happens when nothing paces it)."""
    t = writer.transport
    if t is not None and t.producer is not None:
        t.unregisterProducer()


def exchange(g: Any, machine: Any, req: Any, peer: str = "", watch: Connection | None = None) -> Exchange:
    """A new outbound exchange running ``machine`` with request scope ``req``;
    ``start()`` runs it and returns a Deferred of the word it ends with.
    ``watch``: a client connection whose events (``input``, ``peer_closed``,
    ``timeout``) go to this machine while it runs."""
    return Exchange(g, machine, req, peer, watch=watch)


def attach(conn: Connection, proto: Any) -> None:
    """Bind the connection scope ``conn`` to ``proto``, a connected outbound
    protocol: the verbs on ``conn`` now act on it (with direct socket writes
    where the client connections get them)."""
    t = proto.transport
    conn.transport = t
    conn.sock = twisted_private.direct_socket(t)


def detach(conn: Connection) -> None:
    """Unbind ``conn`` from its outbound connection (which is not closed)."""
    conn.transport, conn.sock = None, None
