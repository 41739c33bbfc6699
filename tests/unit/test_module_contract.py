"""The runtime/module contract: a module's own settings (HTTP's as top-level
keys and flags), and optional hooks found as typed ProtocolModule fields, never
by probing the module's objects for attributes."""

from __future__ import annotations

import attrs
import pytest
from prometheus_client.core import CounterMetricFamily
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from afpa.cli import build_parser, settings_from_args
from afpa.config import Settings
from afpa.machine.modules import Listener, ProtocolModule, StreamLimits, collect, state
from afpa.machine.scopes import GlobalScope, Request, RequestScope, Runtime
from afpa.net.helpers import InlineHelpers
from afpa.net.intrinsics import default_registry
from afpa.ops.metrics import Collector
from afpa.server import Server
from protocols.http.settings import HttpSettings

# -- HTTP's settings: the same keys and flags as before they moved -----------------


def serve_args(*argv, registry=None):
    return settings_from_args(build_parser(registry).parse_args(["serve", *argv]), registry)


def test_runtime_and_http_keys_share_a_table_and_each_lands_in_its_own_object(tmp_path):
    cfg = tmp_path / "afpa.toml"
    cfg.write_text('root = "/srv"\nlisten = "127.0.0.1:1"\n'
                   '[cache]\nsize = "1M"\ngrace = 5\n'
                   '[limits]\noutput_buffer = "8k"\nheader_block = "16k"\n'
                   '[timeouts]\nidle = 7\nheader = 3\n'
                   '[[route]]\nto = "docroot"\nprefix = "/s/"\nroot = "/srv"\n')
    s = serve_args("--config", str(cfg))
    http = s.module_settings
    assert (s.listen, s.cache_bytes, s.output_buffer, s.idle_timeout) == (("127.0.0.1", 1), 1 << 20, 8 << 10, 7.0)
    assert (http.root, http.grace, http.max_header_block, http.header_timeout) == ("/srv", 5.0, 16 << 10, 3.0)
    assert http.routes == ({"to": "docroot", "prefix": "/s/", "root": "/srv"},)
    assert not hasattr(s, "grace") and not hasattr(s, "root")  # the runtime holds none of HTTP's


def test_http_flags_still_work_and_override_the_file(tmp_path):
    cfg = tmp_path / "afpa.toml"
    cfg.write_text('root = "/srv"\nbackend = "http://127.0.0.1:9"\n[timeouts]\nheader = 3\n')
    s = serve_args("--config", str(cfg), "--root", "/www", "--header-timeout", "4", "--revalidate-after", "1",
                   "--trusted-proxy", "10.0.0.0/8")
    http = s.module_settings
    assert (http.root, http.backend, http.header_timeout, http.revalidate_after) == ("/www", "http://127.0.0.1:9",
                                                                                      4.0, 1.0)
    assert http.trusted_proxies == ("10.0.0.0/8",)
    assert serve_args("--defer", "http://127.0.0.1:7").module_settings.defer == "http://127.0.0.1:7"


@pytest.mark.parametrize("text,message", [
    ("[cache]\ngrase = 5", "unknown key 'cache.grase' (did you mean 'cache.grace'?)"),
    ("[limits]\nheader_blok = 5", "did you mean 'limits.header_block'?"),
    ("[timeouts]\nheader = 0", "timeouts.header: expected a positive number of seconds, got 0"),
    ("route = 5", "route: must be an array of tables ([[route]])"),
    ('backend = "http://a:1"\ndefer = "http://a:2"', "defer: choose backend or defer"),
])
def test_http_keys_are_refused_in_one_line_naming_file_and_key(tmp_path, text, message):
    cfg = tmp_path / "afpa.toml"
    cfg.write_text(text)
    with pytest.raises(ValueError) as info:
        serve_args("--config", str(cfg))
    assert str(info.value).startswith(f"{cfg}: ") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_both_default_routes_from_flags_name_the_flag():
    with pytest.raises(ValueError, match=r"^--defer: choose backend or defer"):
        serve_args("--backend", "http://a:1", "--defer", "http://a:2")


