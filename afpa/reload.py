"""Configuration reload without a restart, and ``afpa check``.

A reload has two phases so that several processes can agree on it:

- :func:`prepare` re-reads the configuration exactly as startup did (the same
  config file and command-line overrides, through the server's
  :class:`ConfigSource`), then loads and validates every table, the routes, the
  TLS certificates and keys, the admin token and the access log, builds the
  module's new global scope and binds any new listen address (paused), without
  touching what is serving.  It returns the problems found (a list of
  ``{"file", "line", "problem"}``) or a :class:`Prepared` generation.
- :meth:`Prepared.commit` swaps, in one reactor turn: new connections, and open
  connections at their next request boundary, run the new machine with the new
  global scope and settings; a request in flight finishes on the machine it
  started on.  The cache, backend pools (``ProtocolModule.carry_over``), request
  statistics and per-state counters carry over.  :meth:`Prepared.abort` undoes
  what prepare opened.

:func:`check` is the validation half alone (``afpa check``): the same
:func:`build` that prepare runs, with a scratch runtime and no listener.
"""

from __future__ import annotations

import hashlib
import re
import threading
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
from twisted.logger import Logger

from afpa import config

from afpa.machine import tables
from afpa.ops.accesslog import AccessLog, FormatError, module_format
from afpa.cache.store import CacheStore
from afpa.config import Settings
from afpa.machine.modules import Registry
from afpa.machine.scopes import Runtime

log = Logger(namespace="afpa.reload")

ProblemDict = dict[str, Any]  # {"file": str | None, "line": int | None, "problem": str}


@attrs.frozen
class ConfigSource:
    """How startup made its settings, so a reload can make them again: ``load``
    returns fresh :class:`Settings` (or raises ValueError with a one-line
    ``<file>: <key>: <problem>`` or ``--flag: <problem>``); ``path`` is the
    config file it reads (None: command-line options only)."""

    path: str | None
    load: Callable[[], Settings]


# -- problems -----------------------------------------------------------------

def problem(file: str | None, line: int | None, text: str) -> ProblemDict:
    """One problem as JSON-able data."""
    return {"file": file, "line": line, "problem": text}


def format_problem(p: ProblemDict) -> str:
    """``file:line: problem`` (or ``file: problem``, or the problem alone)."""
    if p.get("file") and p.get("line"):
        return f"{p['file']}:{p['line']}: {p['problem']}"
    if p.get("file"):
        return f"{p['file']}: {p['problem']}"
    return str(p["problem"])


def _table_problem(p: tables.Problem) -> ProblemDict:
    text = str(p)
    where = p.file if p.line is None else f"{p.file}:{p.line}"
    if text.startswith(where + ": "):
        text = text[len(where) + 2:]
    return problem(p.file, p.line, text)


def config_problem(message: str, config_path: str | None) -> ProblemDict:
    """A one-line configuration error (as ``settings_from_args``, ``load_config``
    and route building raise them) placed at the config file and, where the key
    can be found in it, its line."""
    if config_path and message.startswith(config_path + ": "):
        rest = message[len(config_path) + 2:]
        return problem(config_path, _locate(config_path, rest), rest)
    m = re.match(r"(route \d+|root|[a-z_]+(?:\.[a-z_]+)*): ", message)
    if config_path and m and not message.startswith("--"):
        key = m.group(1)
        line = _locate(config_path, message)
        if line is not None or key.startswith("route "):
            return problem(config_path, line, message)
    return problem(None, None, message)


