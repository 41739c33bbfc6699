"""The ``afpa`` command.

    afpa serve [--root DIR] [--listen HOST:PORT] [--table FILE] [--admin HOST:PORT] ...
    afpa tables list
    afpa tables show NAME
    afpa tables check FILE...
    afpa tables graph FILE [--mermaid]
    afpa cache purge URL [--soft]
    afpa cache ban PREFIX | --regex RE [--host HOST] [--soft]
    afpa cache tag TAG... [--soft]
    afpa reload [--admin HOST:PORT] [--admin-token-file F] [--config F]
    afpa check [--config F] [the options of serve]
    afpa trace [--host H] [--path P] [--status S] [--state NAME] [--sample N] [--json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn


import attrs

from afpa import config

from afpa.machine import graph, tables
from afpa.config import Settings, SettingError, load_config
from afpa.net.intrinsics import default_registry
from afpa.machine.modules import Registry
from afpa.process.signals import install_signal_handlers


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _type(kind: config.Kind) -> Any:
    """An argparse ``type=`` that checks a value with the same kind a config file uses."""
    def convert(text: str) -> Any:
        try:
            return kind.from_text(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = kind.expected  # argparse names the type in some messages
    return convert


# argparse types for the common kinds (a new flag: ``type=_seconds`` and so on).
_seconds, _size, _hostport = _type(config.SECONDS), _type(config.SIZE), _type(config.HOSTPORT)


class _Replaced(argparse.Action):
    """A flag that no longer exists: using it is an error naming its replacement."""

    def __init__(self, option_strings: list[str], dest: str, replacement: str = "", **kw: Any):
        super().__init__(option_strings, dest, nargs=0, help=argparse.SUPPRESS, **kw)
        self.replacement = replacement

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        parser.error(f"{self.option_strings[0]} was replaced by {self.replacement}")


def build_parser(registry: Registry | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``afpa`` command (``serve`` and ``check`` also
    take the flags of every registered protocol module's settings)."""
    registry = registry or default_registry()
    defaults = Settings()
    p = _Parser(prog="afpa", description="State-machine protocol accelerator and layer-7 router.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server (defaults: serve the current directory on 127.0.0.1:8080)",
                       argument_default=argparse.SUPPRESS)
    _serve_options(s, defaults)
    _module_options(s, registry)
    k = sub.add_parser("check", help="validate the configuration, its tables, routes and TLS files "
                       "without serving (takes the options of serve)", argument_default=argparse.SUPPRESS)
    _serve_options(k, defaults)
    _module_options(k, registry)

    t = sub.add_parser("tables", help="list, show, check and draw transition tables")
    tsub = t.add_subparsers(dest="tables_command", required=True)
    tsub.add_parser("list", help="names of the shipped tables (afpa's and installed modules')")
    show = tsub.add_parser("show", help="print a shipped table (start an edit from it)")
    show.add_argument("name")
    check = tsub.add_parser("check", help="validate tables; exit 1 listing every problem")
    check.add_argument("files", nargs="+")
    g = tsub.add_parser("graph", help="draw a table as Graphviz DOT (or Mermaid)")
    g.add_argument("file")
    g.add_argument("--mermaid", action="store_true", help="print a Mermaid stateDiagram instead of DOT")

    c = sub.add_parser("cache", help="purge cached objects through a running server's admin API")
    csub = c.add_subparsers(dest="cache_command", required=True)
    admin_conn = _Parser(add_help=False)  # how a client command reaches the admin API
    admin_conn.add_argument("--admin", type=_hostport, metavar="HOST:PORT",
                            help=f"the server's admin address (default: the --config file's admin, "
                                 f"else {DEFAULT_ADMIN[0]}:{DEFAULT_ADMIN[1]})")
    admin_conn.add_argument("--admin-token-file", metavar="FILE",
                            help="file holding the admin token (default: the --config file's "
                                 "admin_token_file, else $AFPA_ADMIN_TOKEN)")
    admin_conn.add_argument("--config", help="take --admin and --admin-token-file from this config file")
    sub.add_parser("reload", parents=[admin_conn], help="make a running server re-read its configuration, "
                   "tables and TLS files (exit 1 listing file:line: problem if they fail; nothing changes then)")
    admin_opts = _Parser(add_help=False, parents=[admin_conn])
    admin_opts.add_argument("--soft", action="store_true",
                            help="mark stale (kept for revalidation and grace) instead of removing")
    cp = csub.add_parser("purge", parents=[admin_opts], help="purge one URL (http://host[:port]/path?query)")
    cp.add_argument("url")
    cb = csub.add_parser("ban", parents=[admin_opts], help="purge every URL whose path starts with PREFIX "
                         "(or matches --regex)")
    cb.add_argument("prefix", nargs="?", metavar="PREFIX")
    cb.add_argument("--regex", metavar="RE", help="Python regular expression searched in the path and query")
    cb.add_argument("--host", help="only URLs of this Host (as clients send it, port included)")
    ct = csub.add_parser("tag", parents=[admin_opts], help="purge every object with these surrogate keys "
                         "(Surrogate-Key / Cache-Tag)")
    ct.add_argument("tags", nargs="+", metavar="TAG")

    tr = sub.add_parser("trace", parents=[admin_conn],
                        help="follow requests live (a line each, with the states they went through) "
                             "through a running server's admin API; Ctrl-C stops")
    tr.add_argument("--host", help="only requests for this Host")
    tr.add_argument("--path", help="only requests whose path starts with this")
    tr.add_argument("--status", help="only this status (404) or class (5xx)")
    tr.add_argument("--state", metavar="NAME", help="only requests that went through this state")
    tr.add_argument("--sample", type=_type(config.COUNT), metavar="N", help="1 request in N (after the filters)")
    tr.add_argument("--json", action="store_true", help="print each event as the server sends it (NDJSON)")
    return p


