"""Configuration reload in one process, on in-memory transports: new connections
take the new machine, a request in flight finishes on the old one, the cache,
pools and counters survive, and a broken configuration changes nothing."""

from __future__ import annotations

import gc
import json

import attrs
import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport

from afpa.machine import tables
from afpa.cli import main
from afpa.net.helpers import InlineHelpers
from afpa.reload import ConfigSource, config_problem, format_problem
from afpa.server import Server
from tests.conftest import MemoryServer, admin_call
from tests.httpclient import parse_responses
from protocols.http.settings import http_settings

TOKEN = "reload-token-0123456789"


def get(path: str, host: str = "test") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def ask(mem, data: bytes):
    proto, t = mem.connect()
    proto.dataReceived(data)
    return proto, t, parse_responses(t.value())


@pytest.fixture
def table(tmp_path):
    """A copy of the shipped client table the test may edit."""
    path = tmp_path / "http.toml"
    path.write_text(tables.shipped_table_path("http").read_text())
    return path


def edited(path, comment="# edited\n"):
    path.write_text(path.read_text() + comment)


def test_route_change_is_seen_by_new_and_idle_keep_alive_connections(docroot, tmp_path):
    other = tmp_path / "other"
    (other / "r").mkdir(parents=True)
    (other / "r" / "x.txt").write_bytes(b"from the route\n")
    mem = MemoryServer(str(docroot))
    idle, t = mem.connect()
    idle.dataReceived(get("/r/x.txt"))
    assert parse_responses(t.value())[0][0] == 404
    t.clear()
    assert mem.server.reload(http_settings(root=str(docroot), routes=(
        {"prefix": "/r/", "to": "docroot", "root": str(other)},)))["ok"]
    _, _, [(status, _, body)] = ask(mem, get("/r/x.txt"))
    assert (status, body) == (200, b"from the route\n")
    idle.dataReceived(get("/r/x.txt"))  # a keep-alive connection that was between requests
    [(status, _, body)] = parse_responses(t.value())
    assert (status, body) == (200, b"from the route\n")


def test_a_changed_table_is_a_new_machine_and_counters_carry_over(docroot, table):
    mem = MemoryServer(str(docroot), table=str(table))
    for _ in range(3):
        ask(mem, get("/hello.txt"))
    old = mem.server.machine
    i = old.states["derive_request"].index
    edges = {(s, o): n for (s, o, _), n in zip(old.edges, old.transitions)}
    assert old.entries[i] == 3
    assert mem.server.reload()["changed"] == []  # same text: the machine is kept
    assert mem.server.machine is old
    edited(table)
    result = mem.server.reload()
    assert result["ok"] and "table http" in result["changed"]
    new = mem.server.machine
    assert new is not old
    assert new.entries[new.states["derive_request"].index] == 3
    assert {(s, o): n for (s, o, _), n in zip(new.edges, new.transitions)} == edges
    ask(mem, get("/hello.txt"))
    assert new.entries[new.states["derive_request"].index] == 4
    assert old.entries[i] == 3


