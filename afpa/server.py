"""The server: one module instance, its machine, its listeners and its sweep.

:class:`Server` ties the runtime together: it loads and compiles the table (a
table that fails validation never runs), builds the cache, helper threads and the
module's global scope, accepts connections with :class:`~afpa.net.stream.MachineProtocol`
and runs a once-a-second sweep that delivers ``timeout`` to every connection
whose deadline has passed (one timer for all connections instead of a timer per
request; the machine's table says what a timeout means).
"""

from __future__ import annotations

import socket
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from afpa import reload

from afpa.machine import tables
from afpa.ops.accesslog import AccessLog, FormatError, module_format
from afpa.cache.store import CacheStore
from afpa.config import SettingError, Settings, read_admin_token
from afpa.net.datagram import DatagramEndpoint
from afpa.net.stream import MachineProtocol
from afpa.net import twisted_private
from afpa.net.helpers import Helpers
from afpa.net.intrinsics import default_registry
from afpa.ops.metrics import RequestStats
from afpa.machine.modules import Listener, Registry
from afpa.reload import ConfigSource
from afpa.machine.scopes import Runtime
from afpa.machine.trace import TraceHub, event

log = Logger(namespace="afpa.server")


def listener_plan(settings: Settings) -> list[tuple[str, tuple[str, int]]]:
    """The client listeners the settings ask for, in order, as ``(kind, (host,
    port))`` with kind ``"http"`` or ``"https"`` (what a supervisor binds for its
    workers): :func:`afpa.reload.wanted_listeners` without the admin one."""
    return [(kind, addr) for kind, addr in reload.wanted_listeners(settings) if kind != "admin"]


class MachineFactory(ServerFactory):
    noisy = False
    tls = False
    listener = ""  # the kind of listener (Connection.listener); "" for clients
    # Whether accepted sockets get TCP_NODELAY from the listening one: False,
    # set it per connection; None, to be checked on the next one; True, yes
    # (see Server.listening_on and twisted_private.set_nodelay).
    nodelay_inherited: bool | None = False

    def __init__(self, server: Server):
        self.server = server

    def buildProtocol(self, addr: Any) -> MachineProtocol:
        p = MachineProtocol(self.server)
        p.factory = self
        return p


class EntryFactory(MachineFactory):
    """A listener whose connections start with a module-given wrapper of the
    table's start function (a module's :class:`~afpa.machine.modules.Listener`,
    e.g. the HTTP module's sibling check), on the same machine: same table,
    states and counters, only the first step differs."""

    def __init__(self, server: Server, listener: str, entry: Any):
        super().__init__(server)
        self.listener = listener
        self.entry = entry
        self._of: Any = None
        self._view: Any = None

    def view(self, machine: tables.Machine) -> tables.Machine:
        """``machine`` with its start function wrapped (made once per machine,
        so a reload's new machine gets its own)."""
        if self._of is not machine:
            start = machine.start
            wrapped = tables.CompiledState(start.name, start.index, self.entry(start.fn), start.function,
                                           start.on)
            self._view, self._of = attrs.evolve(machine, start=wrapped), machine
        return self._view

    def buildProtocol(self, addr: Any) -> MachineProtocol:
        p = _EntryProtocol(self.server)
        p.factory = self
        return p


class _EntryProtocol(MachineProtocol):
    def connectionMade(self) -> None:
        super().connectionMade()
        conn = self.conn
        conn.listener = self.factory.listener
        conn.machine = self.factory.view(conn.machine)
        conn.state = conn.machine.start

    def _switch(self, machine: Any, g: Any) -> None:
        # A reload's machine, with this listener's start function wrapped as well.
        super()._switch(self.factory.view(machine), g)