def _locate(path: str, rest: str) -> int | None:
    """The line of the config file ``rest`` (a message) is about, if found."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    m = re.search(r"at line (\d+)", rest)  # tomllib's own position
    if m and rest.startswith("not valid TOML"):
        return int(m.group(1))
    m = re.match(r"(route|tls\.certificate) (\d+)\b", rest)
    if m:
        return _nth_header(text, "route" if m.group(1) == "route" else "tls.certificate", int(m.group(2)))
    m = re.match(r"unknown key '([^']+)'", rest)
    key = m.group(1) if m else rest.split(":", 1)[0].strip()
    if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key):
        return None
    return _key_line(text, key)


def _nth_header(text: str, name: str, n: int) -> int | None:
    seen = 0
    for i, line in enumerate(text.splitlines(), 1):
        if re.fullmatch(r"\s*\[\[\s*" + re.escape(name) + r"\s*\]\]\s*(#.*)?", line):
            seen += 1
            if seen == n:
                return i
    return None


def _key_line(text: str, dotted: str) -> int | None:
    section = ""
    for i, line in enumerate(text.splitlines(), 1):
        bare = line.split("#", 1)[0].strip()
        h = re.fullmatch(r"\[\[?\s*([^\]]+?)\s*\]\]?", bare)
        if h:
            section = h.group(1)
            if section == dotted:
                return i
            continue
        k = re.match(r"([A-Za-z0-9_.\"-]+)\s*=", bare)
        if k:
            name = k.group(1).replace('"', "")
            full = f"{section}.{name}" if section else name
            if full == dotted:
                return i
    return None


# -- building a generation ------------------------------------------------------

@attrs.define(slots=True, eq=False)
class Generation:
    """Everything one configuration builds before it serves."""

    settings: Settings
    machine: tables.Machine
    companions: dict[str, tables.Machine]
    runtime: Runtime
    g: Any
    tls: Any                  # afpa.net.tls context factory, None without certificates
    tls_digest: str           # of the certificate and key files, to tell a renewal
    admin_token: bytes | None
    access_format: Any = None  # afpa.ops.accesslog.LineFormat (None: the module writes no log)


def wanted_listeners(s: Settings) -> list[tuple[str, tuple[str, int]]]:
    """``(kind, (host, port))`` of every listener the settings ask for, kind
    ``http``, ``https`` or ``admin``, in the order startup opens them."""
    out: list[tuple[str, tuple[str, int]]] = []
    tls = bool(s.tls_certs)
    out.append(("https" if tls and s.tls_listen is None else "http", tuple(s.listen)))  # type: ignore[arg-type]
    if tls and s.tls_listen is not None:
        out.append(("https", tuple(s.tls_listen)))  # type: ignore[arg-type]
    if s.admin is not None:
        out.append(("admin", tuple(s.admin)))  # type: ignore[arg-type]
    return out


def tls_digest(s: Settings) -> str:
    """A digest of the certificate and key files' contents ("" without TLS or
    when a file cannot be read; the build reports that)."""
    h = hashlib.sha256()
    for c in s.tls_certs:
        for path in (c.cert, c.key):
            try:
                h.update(Path(path).read_bytes())
            except OSError:
                return ""
    return h.hexdigest() if s.tls_certs else ""


def _table_path(settings: Settings, registry: Registry) -> str:
    module = registry.modules.get(settings.module)
    if settings.table is not None:
        return settings.table
    if module is None:
        raise tables.TableError([tables.Problem(
            "<settings>", None, "module", f"no protocol module named {settings.module!r} is installed")])
    return str(tables.module_table_path(module, module.table))


def _load_table(path: str, registry: Registry, reuse: Iterable[tables.Machine]) -> tables.Machine:
    """Load a table; a running machine compiled from the same file and text is
    reused as it is (its counters go on, connections on it need not move)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise tables.TableError([tables.Problem(str(path), None, None, f"cannot read: {exc}")]) from exc
    for m in reuse:
        if m.source == str(path) and m.text == text:
            return m
    return tables.load_text(text, str(path), registry)


def load_machines(settings: Settings, registry: Registry,
                  reuse: Iterable[tables.Machine] = ()) -> tuple[tables.Machine, dict[str, tables.Machine]]:
    """The client machine and its companions; raises :class:`tables.TableError`
    listing every problem of every table."""
    reuse = list(reuse)
    machine = _load_table(_table_path(settings, registry), registry, reuse)
    companions: dict[str, tables.Machine] = {}
    problems: list[tables.Problem] = []
    for name in machine.module.companions:
        path = settings.companion_tables.get(name) or str(tables.module_table_path(machine.module, name))
        try:
            companions[name] = _load_table(path, registry, reuse)
        except tables.TableError as exc:
            problems += exc.problems
    if problems:
        raise tables.TableError(problems)
    return machine, companions


def _access_log_problem(path: str | None) -> str | None:
    import os

    if not path or path == "-":
        return None
    p = Path(path)
    if p.is_dir():
        return "access log: is a directory"
    if p.exists():
        return None if os.access(p, os.W_OK) else "access log: cannot open: Permission denied"
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return "access log: cannot open: No such file or directory"
    return None if os.access(parent, os.W_OK | os.X_OK) else "access log: cannot open: Permission denied"


