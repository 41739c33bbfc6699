"""What a third-party module gets from the runtime: its own tables found in its
package (``table_dir``), a machine that speaks first, and the socket-free harness
(:mod:`afpa.testing`) its tests run on."""

from __future__ import annotations

import attrs
import pytest

from afpa import cli, reload
from afpa.config import Settings
from afpa.machine import tables
from afpa.machine.modules import ProtocolModule, collect, state
from afpa.machine.scopes import Request
from afpa.net.intrinsics import default_registry
from afpa.testing import MemoryServer


@state("greet", "line")
def begin(g, conn, req):
    """First run of a connection: greet; later runs: read a line."""
    if conn.requests == 0:
        req.head = b"hello\r\n"
        return "greet"
    return "line"


@state("line", "need_more")
def echo(g, conn, req):
    """Answer one line with itself."""
    end = conn.inbuf.find(b"\n", conn.inpos)
    if end < 0:
        return "need_more"
    req.head = b"echo " + conn.inbuf[conn.inpos:end + 1]
    conn.inpos = end + 1
    return "line"


@attrs.define
class Global:
    runtime: object  # the Send Engine reads its settings and helpers from here


TABLE = """
[machine]
name = "kittest"
module = "kittest"
start = "begin"

[states.begin]
run = "begin"
on = { greet = "send", line = "echo" }

[states.echo]
run = "echo"
on = { line = "send", need_more = "@wait", timeout = "@close", peer_closed = "@close" }

[states.send]
run = "afpa.send_engine"
on = { sent = "@done", close = "@close", aborted = "@close" }
"""


@pytest.fixture
def module(tmp_path):
    d = tmp_path / "pkg" / "tables"
    d.mkdir(parents=True)
    (d / "kittest.toml").write_text(TABLE)
    return ProtocolModule(name="kittest", functions=collect([begin, echo]), table="kittest.toml",
                          make_global=lambda s, r: Global(r), make_request=lambda conn: Request(),
                          fail=lambda g, conn, req, reason: None, speaks_first=True, table_dir=str(d))


def test_a_speaks_first_module_greets_before_any_input(module):
    srv = MemoryServer(module)
    c = srv.connect()
    assert c.received() == b"hello\r\n"
    c.send(b"one\r\n")
    assert c.received() == b"echo one\r\n"
    c.send(b"tw")
    assert c.received() == b""
    c.send(b"o\r\n")
    assert c.received() == b"echo two\r\n" and not c.closed


def test_without_speaks_first_nothing_runs_until_input(module):
    srv = MemoryServer(attrs.evolve(module, speaks_first=False))
    c = srv.connect()
    assert c.received() == b""
    assert srv.counts()["begin"] == 0
    c.send(b"x\r\n")
    # The first run of the start state comes with the first bytes.
    assert c.received() == b"hello\r\necho x\r\n"


def test_the_module_table_is_found_in_its_table_dir_without_table(module):
    srv = MemoryServer(module)  # no table= given
    assert srv.server.machine.source == str(module.table_dir) + "/kittest.toml"
    reg = default_registry()
    reg.register(module)
    settings = Settings(module="kittest")
    machine, _ = reload.load_machines(settings, reg)
    assert machine.name == "kittest"
    assert reload.check(lambda: settings, reg) == []
    assert tables.known_tables(reg)["kittest"] == tables.module_table_path(module, "kittest")


def test_a_missing_module_table_is_reported_in_its_table_dir(module, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    reg = default_registry()
    reg.register(attrs.evolve(module, table_dir=str(empty)))
    [problem] = reload.check(lambda: Settings(module="kittest"), reg)
    assert problem["file"] == str(empty / "kittest.toml") and "cannot read" in problem["problem"]


def test_afpa_tables_list_show_check_graph_find_a_module_table(module, monkeypatch, capsys):
    def registry():
        reg = default_registry()
        reg.register(module)
        return reg

    monkeypatch.setattr(cli, "default_registry", registry)
    assert cli.main(["tables", "list"]) == 0
    assert "kittest" in capsys.readouterr().out.split()
    assert cli.main(["tables", "show", "kittest"]) == 0
    assert capsys.readouterr().out == TABLE
    assert cli.main(["tables", "check", "kittest"]) == 0
    assert capsys.readouterr().out == "kittest: ok\n"
    assert cli.main(["tables", "graph", "kittest"]) == 0
    assert "begin" in capsys.readouterr().out
