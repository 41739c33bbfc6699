"""The quotes module's machine, driven without sockets: afpa.testing runs a real
server on a fake clock and in-memory transports (bytes in, bytes out)."""

from __future__ import annotations

import pytest

from afpa.machine import tables
from afpa.machine.modules import Registry
from afpa.net.intrinsics import INTRINSICS
from afpa.testing import MemoryServer
from afpa_quotes.module import MODULE, SETTINGS, QuoteSettings

GREETING = b"+OK quotes ready\r\n"


@pytest.fixture
def quotes(tmp_path):
    (tmp_path / "wilde.txt").write_text("I can resist everything\nexcept temptation.\n")
    return tmp_path


@pytest.fixture
def srv(quotes):
    return MemoryServer(MODULE, module_settings=QuoteSettings(dir=str(quotes), ttl=30))


def test_the_table_is_valid():
    reg = Registry(intrinsics=dict(INTRINSICS))
    reg.register(MODULE)
    machine = tables.load(tables.module_table_path(MODULE, MODULE.table), reg)
    assert machine.start.name == "begin"


def test_a_miswired_table_is_refused_with_the_path_that_breaks_a_need():
    reg = Registry(intrinsics=dict(INTRINSICS))
    reg.register(MODULE)
    text = tables.module_table_path(MODULE, MODULE.table).read_text()
    # Skip the parser: lookup would run without a key.
    _, problems = tables.check_text(text.replace('line = "parse_command"', 'line = "lookup"'), "q.toml", reg)
    assert ("[states.lookup] run: needs 'key', missing on path begin -command-> read_line -line-> lookup"
            in "\n".join(map(str, problems)))


def test_greets_first_then_answers_from_the_file_then_from_the_cache(srv):
    c = srv.connect()
    assert c.received() == GREETING
    c.send(b"GET wilde\r\n")
    assert c.received() == b"+OK I can resist everything except temptation.\r\n"
    c.send(b"GET wilde\r\n")
    assert c.received() == b"+OK I can resist everything except temptation.\r\n"
    assert srv.g.reads == 1  # the second answer came from the cache
    assert srv.counts()["read_quote"] == 1 and srv.counts()["lookup"] == 2


def test_an_expired_quote_is_read_again(srv, quotes):
    c = srv.connect()
    c.send(b"GET wilde\n")
    (quotes / "wilde.txt").write_text("Experience is simply the name we give our mistakes.\n")
    srv.advance(31)
    c.send(b"GET wilde\n")
    assert c.received().endswith(b"+OK Experience is simply the name we give our mistakes.\r\n")
    assert srv.g.reads == 2


def test_unknown_key_and_bad_lines_get_an_error_and_the_connection_goes_on(srv):
    c = srv.connect()
    c.received()
    c.send(b"GET nobody\r\n")
    assert c.received() == b"-ERR no quote for nobody\r\n"
    for bad in (b"HELLO\r\n", b"GET ../etc/passwd\r\n", b"GET\r\n", b"QUIT now\r\n"):
        c.send(bad)
        assert c.received() == b"-ERR bad command (GET <key> or QUIT)\r\n"
    assert not c.closed


def test_a_line_in_pieces_waits_for_its_end(srv):
    c = srv.connect()
    c.received()
    for piece in (b"G", b"ET wi", b"lde\r"):
        c.send(piece)
        assert c.received() == b""
    c.send(b"\n")
    assert c.received().startswith(b"+OK I can resist")


def test_pipelined_commands_are_answered_in_order(srv):
    c = srv.connect()
    c.received()
    c.send(b"GET nobody\r\nGET wilde\r\nQUIT\r\nGET wilde\r\n")
    assert c.received() == (b"-ERR no quote for nobody\r\n"
                            b"+OK I can resist everything except temptation.\r\n+OK bye\r\n")
    assert c.closed


def test_a_line_too_long_is_refused_and_closed(quotes):
    srv = MemoryServer(MODULE, module_settings=QuoteSettings(dir=str(quotes), max_line=16))
    c = srv.connect()
    c.received()
    c.send(b"GET " + b"x" * 40)
    assert c.received() == b"-ERR line too long\r\n" and c.closed


def test_settings_come_from_the_module_section_and_flags(quotes):
    built = SETTINGS.build({"dir": str(quotes), "greeting": "hello there", "ttl": 5})
    srv = MemoryServer(MODULE, module_settings=built)
    assert srv.connect().received() == b"+OK hello there\r\n"
    with pytest.raises(ValueError, match="quotes.dir: not a directory"):
        SETTINGS.build({"dir": str(quotes / "missing")})
    with pytest.raises(ValueError, match="quotes.ttl: expected a positive number of seconds"):
        SETTINGS.build({"ttl": -1})


def test_a_client_that_stalls_mid_line_is_told_and_closed(srv):
    c = srv.connect()
    c.received()
    c.send(b"GET wil")
    srv.advance(srv.g.line_timeout + 1)
    assert c.received() == b"-ERR timeout\r\n" and c.closed