def build(settings: Settings, registry: Registry, make_runtime: Callable[[Settings, dict], Runtime], *,
          config_path: str | None = None, reuse: Iterable[tables.Machine] = ()
          ) -> tuple[Generation | None, list[ProblemDict]]:
    """Load and validate everything ``settings`` name and build the module's
    global scope; every problem found is reported, not just the first."""
    problems: list[ProblemDict] = []
    machine = None
    companions: dict[str, tables.Machine] = {}
    try:
        machine, companions = load_machines(settings, registry, reuse)
    except tables.TableError as exc:
        problems += [_table_problem(p) for p in exc.problems]
    module = machine.module if machine is not None else registry.modules.get(settings.module)
    tls = None
    if settings.tls_certs:
        from afpa.net.tls import server_context_factory
        try:
            tls = server_context_factory(list(settings.tls_certs), module.alpn if module is not None else ())
        except ValueError as exc:
            files = [f for c in settings.tls_certs for f in (c.cert, c.key)]
            problems.append(_file_problem(str(exc), files))
    admin_token = None
    try:
        admin_token = config.read_admin_token(settings)
    except ValueError as exc:
        problems.append(_file_problem(str(exc), [settings.admin_token_file or ""]))
    bad_log = _access_log_problem(settings.access_log)
    if bad_log:
        problems.append(problem(settings.access_log, None, bad_log))
    g = runtime = access_format = None
    # Routes are checked even when a table is broken: every problem at once.
    if module is not None:
        try:
            access_format = module_format(module, settings.access_log_format)
        except FormatError as exc:
            problems.append(config_problem(f"access_log_format: {exc}", config_path))
        else:
            if settings.access_log and access_format is None:
                problems.append(config_problem(f"access_log: protocol module {module.name!r} writes no access log",
                                               config_path))
        runtime = make_runtime(settings, companions)
        try:
            g = module.make_global(settings, runtime)
        except ValueError as exc:
            problems.append(config_problem(str(exc), config_path))
    if problems or machine is None:
        return None, problems
    return Generation(settings, machine, companions, runtime, g, tls, tls_digest(settings), admin_token,
                      access_format), []


def _file_problem(message: str, files: list[str]) -> ProblemDict:
    for f in files:
        if f and message.startswith(f + ": "):
            return problem(f, None, message[len(f) + 2:])
    return problem(None, None, message)


def check(load: Callable[[], Settings], registry: Registry, config_path: str | None = None) -> list[ProblemDict]:
    """``afpa check``: every problem the configuration has (empty: it would
    start), without serving or binding anything.  ``load`` makes the settings as
    ``afpa serve`` would."""
    try:
        settings = load()
    except ValueError as exc:
        return [config_problem(str(exc), config_path)]

    def scratch(s: Settings, companions: dict) -> Runtime:
        return Runtime(reactor=None, settings=s, cache=CacheStore(s.cache_bytes, s.max_object_bytes),
                       helpers=None, machines=companions)

    _, problems = build(settings, registry, scratch, config_path=config_path)
    return problems


# -- reload -------------------------------------------------------------------

def prepare(server: Any, settings: Settings | None = None) -> Prepared | list[ProblemDict]:
    """Phase one of a reload of ``server``: re-read and validate everything and
    bind new listen addresses (paused), changing nothing that serves.  Returns
    the problems, or a :class:`Prepared` to :meth:`~Prepared.commit` or
    :meth:`~Prepared.abort`.  ``settings`` replaces re-reading (tests)."""
    source: ConfigSource | None = server.source
    path = source.path if source is not None else None
    if settings is None:
        try:
            settings = source.load() if source is not None else server.settings
        except ValueError as exc:
            return [config_problem(str(exc), path)]
    old = server.settings
    if server.draining or server.stopped:
        return [problem(None, None, "the server is shutting down; nothing to reload")]
    if settings.module != old.module:
        return [config_problem(f"module: changing the protocol module needs a restart "
                               f"({old.module!r} -> {settings.module!r})", path)]
    cache, helpers = server.runtime.cache, server.runtime.helpers

    def live_runtime(s: Settings, companions: dict) -> Runtime:
        return Runtime(reactor=server.reactor, settings=s, cache=cache, helpers=helpers, machines=companions)

    gen, problems = build(settings, server.registry, live_runtime, config_path=path, reuse=server.machines())
    if gen is None:
        return problems
    moved = _module_listeners_moved(server, gen)
    if moved:
        return [config_problem(moved, path)]
    prepared = Prepared(server, gen, server.generation)
    if settings.access_log and settings.access_log != old.access_log:
        try:
            prepared.access_log = AccessLog(settings.access_log, gen.access_format.line)
        except ValueError as exc:
            problems.append(_file_problem(str(exc), [settings.access_log]))
    if server.listening:
        problems += prepared._open_listeners(path)
    if problems:
        prepared.abort()
        return problems
    prepared.changed = _changed(server, gen)
    return prepared


