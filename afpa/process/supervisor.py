"""The supervisor of ``afpa serve --workers N``: it binds the client listeners,
starts N worker processes (:mod:`afpa.process.worker`) as its children, hands each the
listening sockets over its control channel (:mod:`afpa.process.control`), restarts a
worker that dies, and turns signals into orders to the workers.

Every worker accepts on the same sockets, so the kernel spreads connections
over them, and a worker that dies loses only the connections it had: the
listening sockets stay open in the supervisor and the others, and new
connections wait in the shared backlog for whichever worker accepts first.

The admin listener, if any, stays here (workers run none).  What runs on the
workers is asked through :meth:`Cluster.call`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from afpa.net import twisted_private
from afpa.process.clusterreload import ClusterReload
from afpa.config import Settings
from afpa.machine.modules import Peering, Registry
from afpa.process.control import Channel, ControlError

log = Logger(namespace="afpa.process.supervisor")

BACKOFF_FIRST = 0.5     # seconds before restarting a worker that died ...
BACKOFF_MAX = 30.0      # ... doubling up to this ...
BACKOFF_RESET = 60.0    # ... and back to the first after a worker stayed up this long
LISTEN_TIMEOUT = 60.0   # a new worker gets this long to start serving
STOP_GRACE = 10.0       # after "stop" (or a failed drain), then SIGKILL


@attrs.define(slots=True, eq=False)
class Slot:
    """One worker slot: the process now in it and its history."""

    index: int
    pid: int | None = None
    started: float | None = None        # unix time the current process started
    born: float = 0.0                   # the same on the reactor's clock (for the backoff)
    restarts: int = 0
    up: bool = False                    # serving (it adopted the listeners)
    delay: float = BACKOFF_FIRST        # the next restart's delay
    process: Any = None
    channel: Channel | None = None
    ended: Deferred | None = None       # fires when the current process has exited
    restart_call: Any = None

    def info(self) -> dict[str, Any]:
        """This slot as JSON-able data (``cluster.workers``)."""
        return {"index": self.index, "pid": self.pid, "started": self.started,
                "restarts": self.restarts, "up": self.up}


def bind_listeners(settings: Settings) -> list[tuple[str, socket.socket]]:
    """Bind every client listener the settings ask for (``server.listener_plan``):
    ``(kind, listening socket)``; OSError names what failed (``exc.address``)."""
    from afpa.server import listener_plan

    out: list[tuple[str, socket.socket]] = []
    try:
        for kind, (host, port) in listener_plan(settings):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            out.append((kind, sock))
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(1024)
            except OSError as exc:
                exc.address = f"{host}:{port}"  # type: ignore[attr-defined]
                raise
            sock.setblocking(False)
    except OSError:
        for _, sock in out:
            sock.close()
        raise
    return out


SIBLINGS_ENV = "AFPA_WORKER_SIBLINGS"  # the workers' peer addresses, from their supervisor


def bind_peer_listeners(n: int) -> list[socket.socket]:
    """One loopback listener per worker slot for the other workers' requests
    (the module's :class:`~afpa.machine.modules.Peering`)."""
    out = []
    for _ in range(n):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        sock.setblocking(False)
        out.append(sock)
    return out


def worker_settings(settings: Settings, index: int, count: int, environ: Any = os.environ,
                    registry: Registry | None = None) -> Settings:
    """The settings worker ``index`` of ``count`` runs: no admin listener (the
    supervisor has it), its share of the cache budget, and the other workers as
    its peers when its module peers (HTTP: siblings; addresses from the
    supervisor, in the environment)."""
    members = environ.get(SIBLINGS_ENV, "")
    peers: dict[str, Any] = {}
    if members:
        if registry is None:
            from afpa.net.intrinsics import default_registry
            registry = default_registry()
        module = registry.modules.get(settings.module)
        if module is not None and module.peering is not None:
            peers["module_settings"] = module.peering.join(module.own_settings(settings),
                                                           tuple(members.split(",")), index)
    return attrs.evolve(settings, worker_index=index, worker_count=count, workers=1, admin=None,
                        cache_bytes=max(1, settings.cache_bytes // count), **peers)


class _WorkerProcess(ProcessProtocol):
    def __init__(self, cluster: Cluster, slot: Slot):
        self.cluster = cluster
        self.slot = slot
        self.pid: int | None = None  # the transport forgets it once the process is reaped

    def makeConnection(self, transport: Any) -> None:
        self.pid = transport.pid
        super().makeConnection(transport)

    def processEnded(self, reason: Any) -> None:
        self.cluster._ended(self.slot, self.pid, reason)


class Cluster:
    """N worker processes serving on the supervisor's listeners.

    ``argv`` is the ``afpa`` command line the supervisor was started with (its
    workers get the same one, plus their slot).  ``sockets`` are
    :func:`bind_listeners`' listeners, handed to every worker.

    The workers are each other's siblings (routing/siblings.py): every cacheable
    URL has one owner worker that stores it, the others ask it, so the cache
    budget (split N ways) holds for the whole server and each object is held
    once.  ``sibling_sockets`` (one loopback listener per slot, bound here once
    so a restarted worker gets the same address) go to their slot's worker."""

    def __init__(self, settings: Settings, argv: list[str], sockets: list[tuple[str, socket.socket]],
                 reactor: Any, sibling_sockets: list[socket.socket] | None = None, peering: Peering | None = None):
        self.settings = settings
        self.argv = argv
        self.sockets = sockets
        self.sibling_sockets = sibling_sockets or []
        self.peering = peering  # how the module's workers peer (their listener's kind, the token's variable)
        self.sibling_token = secrets.token_hex(32)
        self.reactor = reactor
        self.slots = [Slot(i) for i in range(settings.workers)]
        self.stopping = False
        self.draining = False
        self._exit_hooks: list[Callable[[int], Any]] = []
        self._reaper = LoopingCall(self._reap)
        self._reaper.clock = reactor

    # -- the interface for the admin and the lead's wiring -----------------------

    @property
    def workers(self) -> list[Slot]:
        """Every slot (``index``, ``pid``, ``started``, ``restarts``, ``up``; ``info()`` as JSON)."""
        return list(self.slots)

    def add_exit_hook(self, fn: Callable[[int], Any]) -> None:
        """Call ``fn(index)`` whenever the worker in slot ``index`` exits (before a
        replacement can answer anything): the merged metrics retire its counters."""
        self._exit_hooks.append(fn)

    def call(self, op: str, args: dict | None = None, timeout: float = 10.0) -> Deferred:
        """Run ``op`` on every live worker (one whose control channel is open).

        Fires with one entry per such worker, in slot order: the op's result
        with ``"worker": index`` and ``"pid": pid`` added, or
        ``{"worker": index, "pid": pid, "error": "<one line>"}`` when the worker
        answered an error, did not answer within ``timeout`` seconds, or exited
        first.  Never fails and never hangs."""
        live = [s for s in self.slots if s.channel is not None and s.channel.open]
        calls = []
        for slot in live:
            pid = slot.pid

            def ok(result: Any, slot: Slot = slot, pid: Any = pid) -> dict:
                return {**result, "worker": slot.index, "pid": pid}

            def failed(f: Any, slot: Slot = slot, pid: Any = pid) -> dict:
                error = f.getErrorMessage() if f.check(ControlError) else repr(f.value)
                return {"worker": slot.index, "pid": pid, "error": error}

            calls.append(slot.channel.request(op, args or {}, timeout).addCallbacks(ok, failed))
        if not calls:
            return succeed([])
        return DeferredList(calls).addCallback(lambda results: [r for _, r in results])

    # -- starting and restarting ------------------------------------------------

    def start(self) -> None:
        """Start every worker (and a periodic reaper, in case a SIGCHLD is missed)."""
        for slot in self.slots:
            self._spawn(slot)
        self._reaper.start(1.0, now=False)

    def _reap(self) -> None:
        from twisted.internet import process

        process.reapAllProcesses()

    def _spawn(self, slot: Slot) -> None:
        slot.restart_call = None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-m", "afpa", *self.argv, "--worker-slot", f"{slot.index}/{len(self.slots)}"]
        env = dict(os.environ)
        # The workers import this same afpa, wherever the supervisor found it.
        here = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if self.sibling_sockets:  # never on a command line: see worker_settings
            env[SIBLINGS_ENV] = ",".join("%s:%d" % s.getsockname()[:2] for s in self.sibling_sockets)
            env[self.peering.token_env] = self.sibling_token
        # The worker shares our standard input, output (access_log = "-") and error.
        fds: dict[int, Any] = {fd: fd for fd in (0, 1, 2) if _is_open(fd)}
        fds[3] = child.fileno()
        try:
            slot.process = self.reactor.spawnProcess(
                _WorkerProcess(self, slot), sys.executable, argv, env=env, childFDs=fds)
        except OSError as exc:
            parent.close()
            log.error("worker {i}: cannot start: {exc}", i=slot.index, exc=exc)
            self._schedule_restart(slot, 0.0)
            return
        finally:
            child.close()
        slot.pid = slot.process.pid
        slot.started = time.time()
        slot.born = self.reactor.seconds()
        slot.up = False
        slot.ended = Deferred()
        channel = slot.channel = Channel({}, self.reactor)
        factory = Factory()
        factory.buildProtocol = lambda addr: channel  # type: ignore[method-assign]
        self.reactor.adoptStreamConnection(parent.fileno(), socket.AF_UNIX, factory)
        parent.close()  # adopted as a duplicate
        socks = list(self.sockets)
        if self.sibling_sockets:
            socks.append((self.peering.listener, self.sibling_sockets[slot.index]))
        listeners = [{"kind": kind, "family": int(sock.family)} for kind, sock in socks]
        d = channel.request("listen", {"listeners": listeners}, LISTEN_TIMEOUT,
                            fds=[sock.fileno() for _, sock in socks])
        pid = slot.pid

        def up(_: Any) -> None:
            if slot.pid == pid:
                slot.up = True
                log.info("worker {i} (pid {pid}) serving", i=slot.index, pid=pid)
                self._sibling_state(slot.index, True)

        def failed(f: Any) -> None:
            if slot.pid == pid and slot.ended is not None and not slot.ended.called and not self.stopping:
                log.error("worker {i} (pid {pid}) did not start serving: {why}",
                          i=slot.index, pid=pid, why=f.getErrorMessage())
                self._signal(slot, signal.SIGKILL)

        d.addCallbacks(up, failed)

    def _ended(self, slot: Slot, pid: int | None, reason: Any) -> None:
        if pid is not None and slot.pid != pid:
            return
        uptime = self.reactor.seconds() - slot.born
        slot.up = False
        slot.process = None
        if slot.channel is not None and slot.channel.open:
            slot.channel.transport.loseConnection()
        slot.channel = None
        how = _how_it_ended(reason)
        for hook in self._exit_hooks:
            hook(slot.index)
        self._sibling_state(slot.index, False)
        ended, slot.ended = slot.ended, None
        if self.stopping:
            log.info("worker {i} (pid {pid}) {how}", i=slot.index, pid=pid, how=how)
        else:
            if uptime >= BACKOFF_RESET:
                slot.delay = BACKOFF_FIRST
            delay = slot.delay
            slot.delay = min(slot.delay * 2, BACKOFF_MAX)
            log.warn("worker {i} (pid {pid}) {how}; restarting in {d:g} s",
                     i=slot.index, pid=pid, how=how, d=delay)
            self._schedule_restart(slot, delay)
        if ended is not None:
            ended.callback(None)

    def _sibling_state(self, index: int, up: bool) -> None:
        """Tell the other workers that worker ``index`` is gone (they serve its URLs
        themselves, without waiting on its listener's backlog) or back."""
        if self.sibling_sockets and not self.stopping:
            self.call("peer", {"index": index, "up": up}, 5.0)

    def _schedule_restart(self, slot: Slot, delay: float) -> None:
        def restart() -> None:
            slot.restarts += 1
            self._spawn(slot)
        slot.restart_call = self.reactor.callLater(delay, restart)

    def _signal(self, slot: Slot, signum: int) -> None:
        if slot.process is not None and slot.pid is not None:
            try:
                os.kill(slot.pid, signum)
            except ProcessLookupError:
                pass

    # -- stopping ---------------------------------------------------------------

    def drain_and_stop(self, timeout: float) -> Deferred:
        """Stop every worker gracefully: close the supervisor's own copies of the
        listeners (so, once the workers close theirs, connections are refused),
        drain every worker for up to ``timeout`` seconds, tell each to stop,
        SIGKILL whatever is still running :data:`STOP_GRACE` seconds later.
        Fires with the number of connections cut at the deadline."""
        self.stopping = self.draining = True
        self._close_listeners()
        for slot in self.slots:
            if slot.restart_call is not None and slot.restart_call.active():
                slot.restart_call.cancel()
            if not slot.up:  # still starting: it serves nobody yet
                self._signal(slot, signal.SIGKILL)
        cut = 0

        def drained(replies: list[dict]) -> Deferred:
            nonlocal cut
            cut = sum(r.get("cut", 0) for r in replies if "error" not in r)
            return self.call("stop", {}, STOP_GRACE)

        d = self.call("drain", {"timeout": timeout}, timeout + STOP_GRACE)
        d.addCallback(drained)
        d.addCallback(lambda _: self._wait_all_ended(STOP_GRACE))
        d.addCallback(lambda _: cut)
        return d

    def kill(self) -> None:
        """SIGKILL every worker (a second SIGTERM: stop at once)."""
        self.stopping = True
        self._close_listeners()
        for slot in self.slots:
            if slot.restart_call is not None and slot.restart_call.active():
                slot.restart_call.cancel()
            self._signal(slot, signal.SIGKILL)

    def restart(self, index: int) -> None:
        """Replace the worker in slot ``index``: it drains and exits (SIGTERM), and
        its slot is restarted as after any exit."""
        self._signal(self.slots[index], signal.SIGTERM)

    def _wait_all_ended(self, grace: float) -> Deferred:
        waits = [s.ended for s in self.slots if s.ended is not None and not s.ended.called]
        if not waits:
            return succeed(None)
        timer = self.reactor.callLater(grace, self.kill)
        d = DeferredList(waits)

        def done(_: Any) -> None:
            if timer.active():
                timer.cancel()
        return d.addCallback(done)

    def _close_listeners(self) -> None:
        for _, sock in self.sockets:
            sock.close()
        for sock in self.sibling_sockets:
            sock.close()

    def stop(self) -> None:
        """On reactor shutdown: no restarts, no reaper, listeners closed."""
        self.stopping = True
        if self._reaper.running:
            self._reaper.stop()
        for slot in self.slots:
            if slot.restart_call is not None and slot.restart_call.active():
                slot.restart_call.cancel()
        self._close_listeners()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _how_it_ended(reason: Any) -> str:
    value = getattr(reason, "value", reason)
    if isinstance(value, ProcessDone):
        return "exited with status 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = f"signal {value.signal}"
            return f"was killed by {name}"
        return f"exited with status {value.exitCode}"
    return f"ended ({value})"


# -- the supervisor's admin ------------------------------------------------------

def admin_site(cluster: Cluster, server: Any, reloader: Any) -> Any:
    """The supervisor's admin web site: the same endpoints as one server's, over
    every worker (:func:`afpa.process.clusteradmin.supervisor_admin_site`: merged
    ``/metrics``, the live page's counts added up, ``/cache/*`` fanned out), plus
    ``/workers``, the worker processes as JSON, ``GET /trace`` over every worker
    (:mod:`afpa.ops.clustertrace`), and ``POST /reload`` through ``reloader`` (:class:`afpa.process.clusterreload.ClusterReload`).  ``server`` is the
    supervisor's never-started Server, whose tables ``/tables/`` shows."""
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET

    from afpa.process.clusteradmin import supervisor_admin_site
    from afpa.ops.clustertrace import ClusterTraces

    class Workers(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> Any:
            def answer(replies: list[dict]) -> None:
                live = {r["worker"]: r for r in replies}
                out = []
                for slot in cluster.workers:
                    info = slot.info()
                    r = live.get(slot.index)
                    if r is not None and "error" not in r and r["pid"] == info["pid"]:
                        info.update({k: r[k] for k in ("connections", "connections_total", "draining") if k in r})
                    elif r is not None and "error" in r:
                        info["error"] = r["error"]
                    out.append(info)
                request.setHeader(b"content-type", b"application/json")
                request.setHeader(b"cache-control", b"no-store")
                request.write(json.dumps({"workers": out}, separators=(", ", ": ")).encode() + b"\n")
                request.finish()

            cluster.call("ping", {}, 5.0).addCallback(answer)
            return NOT_DONE_YET

    site = supervisor_admin_site(cluster, server.settings, machines=server.machines,  # current after a reload
                                 draining=lambda: cluster.draining, reloader=reloader,
                                 trace_hub=ClusterTraces(cluster, cluster.reactor).hub)
    site.resource.putChild(b"workers", Workers())
    return site


# -- the supervisor process --------------------------------------------------------

class _Shutdown:
    """SIGTERM/SIGINT: the first drains every worker, a second kills them."""

    def __init__(self, reactor: Any, cluster: Cluster):
        self.reactor = reactor
        self.cluster = cluster
        self.requested = False
        self.forced = False

    def signal(self, signame: str) -> None:
        if self.requested:
            if not self.forced:
                self.forced = True
                log.warn("{signal} again: killing the workers, stopping now", signal=signame)
                self.cluster.kill()
                self._stop()
            return
        self.requested = True
        timeout = self.cluster.settings.drain_timeout
        log.info("{signal}: draining {n} worker(s) (up to {t:g} s; a second signal stops at once)",
                 signal=signame, n=sum(1 for s in self.cluster.slots if s.process is not None), t=timeout)
        self.cluster.drain_and_stop(timeout).addCallback(self._drained)

    def _drained(self, cut: int) -> None:
        if self.forced:
            return
        if cut:
            log.warn("drain timeout: cut {n} connection(s) still open; stopping", n=cut)
        else:
            log.info("drained: every worker finished; stopping")
        self._stop()

    def _stop(self) -> None:
        from twisted.internet.error import ReactorNotRunning

        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass


def serve(settings: Settings, argv: list[str], reactor: Any, server: Any) -> int:
    """Run as the supervisor of ``settings.workers`` workers until told to stop.

    ``server`` is a Server built from the same settings and never started: it
    proved the settings, tables and files valid, and describes them.  Prints a
    one-line error and returns 1 when a listener cannot be bound."""
    from twisted.internet import process

    module = server.machine.module
    peering = module.peering
    own_peers = peering.configured(module.own_settings(settings)) if peering is not None else None
    if own_peers:
        print(f"afpa: {own_peers}", file=sys.stderr)
        return 1
    if server.access_log is not None:
        server.access_log.close()  # the workers write it
    if settings.tls_certs:
        from afpa.net.tls import server_context_factory
        server_context_factory(list(settings.tls_certs), module.alpn)  # every TLS file checked before any worker starts
    try:
        sockets = bind_listeners(settings)
    except OSError as exc:
        print(f"afpa: cannot listen on {getattr(exc, 'address', '?')}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    cluster = Cluster(settings, argv, sockets, reactor,
                      bind_peer_listeners(settings.workers) if peering is not None else None, peering)
    reloader = ClusterReload(cluster, server)
    admin_port = None
    if settings.admin is not None:
        from twisted.internet.error import CannotListenError

        ahost, aport = settings.admin
        try:
            admin_port = reactor.listenTCP(aport, admin_site(cluster, server, reloader), interface=ahost)
        except CannotListenError as exc:
            cluster.stop()
            print(f"afpa: cannot listen on {exc.interface}:{exc.port}: {exc.socketError}", file=sys.stderr)
            return 1
    for kind, sock in sockets:
        host, port = sock.getsockname()[:2]
        module = server.machine.module
        if "datagram" in module.transports and kind != "https":
            # Each worker binds the UDP address itself (SO_REUSEPORT spreads datagrams).
            print(f"afpa: listening on udp {_bracket(host)}:{port} ({settings.workers} workers)",
                  file=sys.stderr, flush=True)
        label = module.listener_label(_bracket(host), port, kind == "https")
        print(f"afpa: listening on {label} ({settings.workers} workers)",
              file=sys.stderr, flush=True)
    if admin_port is not None:
        addr = admin_port.getHost()
        print(f"afpa: admin (live page, /metrics, /healthz, /tables/, /workers) on "
              f"http://{addr.host}:{addr.port}/ for all workers", file=sys.stderr, flush=True)
    for line in (module.describe(server.g) if module.describe is not None else []):
        print(f"afpa: {line}", file=sys.stderr, flush=True)
    print(f"afpa: table {server.machine.source}", file=sys.stderr, flush=True)
    print(f"afpa: {twisted_private.describe()}", file=sys.stderr, flush=True)

    shutdown = _Shutdown(reactor, cluster)
    for signum in (signal.SIGTERM, signal.SIGINT):
        name = signal.Signals(signum).name
        signal.signal(signum, lambda _n, _f, name=name: reactor.callFromThread(shutdown.signal, name))

    def hangup() -> None:
        # Reload every worker or none, then have each reopen its access log.
        d = reloader.reload()
        d.addBoth(lambda _: cluster.call("reopen_logs", {}, 10.0))
        d.addErrback(lambda f: log.failure("SIGHUP: reload failed", f))

    signal.signal(signal.SIGHUP, lambda _n, _f: reactor.callFromThread(hangup))
    # Twisted reaps children on SIGCHLD only with its own signal handlers, which
    # would stop the reactor on the first SIGTERM; reap from ours instead.
    signal.signal(signal.SIGCHLD, lambda _n, _f: reactor.callFromThread(process.reapAllProcesses))
    reactor.addSystemEventTrigger("before", "shutdown", cluster.stop)
    reactor.callWhenRunning(cluster.start)
    reactor.run(installSignalHandlers=False)
    return 0


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
