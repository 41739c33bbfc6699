"""The server: one module instance, its machine, its listeners and its sweep.

:class:`Server` ties the runtime together: it loads and compiles the table (a
table that fails validation never runs), builds the cache, helper threads and the
module's global scope, accepts connections with :class:`~afpa.engine.MachineProtocol`
and runs a once-a-second sweep that enforces the idle, header and send timeouts
(one timer for all connections instead of a timer per request).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from afpa import tables
from afpa.accesslog import AccessLog, FormatError, compile_format
from afpa.cache import CacheStore
from afpa.config import SettingError, Settings, read_admin_token
from afpa.engine import MachineProtocol
from afpa.helpers import Helpers
from afpa.intrinsics import default_registry
from afpa.metrics import RequestStats
from afpa.modules import Registry
from afpa.scopes import Runtime
from afpa.trace import TraceHub, event
from afpa.trust import TrustedProxies

log = Logger(namespace="afpa.server")


class MachineFactory(ServerFactory):
    noisy = False
    tls = False

    def __init__(self, server: Server):
        self.server = server

    def buildProtocol(self, addr: Any) -> MachineProtocol:
        p = MachineProtocol(self.server)
        p.factory = self
        return p


class Server:
    """A configured afpa server (not yet listening until :meth:`start`)."""

    def __init__(self, settings: Settings, *, reactor: Any = None, registry: Registry | None = None,
                 helpers: Any = None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.reactor = reactor
        self.settings = settings
        self.registry = registry or default_registry()
        path = settings.table
        if path is None:
            module = self.registry.modules.get(settings.module)
            if module is None:
                raise tables.TableError([tables.Problem(
                    "<settings>", None, "module", f"no protocol module named {settings.module!r} is installed")])
            path = str(tables.shipped_table_path(module.table))
        self.machine = tables.load(path, self.registry)
        companions = {}
        for name in self.machine.module.companions:
            companion = settings.companion_tables.get(name) or str(tables.shipped_table_path(name))
            companions[name] = tables.load(companion, self.registry)
        self.runtime = Runtime(
            reactor=reactor, settings=settings,
            cache=CacheStore(settings.cache_bytes, settings.max_object_bytes),
            helpers=helpers or Helpers(reactor, settings.helper_threads), machines=companions,
            trusted_proxies=TrustedProxies(settings.trusted_proxies))
        self.g = self.machine.module.make_global(settings, self.runtime)
        self.admin_token = read_admin_token(settings)  # None: admin writes are refused
        self.access_log: AccessLog | None = None
        self.access_format = self._access_format()
        if settings.access_log:
            if self.access_format is None:
                raise ValueError(f"protocol module {self.machine.module.name!r} writes no access log")
            self.access_log = AccessLog(settings.access_log, self.access_format.line)
        # Live traces (GET /trace, afpa trace): recorded for every request only
        # while someone listens, or while the access log prints the state path.
        self.trace_all = self.access_log is not None and self.access_format.traces
        self.trace_hub = TraceHub(on_change=lambda _active: self._trace_interest())
        self.connections: set[MachineProtocol] = set()
        self.connections_total = 0
        self.request_stats: dict[str, RequestStats] = {}
        self.ports: list[Any] = []
        self.admin_port: Any = None
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
        module = self.machine.module
        text = self.settings.access_log_format
        if module.access_field is None:
            if text is not None:
                raise ValueError(f"access_log_format: protocol module {module.name!r} writes no access log")
            return None
        try:
            return compile_format(text if text is not None else module.access_format, module.access_field)
        except FormatError as exc:
            raise SettingError("access_log_format", str(exc)) from None

    # -- tracing --------------------------------------------------------------

    def _trace_interest(self) -> None:
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
            proto.step = proto.run_traced if on else proto.run

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
            if port is self.admin_port:
                writes = ("/cache/* writes and /trace need the admin token" if self.admin_token is not None
                          else "writes and /trace refused: no admin token configured")
                lines.append(f"admin (/metrics, /healthz, /tables/) on http://{addr.host}:{addr.port}/ ({writes})")
            else:
                scheme = "https" if port in self.tls_ports else "http"
                lines.append(f"listening on {scheme}://{addr.host}:{addr.port}/")
        lines += self.g.describe() if hasattr(self.g, "describe") else []
        lines.append(f"table {self.machine.source}")
        return lines

    def start(self) -> None:
        """Listen on ``settings.listen`` (TLS there when certificates are given and
        no separate TLS address is), the TLS and admin addresses, and start the sweep."""
        s = self.settings
        tls_context = None
        if s.tls_certs:
            from afpa.tls import server_context_factory
            tls_context = server_context_factory(list(s.tls_certs))
        host, port = s.listen
        if tls_context is not None and s.tls_listen is None:
            self.ports.append(self.reactor.listenSSL(port, self.factory(tls=True), tls_context,
                                                     backlog=1024, interface=host))
            self.tls_ports.append(self.ports[-1])
        else:
            self.ports.append(self.reactor.listenTCP(port, self.factory(), backlog=1024, interface=host))
        if tls_context is not None and s.tls_listen is not None:
            thost, tport = s.tls_listen
            self.ports.append(self.reactor.listenSSL(tport, self.factory(tls=True), tls_context,
                                                     backlog=1024, interface=thost))
            self.tls_ports.append(self.ports[-1])
        if self.settings.admin is not None:
            from afpa.admin import admin_site
            ahost, aport = self.settings.admin
            self.admin_port = self.reactor.listenTCP(aport, admin_site(self), interface=ahost)
            self.ports.append(self.admin_port)
        self.runtime.helpers.start()
        self.start_sweep()

    def start_sweep(self) -> None:
        """Run :meth:`sweep` periodically (often enough for the shortest timeout)."""
        s = self.settings
        shortest = min(s.idle_timeout, s.header_timeout, s.send_timeout, s.tls_handshake_timeout)
        interval = min(1.0, max(0.05, shortest / 4))
        self._sweeper.start(interval, now=False)

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
        """Close connections whose deadline has passed (idle, slow head, stalled send)."""
        now = self.reactor.seconds()
        if self.access_log is not None:
            self.access_log.flush()
        module_sweep = getattr(self.g, "sweep", None)
        if module_sweep is not None:
            module_sweep(now)
        for proto in list(self.connections):
            conn = proto.conn
            if conn is not None and conn.deadline <= now:
                proto.timed_out(conn.deadline_kind)