def _module_dest(module: str, field: str) -> str:
    return f"module:{module}:{field}"


def _module_options(s: argparse.ArgumentParser, registry: Registry) -> None:
    """The flags protocol modules declare (``--upstream`` of ``dns``), in a group per module."""
    for name, module in sorted(registry.modules.items()):
        spec = module.settings
        flagged = [opt for opt in (spec.options if spec else ()) if opt.flag]
        if not flagged:
            continue
        title = f"module {name}" + ("" if name == config.DEFAULT_MODULE else f" (with --module {name})")
        group = s.add_argument_group(title)
        for opt in flagged:
            group.add_argument(opt.flag, dest=_module_dest(name, opt.field),
                               type=_item_type(opt.kind) if opt.repeat else _type(opt.kind),
                               action="append" if opt.repeat else "store",
                               metavar=opt.metavar or (opt.field.upper().rstrip("S") if opt.repeat
                                                       else opt.field.upper()),
                               help=f"{opt.help} (config: [{spec.section}] {opt.key})" if spec.section
                               else f"{opt.help} (config: {opt.key})")


def _item_type(kind: config.Kind) -> Any:
    """The argparse ``type=`` of a repeatable flag: each value is one item of
    the list ``kind`` checks (``--trusted-proxy A --trusted-proxy B``)."""
    def convert(text: str) -> Any:
        try:
            return kind([kind.text(text)])[0]
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = kind.expected
    return convert