def _module_listeners_moved(server: Any, gen: Generation) -> str | None:
    """A problem when the module's own listeners (HTTP: siblings) would change:
    they are opened once, at startup."""
    hook = gen.machine.module.listeners
    new = {(x.kind, tuple(x.address)) for x in (hook(gen.g) if hook is not None else [])}
    old = {(x.kind, tuple(x.address)) for x in server.module_listeners()}
    if new == old:
        return None
    kind = sorted(k for k, _ in new ^ old)[0]
    return f"{kind}: changing this server's {kind} listener needs a restart"


def _changed(server: Any, gen: Generation) -> list[str]:
    old, new = server.settings, gen.settings
    out = []
    module = gen.machine.module
    if module.settings is not None:  # the module's own, named by their config keys
        mine, theirs = module.own_settings(old), module.own_settings(new)
        for a in attrs.fields(type(theirs)):
            if getattr(mine, a.name, None) != getattr(theirs, a.name):
                out.append(module.settings.key_of(a.name) or a.name)
    for a in attrs.fields(Settings):
        if a.name in ("tls_certs", "module_settings"):
            continue
        if getattr(old, a.name) != getattr(new, a.name):
            name = {"companion_tables": "backend_table"}.get(a.name)
            name = name or config.file_key(a.name) or a.name
            out.append(f"{name} (needs a restart)" if a.name == "helper_threads" else name)
    if old.tls_certs != new.tls_certs or server.tls_digest != gen.tls_digest:
        out.append("tls certificates")
    for m in (gen.machine, *gen.companions.values()):
        if all(m is not cur for cur in server.machines()):
            out.append(f"table {m.name}")
    if gen.admin_token != server.admin_token:
        out.append("admin token")
    return out


@attrs.define(slots=True, eq=False)
class Prepared:
    """A validated generation waiting to be committed (or aborted)."""

    server: Any
    gen: Generation
    base: int                                 # the server's generation it was prepared against
    access_log: AccessLog | None = None       # opened when the path changed
    opened: dict = attrs.field(factory=dict)  # (kind, addr) -> paused new listener
    changed: list[str] = attrs.field(factory=list)
    done: bool = False

    def _open_listeners(self, path: str | None) -> list[ProblemDict]:
        from twisted.internet.error import CannotListenError

        server = self.server
        problems = []
        have = dict(server.listeners)
        for kind, addr in wanted_listeners(self.gen.settings):
            if (kind, addr) in have:
                continue
            clash = [k for (k, a) in have if a == addr]
            key = {"admin": "admin"}.get(kind, "tls.listen" if kind == "https" and self.gen.settings.tls_listen
                                         else "listen")
            if clash:
                problems.append(config_problem(f"{key}: {addr[0]}:{addr[1]} changes from {clash[0]} to {kind}, "
                                               f"which needs a restart", path))
                continue
            try:
                port = server.open_listener(kind, addr, tls=server.tls_context or self.gen.tls)
            except CannotListenError as exc:
                problems.append(config_problem(f"{key}: cannot listen on {addr[0]}:{addr[1]}: {exc.socketError}",
                                               path))
                continue
            if hasattr(port, "stopReading"):
                port.stopReading()  # bound and queueing, accepting only once committed
            self.opened[(kind, addr)] = port
        return problems

    def abort(self) -> None:
        """Forget this generation: close what prepare opened."""
        if self.done:
            return
        self.done = True
        for port in self.opened.values():
            port.stopListening()
        self.opened.clear()
        if self.access_log is not None:
            self.access_log.close()

    def commit(self) -> dict[str, Any]:
        """Phase two: make this generation current (synchronously, in the
        reactor thread).  Returns ``{"ok": true, "generation": n, "changed": [...]}``."""
        server = self.server
        if self.done:
            raise RuntimeError("this reload was already committed or aborted")
        if server.generation != self.base:
            self.abort()
            raise RuntimeError("another reload was committed after this one was prepared")
        self.done = True
        gen = self.gen
        old_machines = {m.name: m for m in server.machines()}
        carry = gen.machine.module.carry_over
        if carry is not None:
            carry(server.g, gen.g)
        for m in (gen.machine, *gen.companions.values()):
            prev = old_machines.get(m.name)
            if prev is not None and prev is not m:
                carry_counters(prev, m)
                _fold_later(server, prev)
        s = gen.settings
        cache = server.runtime.cache
        if (s.cache_bytes, s.max_object_bytes) != (cache.budget, cache.max_object):
            cache.resize(s.cache_bytes, s.max_object_bytes)
        old_settings = server.settings
        server.settings, server.runtime = s, gen.runtime
        server.machine, server.g = gen.machine, gen.g
        server.admin_token = gen.admin_token
        server.tls_digest = gen.tls_digest
        if s.access_log != old_settings.access_log:
            if server.access_log is not None:
                server.access_log.close()
            server.access_log = self.access_log
        elif server.access_log is not None:
            server.access_log.flush()  # lines made with the old format go out as they were
            server.access_log.line = gen.access_format.line
        server.access_format = gen.access_format
        if gen.tls is not None:
            if server.tls_context is None:
                server.tls_context = gen.tls
            else:
                server.tls_context.replace(gen.tls)
        if server.listening:
            wanted = set(wanted_listeners(s))
            for key in [k for k in server.listeners if k not in wanted]:
                server.remove_listener(key)
            for key, port in self.opened.items():
                if hasattr(port, "startReading"):
                    port.startReading()
                server.add_listener(key, port)
            self.opened.clear()
        for proto in list(server.connections):
            proto.adopt(gen.machine, gen.g)
        server.settings_changed(old_settings)
        server.trace_interest()  # the access log may print the state path now, or no longer
        server.generation += 1
        return {"ok": True, "generation": server.generation, "changed": list(self.changed)}