def test_in_flight_request_finishes_on_its_machine_then_the_connection_moves(docroot, table):
    reactor = MemoryReactorClock()
    reactor.advance(1_800_000_000)
    settings = http_settings(root=str(docroot), backend="http://127.0.0.1:9", table=str(table))
    server = Server(settings, reactor=reactor, helpers=InlineHelpers())
    client = server.factory().buildProtocol(None)
    ct = StringTransport()
    client.makeConnection(ct)
    client.dataReceived(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")  # parked: waits for the backend
    old, old_pools = server.machine, server.g.pools
    edited(table)
    assert server.reload(http_settings(root=str(docroot), backend="http://127.0.0.1:9", table=str(table),
                                  backend_max_idle=7))["ok"]
    new = server.machine
    assert new is not old and client.conn.machine is old
    pool = next(iter(old_pools.pools.values()))
    assert server.g.pools.pools[pool.backend] is pool and pool.max_idle == 7  # carried, new limits
    factory = reactor.tcpClients[0][2]
    backend = factory.buildProtocol(None)
    bt = StringTransport()
    backend.makeConnection(bt)
    reactor.advance(0)
    assert bt.value().startswith(b"GET /x HTTP/1.1")
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nCache-Control: no-store\r\n\r\nold")
    [(status, _, body)] = parse_responses(ct.value())
    assert (status, body) == (200, b"old")
    assert client.conn.machine is new  # moved at the request boundary
    ct.clear()
    client.dataReceived(b"GET /hello.txt HTTP/1.1\r\nHost: t\r\n\r\n")  # the next one runs on the new machine
    assert new.entries[new.states["derive_request"].index] >= 1


def test_late_counts_of_a_retired_machine_are_folded_in(docroot, table):
    mem = MemoryServer(str(docroot), table=str(table))
    ask(mem, get("/hello.txt"))
    old = mem.server.machine
    edited(table)
    assert mem.server.reload()["ok"]
    new = mem.server.machine
    i, j = old.states["derive_request"].index, new.states["derive_request"].index
    assert new.entries[j] == 1
    old.entries[i] += 5  # as a request in flight on it would
    del old
    gc.collect()
    assert new.entries[j] == 6


def test_cached_object_is_still_a_hit_after_reload(docroot):
    mem = MemoryServer(str(docroot))
    ask(mem, get("/hello.txt"))
    cache = mem.server.runtime.cache
    assert mem.server.reload(http_settings(root=str(docroot), grace=5.0))["changed"] == ["cache.grace"]
    assert mem.server.runtime.cache is cache
    _, _, [(status, h, body)] = ask(mem, get("/hello.txt"))
    assert (status, h["cache-status"], body) == (200, "afpa; hit", b"hello world\n")
    stats = mem.server.request_stats["http"]
    assert stats.count == 2  # request statistics survive too


def test_smaller_cache_budget_evicts_down_to_it(docroot):
    mem = MemoryServer(str(docroot))
    ask(mem, get("/hello.txt"))
    ask(mem, get("/page.html"))
    cache = mem.server.runtime.cache
    assert len(cache) == 2
    assert mem.server.reload(http_settings(root=str(docroot), cache_bytes=1))["ok"]
    assert cache.budget == 1 and len(cache) == 0


def test_broken_table_changes_nothing_and_says_where(docroot, table):
    mem = MemoryServer(str(docroot), table=str(table))
    machine, g, settings = mem.server.machine, mem.server.g, mem.server.settings
    lines = table.read_text().splitlines(keepends=True)
    at = next(n for n, line in enumerate(lines) if line.lstrip().startswith("on = {"))
    lines[at] = lines[at].replace("on = {", 'on = { bogus = "nowhere", ', 1)
    table.write_text("".join(lines))
    result = mem.server.reload()
    assert result["ok"] is False
    assert {"file": str(table), "line": at + 1} == {k: result["problems"][0][k] for k in ("file", "line")}
    assert "unknown target state 'nowhere'" in result["problems"][0]["problem"]
    json.dumps(result)  # JSON-able as it is
    assert (mem.server.machine, mem.server.g, mem.server.settings, mem.server.generation) == (
        machine, g, settings, 0)
    _, _, [(status, _, _)] = ask(mem, get("/hello.txt"))
    assert status == 200


def test_broken_config_file_changes_nothing_and_names_file_and_line(docroot, tmp_path):
    from afpa.cli import build_parser, settings_from_args

    conf = tmp_path / "afpa.toml"
    conf.write_text(f'root = "{docroot}"\n\n[cache]\ngrace = 1\n')
    args = build_parser().parse_args(["serve", "--config", str(conf)])
    source = ConfigSource(str(conf), lambda: settings_from_args(args))
    clock_mem = MemoryServer(str(docroot))
    server = Server(settings_from_args(args), reactor=clock_mem.clock, helpers=InlineHelpers(), source=source)
    conf.write_text(f'root = "{docroot}"\n\n[cache]\ngrace = "soon"\n')
    result = server.reload()
    assert result["ok"] is False
    [p] = result["problems"]
    assert (p["file"], p["line"]) == (str(conf), 4) and p["problem"].startswith("cache.grace: expected")
    assert server.settings.module_settings.grace == 1.0
    conf.write_text(f'root = "{docroot}"\n\n[[route]]\nprefix = "/api"\nto = "remote"\n')
    [p] = server.reload()["problems"]
    assert (p["file"], p["line"]) == (str(conf), 3)
    assert p["problem"] == "route 1: a remote route needs 'backend' or 'backends'"
    conf.write_text(f'root = "{docroot}"\n\n[cache]\ngrace = 2\n')
    assert server.reload() == {"ok": True, "generation": 1, "changed": ["cache.grace"]}
    assert server.settings.module_settings.grace == 2.0


def test_format_and_locate_problems(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('listen = "x"\n[timeouts]\nidle = 0\n')
    p = config_problem(f"{conf}: timeouts.idle: expected a positive number of seconds, got 0", str(conf))
    assert format_problem(p) == f"{conf}:3: timeouts.idle: expected a positive number of seconds, got 0"
    assert format_problem(config_problem("--listen: bad", str(conf))) == "--listen: bad"


def call(server, method, path, token=TOKEN):
    status, _, out = admin_call(server, method, path, token)
    return status, json.loads(out)


def test_admin_post_reload(docroot, tmp_path, table):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    mem = MemoryServer(str(docroot), admin_token_file=str(token), table=str(table))
    assert call(mem.server, "GET", "/reload")[0] == 405
    assert call(mem.server, "POST", "/reload", token=None)[0] == 401
    assert call(mem.server, "POST", "/reload", token="wrong-token-0123456789")[0] == 403
    assert call(mem.server, "POST", "/reload") == (200, {"ok": True, "generation": 1, "changed": []})
    table.write_text("[machine]\n")
    status, result = call(mem.server, "POST", "/reload")
    assert status == 422 and result["ok"] is False and result["problems"][0]["file"] == str(table)
    assert mem.server.generation == 1


def test_two_phase_abort_and_stale_commit(docroot):
    mem = MemoryServer(str(docroot))
    first = mem.server.prepare_reload()
    second = mem.server.prepare_reload()
    first.abort()
    assert mem.server.generation == 0
    assert second.commit()["generation"] == 1
    third = mem.server.prepare_reload()
    fourth = mem.server.prepare_reload()
    third.commit()
    with pytest.raises(RuntimeError):
        fourth.commit()  # prepared against a generation that is gone


def test_afpa_check(docroot, tmp_path, capsys):
    assert main(["check", "--root", str(docroot)]) == 0
    assert capsys.readouterr().out == "afpa: configuration ok\n"
    conf = tmp_path / "afpa.toml"
    conf.write_text(f'root = "{docroot}"\ntable = "{tmp_path}/none.toml"\n\n[[route]]\nto = "nowhere"\n'
                    '\n[[tls.certificate]]\ncert = "/nonexistent.pem"\nkey = "/nonexistent.key"\n')
    assert main(["check", "--config", str(conf)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{tmp_path}/none.toml: cannot read")
    assert "/nonexistent.pem: TLS certificate: no such file" in err
    assert f"{conf}:4: route 1: 'to' must be docroot, remote or defer (got 'nowhere')" in err
    assert err[-1] == "afpa: configuration has 3 problem(s)"
    with pytest.raises(SystemExit) as exit_:
        main(["check", "--root", str(docroot), "--listen", "nope"])  # refused by the parser, as serve does
    assert exit_.value.code == 2


def test_a_new_access_log_format_takes_effect_and_records_states_only_when_asked(docroot, tmp_path):
    log = tmp_path / "access.log"
    mem = MemoryServer(str(docroot), access_log=str(log), access_log_format="$status $request")
    server = mem.server
    assert server.trace_all is False  # nothing prints the state path: nothing is recorded
    ask(mem, get("/hello.txt"))
    assert server.reload(attrs.evolve(server.settings, access_log_format="$status $states"))["ok"]
    assert server.trace_all is True
    ask(mem, get("/hello.txt"))
    bad = server.reload(attrs.evolve(server.settings, access_log_format="$status $nope"))
    assert not bad["ok"] and "unknown field $nope" in bad["problems"][0]["problem"]
    server.access_log.flush()
    first, second = log.read_text().splitlines()
    assert first == '200 GET /hello.txt HTTP/1.1'
    assert second.startswith("200 derive_request") and "send_engine" in second