def _serve_options(s: argparse.ArgumentParser, defaults: Settings) -> None:
    """The options of ``afpa serve`` (``afpa check`` takes the same)."""
    s.add_argument("--config", help="TOML config file (see examples/afpa.toml); options given here override it")
    s.add_argument("--module", metavar="NAME",
                   help="the protocol module to serve (default: http; `afpa tables list` shows what is "
                        "installed)")
    s.add_argument("--listen", type=_hostport, metavar="HOST:PORT",
                   help="address to accept clients on (default: 127.0.0.1:8080)")
    s.add_argument("--trust-forwarded", action=_Replaced, replacement="--trusted-proxy ADDRESS-OR-CIDR "
                   "(repeatable): name the proxies whose X-Forwarded-* are kept")
    s.add_argument("--tls-cert", metavar="PEM", help="terminate TLS with this certificate (chain) ...")
    s.add_argument("--tls-key", metavar="PEM", help="... and this private key")
    s.add_argument("--table", help="run this transition table instead of the shipped one")
    s.add_argument("--admin", type=_hostport, metavar="HOST:PORT",
                   help="serve the live machine page, /metrics, /healthz and /tables/ on this address "
                        "(HOST defaults to 127.0.0.1)")
    s.add_argument("--admin-token-file", metavar="FILE",
                   help="bearer token for admin writes (purge, ban, tag); else $AFPA_ADMIN_TOKEN; "
                        "with neither, admin writes are refused")
    s.add_argument("--admin-auth", choices=("writes", "all"),
                   help="admin endpoints that need the token: 'writes' (default; reads are open to "
                        "whoever reaches the admin address) or 'all' (everything but /healthz)")
    s.add_argument("--access-log", metavar="PATH",
                   help="one line per request ('-' for standard output); SIGHUP reopens it")
    s.add_argument("--access-log-format", metavar="FORMAT",
                   help="fields of an access-log line, e.g. '$remote_addr \"$request\" $status $states' "
                        "(default: combined log format plus $cache_status and $states; see README)")
    s.add_argument("--cache-size", dest="cache_bytes", type=_size, metavar="SIZE",
                   help=f"memory cache budget (default: {defaults.cache_bytes >> 20}M)")
    s.add_argument("--max-object-size", dest="max_object_bytes", type=_size, metavar="SIZE",
                   help=f"larger bodies are not cached (default: {defaults.max_object_bytes >> 20}M)")
    for flag, field in (("--idle-timeout", "idle_timeout"), ("--send-timeout", "send_timeout"),
                        ("--tls-handshake-timeout", "tls_handshake_timeout"), ("--drain-timeout", "drain_timeout")):
        s.add_argument(flag, dest=field, type=_seconds, metavar="SECONDS",
                       help=f"(default: {getattr(defaults, field):g}; config: {config.file_key(field)})")
    s.add_argument("--workers", type=_type(config.WORKERS), metavar="N|auto",
                   help="serve with N worker processes under one supervisor ('auto': one per CPU; "
                        "default: 1, this process serves)")
    # Given by a supervisor to the workers it starts ("INDEX/COUNT"); not for users.
    s.add_argument("--worker-slot", dest="worker_slot", help=argparse.SUPPRESS)
    s.add_argument("--quiet", action="store_true", default=False, help="log warnings and errors only")


DEFAULT_ADMIN = ("127.0.0.1", 9100)  # the address the README and examples/afpa.toml use


class _AdminError(Exception):
    """An admin API call that failed; the message is one line."""


def _admin_target(args: argparse.Namespace) -> tuple[tuple[str, int], bytes | None]:
    """The admin address and token a client command uses (``--admin``,
    ``--admin-token-file``, ``--config``); raises :class:`_AdminError` (one line)."""
    try:
        registry = default_registry()

        def spec_of(name: str) -> Any:
            module = registry.modules.get(name)
            return module.settings if module is not None else None

        from_file = load_config(args.config, spec_of) if args.config else {}
        admin = args.admin or from_file.get("admin") or DEFAULT_ADMIN
        token_file = args.admin_token_file or from_file.get("admin_token_file")
        return admin, config.read_admin_token(Settings(admin_token_file=token_file))
    except (ValueError, SettingError) as exc:
        raise _AdminError(str(exc)) from None