class Server:
    """A configured afpa server (not yet listening until :meth:`start`)."""

    def __init__(self, settings: Settings, *, reactor: Any = None, registry: Registry | None = None,
                 helpers: Any = None, source: ConfigSource | None = None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.reactor = reactor
        self.settings = settings
        # How startup made ``settings``, so a reload re-reads them the same way
        # (None: a reload keeps the settings and re-reads tables and TLS files).
        self.source = source
        self.generation = 0  # configuration reloads committed
        self.registry = registry or default_registry()
        self.machine, companions = reload.load_machines(settings, self.registry)
        self.runtime = Runtime(
            reactor=reactor, settings=settings,
            cache=CacheStore(settings.cache_bytes, settings.max_object_bytes),
            helpers=helpers or Helpers(reactor, settings.helper_threads), machines=companions)
        self.g = self.machine.module.make_global(settings, self.runtime)
        # The module's message timeout and input bound (a reload renews them).
        self.limits = self.machine.module.limits(settings)
        self.admin_token = read_admin_token(settings)  # None: admin writes are refused
        if settings.admin_auth == "all" and self.admin_token is None:
            raise ValueError('admin_auth: "all" needs an admin token (admin_token_file, '
                             '--admin-token-file or $AFPA_ADMIN_TOKEN)')
        self.access_log: AccessLog | None = None
        self.access_format = self._access_format()
        if settings.access_log:
            if self.access_format is None:
                raise ValueError(f"protocol module {self.machine.module.name!r} writes no access log")
            self.access_log = AccessLog(settings.access_log, self.access_format.line)
        # Live traces (GET /trace, afpa trace): recorded for every request only
        # while someone listens, or while the access log prints the state path.
        self.trace_all = self.access_log is not None and self.access_format.traces
        self.trace_hub = TraceHub(on_change=lambda _active: self.trace_interest())
        self.connections: set[MachineProtocol] = set()
        # Datagram listeners (modules whose transports include "datagram").
        self.datagram_endpoints: list[DatagramEndpoint] = []
        self.connections_total = 0
        self.request_stats: dict[str, RequestStats] = {}
        self.ports: list[Any] = []
        self.admin_port: Any = None
        self.listeners: dict[tuple[str, tuple[str, int]], Any] = {}  # (kind, address) -> port
        self.listening = False
        self.tls_context: Any = None  # shared by the TLS listeners; a reload swaps its certificates
        self.tls_digest = reload.tls_digest(settings)
        self._admin_site: Any = None
        self.extra_ports: dict[Any, Listener] = {}  # the module's own listeners (Listener by port)
        self.stopped = False
        self.tls_ports: list[Any] = []
        # Every accepted connection until its transport is gone (connections drops
        # one as soon as it is closed, while its last bytes may still be queued).
        self.live: set[MachineProtocol] = set()
        self.draining = False
        self._drain_waiters: list[Deferred] = []
        self._drain_timer: Any = None
        self._stopped_ports: set[int] = set()
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = reactor

    def _access_format(self) -> Any:
        """The compiled access-log format (checked even with no access log, so a
        bad one is found at startup); None when the module writes no log."""
        try:
            return module_format(self.machine.module, self.settings.access_log_format)
        except FormatError as exc:
            raise SettingError("access_log_format", str(exc)) from None

    # -- tracing --------------------------------------------------------------

    def trace_interest(self) -> None:
        """Record every request while anyone listens to /trace or the access log prints the state path."""
        self.set_trace_all(self.trace_hub.active
                           or (self.access_log is not None and self.access_format.traces))

    def set_trace_all(self, on: bool) -> None:
        """Trace every request from now on (``on``), or only those that ask: switches
        the stepping loop of every open connection and of those accepted later."""
        if on == self.trace_all:
            return
        self.trace_all = on
        for proto in self.live:
            proto.trace_all = on
            if on:
                proto.step = proto.run_traced
            else:
                vars(proto).pop("step", None)  # back to the class's run
        for endpoint in self.datagram_endpoints:
            endpoint.trace_all = on

    def traced(self, conn: Any, req: Any, now: float) -> None:
        """A traced request finished: its event goes to the live subscribers."""
        hub = self.trace_hub
        if hub.subscribers:
            module = conn.machine.module
            fields = module.trace_fields(conn, req) if module.trace_fields is not None else None
            hub.publish(event(conn, req, conn.machine.name, now, fields))

    # -- lifecycle ------------------------------------------------------------

    def factory(self, tls: bool = False) -> ServerFactory:
        """A factory accepting connections into this server's machine."""
        f = MachineFactory(self)
        f.tls = tls
        return f

    def describe(self) -> list[str]:
        """One line per listener and route, for the startup log."""
        lines = []
        for port in self.ports:
            addr = port.getHost()
            if port in self.extra_ports:
                listener = self.extra_ports[port]
                lines.append(f"{listener.label or listener.kind} on http://{addr.host}:{addr.port}/")
            elif port is self.admin_port:
                if self.settings.admin_auth == "all":
                    writes = "every endpoint but /healthz needs the admin token"
                elif self.admin_token is not None:
                    writes = "/cache/*, /reload and /trace need the admin token"
                else:
                    writes = "writes and /trace refused: no admin token configured"
                lines.append(f"admin (live machine page, /metrics, /healthz, /tables/) on "
                             f"http://{addr.host}:{addr.port}/ ({writes})")
            elif getattr(addr, "type", "TCP") == "UDP":
                lines.append(f"listening on udp {addr.host}:{addr.port}")
            else:
                label = self.machine.module.listener_label(addr.host, addr.port, port in self.tls_ports)
                lines.append(f"listening on {label}")
        describe = self.machine.module.describe
        lines += describe(self.g) if describe is not None else []
        lines.append(f"table {self.machine.source}")
        lines.append(twisted_private.describe())
        return lines

    def start(self, sockets: list[tuple[str, int, int]] | None = None) -> None:
        """Listen on ``settings.listen`` (TLS there when certificates are given and
        no separate TLS address is), the TLS and admin addresses, and start the sweep.

        ``sockets``: listeners bound elsewhere (a worker gets its supervisor's),
        as ``(kind, fd, address family)`` with kind ``"http"`` or ``"https"``, in
        the order :func:`listener_plan` gives, or the kind of one of the module's
        own listeners (a worker's peer listener); they are adopted (the fd is
        duplicated, the caller closes its own) instead of binding anything."""
        s = self.settings
        own = {listener.kind: listener for listener in self.module_listeners()}
        if s.tls_certs:
            from afpa.net.tls import server_context_factory
            self.tls_context = server_context_factory(list(s.tls_certs), self.machine.module.alpn)
        if "datagram" in self.machine.module.transports:
            # First, so that once the stream listener accepts (what a caller waits
            # for) datagrams are received too.  Workers each bind the address
            # (SO_REUSEPORT): the kernel spreads datagrams over them.
            self.open_datagram_listener(tuple(s.listen), shared=sockets is not None)
        if sockets is not None:
            # Bound by a supervisor, which owns the addresses: ``listening`` stays
            # False, so a reload here never binds or closes one.
            for kind, fd, family in sockets:
                if kind not in ("http", "https"):
                    listener = own.pop(kind, None)
                    if listener is None:
                        raise ValueError(f"protocol module {self.machine.module.name!r} has no {kind} listener")
                    entry = EntryFactory(self, kind, listener.entry)
                    port = self.listening_on(twisted_private.adopt_stream_port(self.reactor, fd, family, entry),
                                             entry)
                    self.extra_ports[port] = listener
                    self.ports.append(port)
                    continue
                machine_factory = self.factory(tls=kind == "https")
                factory: Any = machine_factory
                if kind == "https":
                    from twisted.protocols.tls import TLSMemoryBIOFactory
                    factory = TLSMemoryBIOFactory(self.tls_context, False, factory)  # as listenSSL does
                    port = self.reactor.adoptStreamPort(fd, family, factory)
                else:
                    port = twisted_private.adopt_stream_port(self.reactor, fd, family, factory)
                self.ports.append(self.listening_on(port, machine_factory))
                if kind == "https":
                    self.tls_ports.append(self.ports[-1])
        else:
            self.listening = True
            for kind, addr in reload.wanted_listeners(s):
                self.add_listener((kind, addr), self.open_listener(kind, addr, tls=self.tls_context))
        for listener in own.values():  # not adopted: bound here
            host, port_number = listener.address
            entry = EntryFactory(self, listener.kind, listener.entry)
            port = self.listening_on(
                twisted_private.listen_tcp(self.reactor, port_number, entry, backlog=1024, interface=host), entry)
            self.extra_ports[port] = listener
            self.ports.append(port)
        self.runtime.helpers.start()
        self.start_sweep()

    def module_listeners(self) -> list[Listener]:
        """The listeners the module asks for besides the client ones (HTTP: siblings)."""
        hook = self.machine.module.listeners
        return list(hook(self.g)) if hook is not None else []

    def open_listener(self, kind: str, addr: tuple[str, int], tls: Any = None) -> Any:
        """Listen on ``addr``: ``http`` and ``https`` (with context factory ``tls``)
        into the machine, ``admin`` for the admin site."""
        host, port = addr
        if kind == "admin":
            if self._admin_site is None:
                from afpa.ops.admin import admin_site
                self._admin_site = admin_site(self)
            return self.reactor.listenTCP(port, self._admin_site, interface=host)
        factory = self.factory(tls=kind == "https")
        if kind == "https":
            return self.listening_on(
                self.reactor.listenSSL(port, factory, tls, backlog=1024, interface=host), factory)
        return self.listening_on(
            twisted_private.listen_tcp(self.reactor, port, factory, backlog=1024, interface=host), factory)

    def listening_on(self, port: Any, factory: MachineFactory) -> Any:
        """``port`` now accepts into ``factory``: give its socket TCP_NODELAY
        once, for every connection it accepts (twisted_private.nodelay_listener);
        returns ``port``."""
        if twisted_private.nodelay_listener(port):
            factory.nodelay_inherited = None  # the first connection checks it
        return port

    def open_datagram_listener(self, addr: tuple[str, int], shared: bool = False) -> Any:
        """Receive datagrams on ``addr`` (UDP, beside the stream listener on the
        same address): each one runs the machine once (:mod:`afpa.net.datagram`).
        ``shared``: several worker processes bind it (SO_REUSEPORT)."""
        host, port = addr
        endpoint = DatagramEndpoint(self)
        if shared:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((host, port))
                sock.setblocking(False)
                # adopted as a duplicate: this one closes when the block ends
                udp = self.reactor.adoptDatagramPort(sock.fileno(), family, endpoint, maxPacketSize=65535)
        else:
            udp = twisted_private.listen_udp(self.reactor, port, endpoint, host, 65535)
        self.datagram_endpoints.append(endpoint)
        self.ports.append(udp)
        return udp

    def add_listener(self, key: tuple[str, tuple[str, int]], port: Any) -> None:
        """Record a listening port opened by :meth:`open_listener`."""
        self.listeners[key] = port
        self.ports.append(port)
        if key[0] == "https":
            self.tls_ports.append(port)
        elif key[0] == "admin":
            self.admin_port = port

    def remove_listener(self, key: tuple[str, tuple[str, int]]) -> None:
        """Stop listening on one address (its open connections go on)."""
        port = self.listeners.pop(key)
        if id(port) not in self._stopped_ports:
            self._stopped_ports.add(id(port))
            port.stopListening()
        self.ports.remove(port)
        if port in self.tls_ports:
            self.tls_ports.remove(port)
        if port is self.admin_port:
            self.admin_port = None

    # -- reload ---------------------------------------------------------------

    def prepare_reload(self, settings: Settings | None = None) -> reload.Prepared | list[dict]:
        """Phase one of a reload (see :func:`afpa.reload.prepare`): the problems,
        or a generation to ``commit()`` or ``abort()``."""
        return reload.prepare(self, settings)

    def reload(self, settings: Settings | None = None) -> dict:
        """Re-read the configuration, tables and TLS files and swap them in:
        ``{"ok": true, "generation": n, "changed": [...]}``, or ``{"ok": false,
        "problems": [{"file", "line", "problem"}, ...]}`` with nothing changed."""
        return reload.reload(self, settings)

    def settings_changed(self, old: Settings) -> None:
        """A reload committed new settings: take the module's new limits and
        retime the sweep if its period changed."""
        self.limits = self.machine.module.limits(self.settings)
        if self._sweeper.running and self._sweeper.interval != self._sweep_interval():
            self._sweeper.stop()
            self.start_sweep()

    def start_sweep(self) -> None:
        """Run :meth:`sweep` periodically (often enough for the shortest timeout)."""
        self._sweeper.start(self._sweep_interval(), now=False)

    def _sweep_interval(self) -> float:
        s = self.settings
        shortest = min(s.idle_timeout, self.limits.message_timeout, s.send_timeout, s.tls_handshake_timeout)
        return min(1.0, max(0.05, shortest / 4))

    def stop(self) -> None:
        """Stop listening and sweeping; open connections are closed (idempotent)."""
        if self.stopped:
            return
        self.stopped = True
        if self._sweeper.running:
            self._sweeper.stop()
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._stop_listening(admin=True)
        for proto in list(self.connections):
            proto.transport.loseConnection()
        if self._drain_waiters:  # a drain cut short: what is left is cut now
            cut = len(self.live)
            self.live.clear()
            self._drain_done(cut)
        self.runtime.helpers.stop()
        if self.access_log is not None:
            self.access_log.close()

    def _stop_listening(self, admin: bool) -> None:
        for p in self.ports:
            if (admin or p is not self.admin_port) and id(p) not in self._stopped_ports:
                self._stopped_ports.add(id(p))
                p.stopListening()

    def drain(self, timeout: float) -> Deferred:
        """Shut down gracefully: stop accepting (the admin listener stays), close
        connections that are between requests at once, let every request in flight
        finish (its connection closes after it, announcing ``Connection: close``
        where the response head is not out yet), and cut whatever is left after
        ``timeout`` seconds.  Spliced (deferred) connections carry opaque traffic
        with no request boundary afpa can see, so they too run until they close
        or the deadline.

        The Deferred fires, once no client connection is left, with the number
        of connections cut at the deadline or by :meth:`stop` (0 when everything
        finished).  Calling it again while draining returns another Deferred for
        the same drain.  Only listeners still in ``self.ports`` are closed, so a
        caller handing a listener on to another server removes it from there first.
        """
        d: Deferred = Deferred()
        self._drain_waiters.append(d)
        if self.draining:
            self._drain_check()
            return d
        self.draining = True
        self._stop_listening(admin=False)
        self._drain_timer = self.reactor.callLater(timeout, self._drain_deadline)
        for proto in list(self.live):
            proto.drain()
        self._drain_check()
        return d

    def _drain_deadline(self) -> None:
        left = list(self.live)
        self.live.clear()
        for proto in left:
            # connectionLost follows and tidies up as for any lost client.
            proto.transport.abortConnection()
        self._drain_done(len(left))

    def _drain_check(self) -> None:
        if self.draining and not self.live:
            if self._drain_timer is not None and self._drain_timer.active():
                self._drain_timer.cancel()
            self._drain_done(0)

    def _drain_done(self, cut: int) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for d in waiters:
            d.callback(cut)

    def reopen_logs(self) -> bool:
        """Reopen the access log (after logrotate moved it); False if there is none."""
        if self.access_log is None:
            return False
        self.access_log.reopen()
        return True

    def machines(self) -> list[tables.Machine]:
        """Every machine whose counters are live: the client machine and its companions."""
        return [self.machine, *self.runtime.machines.values()]

    # -- bookkeeping called by the engine -------------------------------------

    def connection_opened(self, proto: MachineProtocol) -> None:
        """A connection was accepted."""
        self.connections.add(proto)
        self.live.add(proto)
        self.connections_total += 1
        if self.draining:  # accepted just before the listener closed
            proto.drain()

    def connection_closed(self, proto: MachineProtocol) -> None:
        """A connection closed (idempotent)."""
        self.connections.discard(proto)

    def connection_lost(self, proto: MachineProtocol) -> None:
        """A connection's transport is gone (after :meth:`connection_closed`)."""
        self.live.discard(proto)
        if self.draining:
            self._drain_check()

    def stats_for(self, machine: tables.Machine) -> RequestStats:
        """The request counters of a machine (by name, so they survive a reload)."""
        stats = self.request_stats.get(machine.name)
        if stats is None:
            stats = self.request_stats[machine.name] = RequestStats()
        return stats

    def sweep(self) -> None:
        """Deliver ``timeout`` to every connection whose deadline has passed (its
        machine's table says what that means: a 408, a closed idle connection, a
        backend that did not answer in time)."""
        now = self.reactor.seconds()
        if self.access_log is not None:
            self.access_log.flush()
        module_sweep = self.machine.module.sweep
        if module_sweep is not None:
            module_sweep(self.g, now)
        for proto in list(self.connections):
            conn = proto.conn
            if conn is not None and conn.deadline <= now:
                proto.timed_out()
