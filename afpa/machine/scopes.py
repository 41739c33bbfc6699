"""The three scopes of data a state function sees (AFPA paper, section 3.2).

- **global**: one per module instance; built by the module's ``make_global`` from
  :class:`Runtime` (reactor, cache, helper threads, settings).
- **connection**: :class:`Connection`, one per accepted socket.
- **request**: a subclass of :class:`Request` that the module defines, one per
  request on a connection.

Nothing else is shared between state functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import attrs

if TYPE_CHECKING:  # types only: the machine layer imports nothing above it
    from afpa.cache.store import CacheStore
    from afpa.config import Settings
    from afpa.net.helpers import Helpers


@attrs.define(slots=True, eq=False)
class Runtime:
    """Services the runtime hands to a module when it builds its global scope."""

    reactor: Any
    settings: Settings
    cache: CacheStore
    helpers: Helpers
    machines: dict = attrs.field(factory=dict)  # companion machines by name


# Which timer a connection's deadline is (Connection.timer).  The runtime arms
# IDLE (between requests: the runtime's idle_timeout) and HANDSHAKE (a TLS
# handshake: tls_handshake_timeout, before any machine runs); a state arms WAIT
# (more input it waits for at @wait, e.g. the rest of a request head) or WORK
# (work it parks on: a send, a backend exchange, a tunnel).  Only the driver
# reads it, to know which deadline lapses when the machine parks or resumes;
# what a timeout means is the table's business (the ``timeout`` outcome).
IDLE, HANDSHAKE, WAIT, WORK = 0, 1, 2, 3


@attrs.define(slots=True, eq=False)
class Connection:
    """Per-connection data.

    ``inbuf[inpos:]`` is input not yet consumed; ``scan`` is where the module's
    search for the end of a message resumes, so a request trickling in one byte
    at a time is not rescanned from its start on every byte.  ``pending`` holds
    protocol work left over from the previous request (e.g. a request body still
    to be read and discarded).

    ``deadline`` is the connection's one deadline (seconds on the reactor's
    clock; ``inf``: none) and ``timer`` which timer it is (:data:`IDLE`,
    :data:`HANDSHAKE`, :data:`WAIT`, :data:`WORK`).  The server's once-a-second
    sweep hands a connection whose deadline has passed to its driver, which
    delivers the event word ``timeout`` to the machine (the table maps it).
    ``kind`` is the transport kind: ``"stream"`` here, ``"datagram"`` for
    :class:`afpa.net.datagram.DatagramConnection`.
    """

    kind: ClassVar[str] = "stream"
    transport: Any
    machine: Any
    state: Any
    req: Any = None
    sock: Any = None
    peer_label: str = ""
    inbuf: bytes = b""
    inpos: int = 0
    scan: int = 0
    pending: Any = None
    deadline: float = 0.0
    timer: int = 0               # IDLE, HANDSHAKE, WAIT or WORK: who armed ``deadline``
    requests: int = 0
    busy: bool = False
    closed: bool = False
    reset: bool = False          # closed by a reset or an error, not a clean close
    tls: bool = False
    listener: str = ""           # which kind of listener accepted it ("" for clients, "sibling", ...)
    driver: Any = None           # the Driver running this connection's machine

    def arm(self, until: float, timer: int) -> None:
        """Set the connection's deadline (``until``, on the reactor's clock) and
        say which timer it is: :data:`WAIT` for a state waiting for more input
        (it lapses when the machine parks or the request ends), :data:`WORK`
        for work a parked state waits on (kept while it is parked)."""
        self.deadline = until
        self.timer = timer

    @property
    def peer(self) -> str:
        """``host:port`` of the other end, looked up the first time it is needed
        (most requests never need it)."""
        if not self.peer_label:
            addr = self.transport.getPeer() if self.transport is not None else None
            self.peer_label = f"{getattr(addr, 'host', '?')}:{getattr(addr, 'port', '?')}"
        return self.peer_label

    @property
    def peer_host(self) -> str:
        """The other end's address without the port."""
        return self.peer.rsplit(":", 1)[0]

    def unread(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self.inbuf) - self.inpos


@attrs.define(slots=True, eq=False)
class Request:
    """Base of every module's request scope: what the Send Engine sends.

    A state function that has an answer fills ``head`` (bytes, the complete
    response head), ``body`` (``None``, a :class:`~afpa.cache.store.CacheObject` or a
    :class:`~afpa.net.sendengine.FileBody`), ``status`` and ``close`` (close the
    connection after this response), then hands over to ``afpa.send_engine``,
    which sets ``sent_head`` once the head is on its way.
    """

    started: float = 0.0
    head: bytes = b""
    body: Any = None
    status: int = 0
    close: bool = False
    sent_head: bool = False
    trace: Any = None  # afpa.machine.trace.Trace while the request is traced


# Defaults a generated factory may write as literals (immutable, with an exact repr).
_LITERAL_TYPES = (bytes, str, int, float, bool, type(None))


def request_factory(cls: type) -> Callable[[Any], Any]:
    """A ``make_request`` for the attrs request scope ``cls``: ``make(conn)``
    returns what ``cls()`` would, every field at its default.

    One request scope is made per request; ``cls()`` goes through the type's
    call and a generic ``__init__`` taking every field as an argument, which
    for a scope of thirty-odd fields costs more than storing the defaults.
    The factory is one function that allocates and stores them as constants.
    Every field must have a plain literal default (else ValueError: use
    ``lambda conn: cls()``)."""
    lines = ["def make(conn):", "    self = new(cls)"]
    for field in attrs.fields(cls):
        default = field.default
        if (default is attrs.NOTHING or isinstance(default, attrs.Factory) or not field.init
                or type(default) not in _LITERAL_TYPES or field.name.startswith("_")
                or (type(default) is float and not math.isfinite(default))):
            raise ValueError(f"{cls.__name__}.{field.name}: no plain literal default")
        lines.append(f"    self.{field.name} = {default!r}")
    lines.append("    return self")
    namespace: dict[str, Any] = {"new": object.__new__, "cls": cls}
    exec("\n".join(lines), namespace)  # noqa: S102 - source built above from field names and literals
    make = namespace["make"]
    make.__qualname__ = make.__name__ = f"make_{cls.__name__}"
    return make


class GlobalScope(Protocol):
    """What the runtime needs of a module's global scope (what ``make_global``
    returns): nothing but the :class:`Runtime` it was built from.  Everything
    else on it is the module's own; the runtime reaches it only through the
    module's hooks (``ProtocolModule.describe``, ``sweep``, ``metrics``, ...)."""

    runtime: Runtime


class RequestScope(Protocol):
    """What the runtime reads and writes on a module's request scope (what
    ``make_request`` returns; subclassing :class:`Request` gives all of it).

    ``started``: when the request began (set by the runtime); ``head``,
    ``body``, ``status`` and ``close``: the answer the Send Engine sends (and
    the access log and request counters report); ``sent_head``: set by the Send
    Engine once the head is on its way; ``trace``: an
    :class:`afpa.machine.trace.Trace` while the request is traced, else None."""

    started: float
    head: bytes
    body: Any
    status: int
    close: bool
    sent_head: bool
    trace: Any