def test_settings_built_in_code_without_http_settings_get_http_defaults(docroot):
    server = Server(Settings(), reactor=Clock(), helpers=InlineHelpers())
    assert server.g.settings == HttpSettings()
    assert server.limits == StreamLimits(message_timeout=10.0, max_unread=64 << 10)


# -- a module of its own: hooks are fields, found nowhere else -----------------------

class Tempting:
    """A global scope with attributes named like the old probed hooks: the
    runtime must not find or call any of them."""

    def __init__(self, runtime):
        self.runtime = runtime

    def _never(self, *args):
        raise AssertionError("the runtime probed the module's global scope")

    describe = sweep = metrics = sibling_entry = _never
    siblings = property(_never)


@state("line", "need_more")
def read_line(g, conn, req):
    """One line of input, answered with ``ok``."""
    end = conn.inbuf.find(b"\n", conn.inpos)
    if end < 0:
        return "need_more"
    conn.inpos = end + 1
    req.head, req.status = b"ok\n", 200
    return "line"


TABLE = """
[machine]
name = "line"
module = "line"
start = "read_line"

[states.read_line]
run = "read_line"
on = { line = "send", need_more = "@wait" }

[states.send]
run = "afpa.send_engine"
on = { sent = "@done", close = "@close", aborted = "@close" }
"""

CALLS: list = []


def entry(start):
    def first(g, conn, req):
        CALLS.append(("entry", conn.listener))
        return start(g, conn, req)
    return first


def line_module(**hooks):
    return ProtocolModule(name="line", functions=collect([read_line]), table="", make_global=lambda s, r: Tempting(r),
                          make_request=lambda conn: Request(), fail=lambda g, conn, req, reason: None, **hooks)


@pytest.fixture
def line_server(tmp_path):
    def make(**hooks):
        table = tmp_path / "line.toml"
        table.write_text(TABLE)
        reg = default_registry()
        reg.register(line_module(**hooks))
        return Server(Settings(module="line", table=str(table)), reactor=Clock(), helpers=InlineHelpers(),
                      registry=reg)
    CALLS.clear()
    return make


def test_a_module_without_hooks_is_never_probed(line_server):
    server = line_server()
    assert any(line.startswith("table ") for line in server.describe())
    server.sweep()
    families = [f.name for f in Collector(server).collect()]
    assert "afpa_connections" in families
    assert server.module_listeners() == []
    assert server.limits == StreamLimits()


def test_hooks_are_called_with_the_global_scope(line_server):
    seen = {}
    server = line_server(
        describe=lambda g: seen.setdefault("describe", g) and ["misses go nowhere"],
        sweep=lambda g, now: seen.setdefault("sweep", (g, now)),
        metrics=lambda g: [CounterMetricFamily("line_things", "Things", value=3)],
        stream_limits=lambda own: StreamLimits(message_timeout=2.5, max_unread=10))
    assert "misses go nowhere" in server.describe() and seen["describe"] is server.g
    server.sweep()
    assert seen["sweep"] == (server.g, server.reactor.seconds())
    assert "line_things" in [f.name for f in Collector(server).collect()]
    # The module's shortest timer sets how often the sweep looks for deadlines.
    assert server.limits == StreamLimits(message_timeout=2.5, max_unread=10)
    assert server._sweep_interval() <= 2.5


def test_a_module_listener_runs_the_machine_from_its_entry(line_server, monkeypatch):
    opened = []
    server = line_server(listeners=lambda g: [Listener("peer", ("127.0.0.1", 0), entry, "peers (test)")])
    monkeypatch.setattr(server.reactor, "listenTCP", lambda port, factory, backlog, interface:
                        opened.append(factory) or _Port(interface, port), raising=False)
    server.start(sockets=[])
    assert len(opened) == 1 and opened[0].listener == "peer"
    assert "peers (test) on http://127.0.0.1:0/" in server.describe()
    proto = opened[0].buildProtocol(None)
    t = StringTransport()
    proto.makeConnection(t)
    proto.dataReceived(b"hello\n")
    assert CALLS == [("entry", "peer")] and t.value() == b"ok\n"
    server.stop()