def carry_counters(old: tables.Machine, new: tables.Machine) -> None:
    """Add ``old``'s per-state and per-transition counters to ``new``'s where the
    state (and outcome) names still exist, so /metrics never goes backwards."""
    index = {name: st.index for name, st in new.states.items()}
    for name, st in old.states.items():
        j = index.get(name)
        if j is not None:
            new.entries[j] += old.entries[st.index]
            new.errors[j] += old.errors[st.index]
    edges = {(sname, outcome): i for i, (sname, outcome, _) in enumerate(new.edges)}
    for i, (sname, outcome, _) in enumerate(old.edges):
        j = edges.get((sname, outcome))
        if j is not None:
            new.transitions[j] += old.transitions[i]


def _fold_later(server: Any, old: tables.Machine) -> None:
    """Requests in flight at a reload still count on the old machine; once it is
    gone (its last user finished), what they counted after the reload is added
    to whatever machine of that name is current then."""
    snapshot = attrs.evolve(old)  # shares the counter lists, not the machine itself
    base = (list(old.entries), list(old.transitions), list(old.errors))

    def fold() -> None:
        # The cyclic collector may run this in a helper thread: counters are
        # only ever touched in the reactor thread.
        if threading.current_thread() is not threading.main_thread():
            call = getattr(server.reactor, "callFromThread", None)
            if call is not None:
                call(add)
                return
        add()

    def add() -> None:
        late = attrs.evolve(snapshot, entries=[a - b for a, b in zip(snapshot.entries, base[0])],
                            transitions=[a - b for a, b in zip(snapshot.transitions, base[1])],
                            errors=[a - b for a, b in zip(snapshot.errors, base[2])])
        if any(late.entries) or any(late.transitions) or any(late.errors):
            for cur in server.machines():
                if cur.name == late.name:
                    carry_counters(late, cur)

    weakref.finalize(old, fold)


def reload(server: Any, settings: Settings | None = None) -> dict[str, Any]:
    """Prepare and commit: ``{"ok": true, "generation": n, "changed": [...]}``,
    or ``{"ok": false, "problems": [...]}`` with nothing changed (one log line
    per problem)."""
    result = prepare(server, settings)
    if isinstance(result, list):
        for p in result:
            log.error("reload failed: {problem}", problem=format_problem(p))
        return {"ok": False, "problems": result}
    out = result.commit()
    log.info("reloaded: generation {n}{changed}", n=out["generation"],
             changed=f" (changed: {', '.join(out['changed'])})" if out["changed"] else " (nothing changed)")
    return out