def _admin_post(args: argparse.Namespace, path: str, body: dict[str, Any]) -> tuple[int, bytes, str]:
    """POST ``body`` as JSON to ``path`` of the admin API named by ``--admin``,
    ``--admin-token-file`` and ``--config`` (``afpa cache``, ``afpa reload``):
    (status, answer, ``admin API at HOST:PORT``).  Raises :class:`_AdminError` when there is no answer."""
    import http.client
    import json

    admin, token = _admin_target(args)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = "Bearer " + token.decode("ascii")
    host, port = admin
    try:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        try:
            conn.request("POST", path, json.dumps(body), headers)
            resp = conn.getresponse()
            return resp.status, resp.read(1 << 20), f"admin API at {host}:{port}"
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as exc:
        raise _AdminError(f"cannot reach the admin API at {host}:{port}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None


def _admin_refusal(where: str, status: int, data: bytes) -> str:
    """``admin API at HOST:PORT: <status>: <problem>`` for an answer that is not a success."""
    import json

    try:
        problem = json.loads(data)["error"]
    except (ValueError, KeyError, TypeError):
        problem = data.decode("utf-8", "replace").strip().splitlines()[0] if data.strip() else "no answer"
    return f"{where}: {status}: {problem}"


def _cache(args: argparse.Namespace) -> int:
    """``afpa cache ...``: one POST to the admin API; prints its JSON answer."""
    if args.cache_command == "purge":
        body: dict[str, Any] = {"url": args.url}
    elif args.cache_command == "ban":
        if (args.prefix is None) == (args.regex is None):
            print("afpa: cache ban: give a PREFIX or --regex RE (one of them)", file=sys.stderr)
            return 1
        body = {"prefix": args.prefix} if args.regex is None else {"regex": args.regex}
        if args.host:
            body["host"] = args.host
    else:
        body = {"tags": args.tags}
    if args.soft:
        body["soft"] = True
    try:
        status, data, where = _admin_post(args, f"/cache/{args.cache_command}", body)
    except _AdminError as exc:
        print(f"afpa: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"afpa: {_admin_refusal(where, status, data)}", file=sys.stderr)
        return 1
    sys.stdout.write(data.decode("utf-8", "replace"))
    return 0


def _reload(args: argparse.Namespace) -> int:
    """``afpa reload``: POST /reload; one line on success, else every
    ``file:line: problem`` and exit 1."""
    import json

    from afpa.reload import format_problem

    try:
        status, data, where = _admin_post(args, "/reload", {})
    except _AdminError as exc:
        print(f"afpa: {exc}", file=sys.stderr)
        return 1
    try:
        result = json.loads(data) if status in (200, 422) else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        print(f"afpa: {_admin_refusal(where, status, data)}", file=sys.stderr)
        return 1
    if status == 200 and result.get("ok"):
        changed = result.get("changed") or []
        print(f"afpa: reloaded (generation {result.get('generation')}; "
              f"{'changed: ' + ', '.join(changed) if changed else 'nothing changed'})")
        return 0
    for p in result.get("problems") or []:
        print(format_problem(p), file=sys.stderr)
    print("afpa: reload failed; the running configuration is unchanged", file=sys.stderr)
    return 1


def _trace(args: argparse.Namespace) -> int:
    """``afpa trace``: follow the admin API's ``/trace`` stream, one readable line
    per request (or the raw NDJSON with ``--json``) until Ctrl-C (exit 0)."""
    try:
        return _follow_trace(args)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # e.g. piped into head
        return 0


def _follow_trace(args: argparse.Namespace) -> int:
    import http.client
    import json
    from urllib.parse import urlencode

    from afpa.machine.trace import format_event

    try:
        admin, token = _admin_target(args)
    except _AdminError as exc:
        print(f"afpa: {exc}", file=sys.stderr)
        return 1
    query = urlencode([(k, str(v)) for k, v in (("host", args.host), ("path", args.path), ("status", args.status),
                                                ("state", args.state), ("sample", args.sample)) if v])
    headers = {} if token is None else {"Authorization": "Bearer " + token.decode("ascii")}
    host, port = admin
    where = f"admin API at {host}:{port}"
    try:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", "/trace" + ("?" + query if query else ""), headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            data = resp.read(1 << 20)
            print(f"afpa: {_admin_refusal(where, resp.status, data)}", file=sys.stderr)
            return 1
        conn.sock.settimeout(None)  # a quiet server is not a dead one
        out = sys.stdout
        while True:
            line = resp.readline(1 << 20)
            if not line:
                print(f"afpa: {where} closed the trace stream", file=sys.stderr)
                return 1
            if args.json:
                out.write(line.decode("utf-8", "replace"))
                out.flush()
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if "subscribed" in ev:
                print(f"afpa: tracing requests at {host}:{port} (Ctrl-C stops)", file=sys.stderr, flush=True)
            elif "dropped" in ev:
                print(f"afpa: {ev['dropped']} request(s) left out: this reader was slower than the traffic "
                      "(narrow it with --host/--path/--status/--state or --sample N)", file=sys.stderr, flush=True)
            else:
                out.write(format_event(ev) + "\n")
                out.flush()
    except (OSError, http.client.HTTPException) as exc:
        print(f"afpa: cannot reach the {where}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1


def _check(args: argparse.Namespace, registry: Registry) -> int:
    """``afpa check``: validate what ``afpa serve`` with these options would run."""
    from afpa.reload import check, format_problem

    problems = check(lambda: settings_from_args(args, registry), registry, getattr(args, "config", None))
    for p in problems:
        print(format_problem(p), file=sys.stderr)
    if problems:
        print(f"afpa: configuration has {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print("afpa: configuration ok")
    return 0


def _table_source(name_or_path: str, registry: Registry) -> tuple[str, str]:
    """(text, file label) for a path, or for the name of a shipped table (afpa's
    own or an installed module's, see :func:`tables.known_tables`)."""
    path = Path(name_or_path)
    if not path.exists() and "/" not in name_or_path:
        known = tables.known_tables(registry)
        if name_or_path in known:
            path = known[name_or_path]
    return path.read_text(encoding="utf-8"), name_or_path


def _tables(args: argparse.Namespace, registry: Registry) -> int:
    out = sys.stdout
    known = tables.known_tables(registry)
    if args.tables_command == "list":
        for name in known:
            print(name, file=out)
        return 0
    if args.tables_command == "show":
        if args.name not in known:
            print(f"afpa: no shipped table named {args.name!r} (shipped: "
                  f"{', '.join(known)})", file=sys.stderr)
            return 1
        out.write(known[args.name].read_text(encoding="utf-8"))
        return 0
    if args.tables_command == "check":
        failed = False
        for f in args.files:
            try:
                text, label = _table_source(f, registry)
            except OSError as exc:
                print(f"{f}: cannot read: {exc.strerror}", file=sys.stderr)
                failed = True
                continue
            spec, problems = tables.check_text(text, label, registry)
            for problem in problems:
                print(problem, file=sys.stderr)
            if spec is not None and not problems:
                # Runtime events left to the runtime's default: said, not failed.
                for note in tables.notes(spec, registry):
                    print(note)
            if problems:
                failed = True
                print(f"{label}: {len(problems)} problem(s)", file=sys.stderr)
            else:
                print(f"{label}: ok")
        return 1 if failed else 0
    if args.tables_command == "graph":
        try:
            text, label = _table_source(args.file, registry)
        except OSError as exc:
            print(f"{args.file}: cannot read: {exc.strerror}", file=sys.stderr)
            return 1
        spec, problems = tables.parse(text, label)
        if spec is None:
            for problem in problems:
                print(problem, file=sys.stderr)
            return 1
        out.write(graph.to_mermaid(spec, registry) if args.mermaid else graph.to_dot(spec, registry))
        return 0
    return 2


def _serve(args: argparse.Namespace, registry: Registry, argv: list[str]) -> int:
    from afpa.net.reactor import install

    reactor = install()
    from twisted.internet.error import CannotListenError
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner

    from afpa.server import Server

    level = LogLevel.warn if args.quiet else LogLevel.info
    slot = _worker_slot(getattr(args, "worker_slot", None))
    text = _log_observer(None if slot is None else slot[0])
    observer = FilteringLogObserver(text, [LogLevelFilterPredicate(defaultLogLevel=level)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    from afpa.reload import ConfigSource

    try:
        def load() -> Settings:
            fresh = settings_from_args(args, registry)
            if slot is not None:  # a worker: see supervisor.worker_settings
                from afpa.process.supervisor import worker_settings
                fresh = worker_settings(fresh, *slot, registry=registry)
            return fresh

        settings = load()
        source = ConfigSource(getattr(args, "config", None), load)
        server = Server(settings, reactor=reactor, registry=registry, source=source)
    except SettingError as exc:  # a setting only the server can judge (access_log_format)
        print(f"afpa: {_setting_where(exc.field, vars(args), getattr(args, 'config', None))}: {exc.problem}",
              file=sys.stderr)
        return 1
    except tables.TableError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print("afpa: the table has problems; not starting", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"afpa: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file named in the settings (access log, table) cannot be opened
        print(f"afpa: {_os_error(exc)}", file=sys.stderr)
        return 1
    if slot is not None:
        from afpa.process import worker
        return worker.serve(server, reactor)
    if settings.workers > 1:
        from afpa.process import supervisor
        try:
            return supervisor.serve(settings, argv, reactor, server)
        except ValueError as exc:  # a TLS file
            print(f"afpa: {exc}", file=sys.stderr)
            return 1
    try:
        server.start()  # builds the TLS contexts (reads and checks every TLS file) and listens
    except CannotListenError as exc:
        server.stop()
        print(f"afpa: cannot listen on {exc.interface}:{exc.port}: {exc.socketError}", file=sys.stderr)
        return 1
    except ValueError as exc:
        server.stop()
        print(f"afpa: {exc}", file=sys.stderr)
        return 1
    try:
        lines = server.describe()
    except Exception:
        server.stop()  # never leave helper threads holding the process open
        raise
    for line in lines:
        print(f"afpa: {line}", file=sys.stderr, flush=True)
    install_signal_handlers(reactor, server)
    reactor.addSystemEventTrigger("before", "shutdown", server.stop)
    # Twisted's own handlers would stop the reactor on the first SIGTERM/SIGINT;
    # ours drain first (see afpa.process.signals).  A handler only queues work for the reactor.
    reactor.run(installSignalHandlers=False)
    return 0


def _worker_slot(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` from ``--worker-slot`` -> (I, N)."""
    if text is None:
        return None
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise SystemExit(f"afpa: --worker-slot: expected INDEX/COUNT, got {text!r}")
    return int(index), int(count)


def _log_observer(worker: int | None) -> Any:
    """Log lines on standard error; a worker's (shared with the supervisor and the
    other workers) name it in the bracket: ``[w1 afpa#info]``."""
    from twisted.logger import FileLogObserver, LogLevel, formatEventAsClassicLogText

    def fmt(event: dict) -> str | None:
        # Twisted's own chatter ("MachineFactory starting on 8080") says less than
        # afpa's own "listening on" lines; its warnings and errors still show.
        if not event.get("log_namespace", "").startswith("afpa") and event.get("log_level") != LogLevel.warn \
                and event.get("log_level") not in (LogLevel.error, LogLevel.critical):
            return None
        text = formatEventAsClassicLogText(event)
        return text.replace(" [", f" [w{worker} ", 1) if text and worker is not None else text
    return FileLogObserver(sys.stderr, fmt)


def _os_error(exc: OSError) -> str:
    """``<file>: <problem>`` for an OSError (one line)."""
    problem = "is a directory" if isinstance(exc, IsADirectoryError) else (exc.strerror or str(exc))
    return f"{exc.filename}: {problem}" if exc.filename else problem


def settings_from_args(args: argparse.Namespace, registry: Registry | None = None) -> Settings:
    """Settings from a config file (if any) overridden by command-line options.

    Raises ValueError with a one-line message naming the option or the config
    file and key at fault."""
    registry = registry or default_registry()

    def spec_of(name: str) -> Any:
        module = registry.modules.get(name)
        return module.settings if module is not None else None

    path = getattr(args, "config", None)
    kwargs = load_config(path, spec_of) if path else {}
    file_module = kwargs.get("module", config.DEFAULT_MODULE)  # the module whose section the file gave
    given = vars(args)
    fields = attrs.fields_dict(Settings)
    from_cli = {name for name in given if name in fields}
    for name in from_cli:
        kwargs[name] = given[name]
    module_name = kwargs.get("module", config.DEFAULT_MODULE)
    if module_name in registry.broken:
        raise ValueError(f"protocol module {module_name!r} cannot be loaded: {registry.broken[module_name]}")
    if module_name not in registry.modules:
        known = ", ".join(sorted(registry.modules)) or "none"
        raise ValueError(f"{'--module' if 'module' in from_cli else (path + ': module' if path else 'module')}: "
                         f"no protocol module {module_name!r} is installed (installed: {known})")
    values = kwargs.pop("module_values", None)
    if values is None or module_name != file_module:
        values = {}
    spec = spec_of(module_name)
    for dest, value in given.items():
        if not dest.startswith("module:"):
            continue
        _, owner, field = dest.split(":", 2)
        opt = next(o for o in registry.modules[owner].settings.options if o.field == field)
        if owner != module_name:
            raise ValueError(f"{opt.flag}: an option of module {owner}, but the module is {module_name} "
                             f"(add --module {owner})")
        values[field] = tuple(value) if opt.repeat else value
    if spec is not None:
        try:
            kwargs["module_settings"] = spec.build(values)
        except ValueError as exc:
            raise ValueError(_module_where(str(exc), spec, registry.modules[module_name], given, path)) from None
    if ("tls_cert" in given) != ("tls_key" in given):
        raise ValueError("--tls-cert and --tls-key go together")
    if "tls_cert" in given:
        from afpa.net.tls import Certificate
        kwargs["tls_certs"] = (Certificate(given["tls_cert"], given["tls_key"]),)
    try:
        return Settings(**kwargs)
    except SettingError as exc:
        raise ValueError(f"{_setting_where(exc.field, from_cli, path)}: {exc.problem}") from None


def _module_where(message: str, spec: Any, module: Any, given: dict, path: str | None) -> str:
    """A module setting's problem (``<key>: <problem>``) placed at its flag when
    the flag gave the value, else at the config file."""
    key = message.split(": ", 1)[0]
    opt = spec.option(key[len(spec.section) + 1:] if spec.section else key)
    if opt is not None and opt.flag and _module_dest(module.name, opt.field) in given:
        return f"{opt.flag}: {message.split(': ', 1)[1]}"
    return f"{path}: {message}" if path else message


def _setting_where(field: str, from_cli: Any, path: str | None) -> str:
    """Where a setting came from, for an error: its flag, or ``<file>: <key>``."""
    if field in from_cli:
        return "--" + {"cache_bytes": "cache-size",
                       "max_object_bytes": "max-object-size"}.get(field, field.replace("_", "-"))
    return f"{path}: {config.file_key(field) or field}" if path else field


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``afpa`` command; returns the exit status."""
    registry = default_registry()
    for name, problem in sorted(registry.broken.items()):
        print(f"afpa: warning: protocol module {name!r} not loaded: {problem}", file=sys.stderr)
    args = build_parser(registry).parse_args(argv)
    if args.command == "tables":
        return _tables(args, registry)
    if args.command == "cache":
        return _cache(args)
    if args.command == "reload":
        return _reload(args)
    if args.command == "check":
        return _check(args, registry)
    if args.command == "trace":
        return _trace(args)
    return _serve(args, registry, list(sys.argv[1:] if argv is None else argv))