class _Port:
    def __init__(self, host, port):
        self.host, self.port = host, port

    def getHost(self):
        return self

    def stopListening(self):
        pass


def test_scopes_are_described_by_protocols():
    # Request (what modules subclass) has every field RequestScope names, and
    # GlobalScope asks only for the runtime.
    request_fields = {a.name for a in attrs.fields(Request)}
    assert set(RequestScope.__annotations__) <= request_fields
    assert set(GlobalScope.__annotations__) == {"runtime"}
    assert Runtime.__annotations__["settings"] == "Settings"


# -- workers as peers: only through the module's Peering ------------------------------

def test_workers_of_a_module_without_peering_get_no_peers(line_server):
    from afpa.process import worker
    from afpa.process.supervisor import SIBLINGS_ENV, worker_settings

    server = line_server()
    env = {SIBLINGS_ENV: "127.0.0.1:7001,127.0.0.1:7002"}
    w = worker_settings(server.settings, 1, 2, env, registry=server.registry)
    assert w.module_settings is None and w.worker_index == 1
    assert worker.OPS["peer"](server, {"index": 0, "up": False}) == {}  # nothing to mark, nothing probed


def test_http_workers_are_siblings_and_one_leaving_is_marked(docroot, monkeypatch):
    from afpa.process import worker
    from afpa.process.supervisor import SIBLINGS_ENV, worker_settings
    from tests.conftest import MemoryServer

    monkeypatch.setenv("AFPA_SIBLING_TOKEN", "t" * 32)
    env = {SIBLINGS_ENV: "127.0.0.1:7001,127.0.0.1:7002"}
    w = worker_settings(MemoryServer(str(docroot)).settings, 0, 2, env)
    assert (w.module_settings.sibling_members, w.module_settings.sibling_self) == (
        ("127.0.0.1:7001", "127.0.0.1:7002"), 0)
    assert w.module_settings.root == str(docroot)  # the rest of HTTP's settings kept
    server = Server(w, reactor=Clock(), helpers=InlineHelpers())
    worker.OPS["peer"](server, {"index": 1, "up": False})
    assert server.g.siblings.down_until[1] == float("inf")
    worker.OPS["peer"](server, {"index": 1, "up": True})
    assert server.g.siblings.down_until[1] == 0.0
    assert worker.OPS["peer"](server, {"index": 9, "up": False}) == {}  # not a member: ignored


def test_moving_a_module_listener_needs_a_restart(docroot, monkeypatch):
    from protocols.http.settings import http_settings
    from tests.conftest import MemoryServer

    monkeypatch.setenv("AFPA_SIBLING_TOKEN", "t" * 32)
    members = ("127.0.0.1:9301", "127.0.0.1:9302")
    mem = MemoryServer(str(docroot), sibling_members=members, sibling_self=0)
    moved = mem.server.reload(http_settings(root=str(docroot), sibling_members=members, sibling_self=1))
    assert not moved["ok"] and "sibling listener needs a restart" in moved["problems"][0]["problem"]
    same = mem.server.reload(http_settings(root=str(docroot), sibling_members=members, sibling_self=0, grace=3.0))
    assert same["ok"] and same["changed"] == ["cache.grace"]


def test_an_http_flag_with_another_module_is_refused():
    reg = default_registry()
    reg.register(line_module())
    with pytest.raises(ValueError, match=r"^--root: an option of module http, but the module is line"):
        serve_args("--module", "line", "--root", "/srv", registry=reg)
    assert serve_args("--module", "line", registry=reg).module_settings is None  # line declares none
