"""Runtime events as table outcomes, on in-memory transports and a Clock: a
timeout, a closed peer and the backend machine's results are words the tables
map, never flags or callback slots."""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from afpa.machine import tables
from afpa.net.intrinsics import INTRINSICS, default_registry
from tests.conftest import MemoryServer
from tests.httpclient import parse_responses
from tests.unit.test_cache_variants import Backend, ask, req, resp
from tests.unit.test_range_machine import STORABLE, _pump
from tests.unit.test_remote_machine import GET, Rig


def taken(machine, state: str, outcome: str) -> int:
    """How often ``state`` took its ``outcome`` edge."""
    for i, (s, o, _) in enumerate(machine.edges):
        if (s, o) == (state, outcome):
            return machine.transitions[i]
    raise AssertionError(f"{machine.name} has no edge {state} -{outcome}->")


def client_machine(rig):
    return rig.server.machine


def backend_machine(rig):
    return rig.server.runtime.machines["http-backend"]


# -- the client machine: timeout ------------------------------------------------

def test_header_timeout_reaches_the_table_as_timeout_and_http_answers_408(docroot):
    mem = MemoryServer(str(docroot), header_timeout=5.0)
    proto, t = mem.connect()
    proto.dataReceived(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n")  # the head never ends
    mem.clock.advance(6)
    mem.server.sweep()
    machine = mem.server.machine
    assert taken(machine, "derive_request", "timeout") == 1
    assert taken(machine, "answer_timeout", "answered") == 1  # the 408 is the HTTP state's
    [(status, headers, _)] = parse_responses(t.value())
    assert status == 408 and headers["connection"] == "close" and t.disconnecting


def test_idle_keepalive_timeout_is_the_same_outcome_answered_quietly(docroot):
    mem = MemoryServer(str(docroot), idle_timeout=5.0)
    proto, t = mem.connect()
    proto.dataReceived(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
    t.clear()
    mem.clock.advance(6)
    mem.server.sweep()
    machine = mem.server.machine
    assert taken(machine, "derive_request", "timeout") == 1
    assert taken(machine, "answer_timeout", "quiet") == 1
    assert t.value() == b"" and t.disconnecting  # nothing to say to an idle client


def test_an_unmapped_timeout_closes_the_connection(docroot, tmp_path):
    text = tables.shipped_table_path("http").read_text()
    text = text.replace(', timeout = "answer_timeout"', "")
    start = text.index("[states.answer_timeout]")
    text = text[:start] + text[text.index("[states.", start + 1):]
    path = tmp_path / "no-timeout.toml"
    path.write_text(text)
    mem = MemoryServer(str(docroot), header_timeout=5.0, table=str(path))
    proto, t = mem.connect()
    proto.dataReceived(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n")
    mem.clock.advance(6)
    mem.server.sweep()
    assert t.value() == b"" and t.disconnecting  # the documented default: closed, no answer


# -- the backend machine: peer_closed and timeout ---------------------------------

def test_client_closing_mid_exchange_is_peer_closed_in_the_backend_table(docroot):
    rig = Rig(docroot)
    client, _ = rig.client()
    client.dataReceived(GET)
    backend, bt = rig.accept()
    client.connectionLost(Failure(ConnectionLost()))
    assert taken(backend_machine(rig), "backend_read_head", "peer_closed") == 1
    assert taken(backend_machine(rig), "backend_client_gone", "aborted") == 1
    assert bt.disconnecting  # the backend connection is cut, never pooled
    pool = next(iter(rig.server.g.pools.pools.values()))
    assert not pool.idle


def test_client_closing_while_the_connect_is_under_way_gives_the_connect_up(docroot):
    rig = Rig(docroot)
    client, _ = rig.client()
    client.dataReceived(GET)
    assert rig.pending() == 1
    client.connectionLost(Failure(ConnectionLost()))
    # backend_connect's wait declares peer_closed: the connect is cancelled.
    assert taken(backend_machine(rig), "backend_connect", "peer_closed") == 1
    assert rig.reactor.tcpClients[0][2]  # it was asked for ...
    pool = next(iter(rig.server.g.pools.pools.values()))
    assert pool.count == 0  # ... and its slot is free again


def test_backend_first_byte_timeout_is_an_outcome_of_the_backend_table(docroot):
    rig = Rig(docroot, backend_first_byte_timeout=5.0)
    client, ct = rig.client()
    client.dataReceived(GET)
    _, bt = rig.accept()
    rig.later(7)
    assert taken(backend_machine(rig), "backend_read_head", "timeout") == 1
    assert taken(backend_machine(rig), "backend_first_byte_timeout", "failed") == 1
    assert taken(client_machine(rig), "derive_remote_response", "failed") == 1
    [(status, _, body)] = parse_responses(ct.value())
    assert status == 504 and body == b"504 Gateway Timeout: backend did not answer in time\n"
    assert bt.disconnecting


def test_backend_body_stall_is_an_outcome_of_the_backend_table(docroot):
    rig = Rig(docroot, backend_idle_timeout=5.0)
    client, ct = rig.client()
    client.dataReceived(GET)
    backend, _ = rig.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    rig.later(7)
    assert taken(backend_machine(rig), "backend_stream_body", "timeout") == 1
    assert taken(backend_machine(rig), "backend_body_stalled", "aborted") == 1
    assert taken(client_machine(rig), "derive_remote_response", "aborted") == 1
    assert ct.disconnecting


# -- the backend machine's results: each its own outcome --------------------------

def _relayed(rig):
    ask(rig, GET)
    Backend(rig).answer(resp(b"ok"))


def _close(rig):
    ask(rig, req("Connection: close"))
    Backend(rig).answer(resp(b"ok"))


def _failed(rig):
    ask(rig, GET)
    rig.refuse()


def _aborted(rig):
    ask(rig, GET)
    backend, _ = rig.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    backend.connectionLost(Failure(ConnectionDone()))


def _upgraded(rig):
    ask(rig, req("Upgrade: websocket", "Connection: Upgrade"))
    backend, _ = rig.accept()
    backend.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    backend.connectionLost(Failure(ConnectionDone()))


def _answered(rig):
    _, ct = ask(rig, req("Range: bytes=2-4"))
    backend, _ = rig.accept()
    backend.dataReceived(STORABLE)
    _pump(ct)


def _stored_then_stale(rig, *fields):
    be = Backend(rig)
    _, ct = ask(rig, GET)
    be.answer(resp(b"stored", "Cache-Control: max-age=5", 'ETag: "v1"', *fields))
    _pump(ct)
    rig.later(10)
    be.proto.transport.loseConnection()
    be.proto.connectionLost(None)  # the next request connects again
    return be


def _refreshed(rig):
    be = _stored_then_stale(rig)
    ask(rig, GET)
    be.answer(resp(b"", 'ETag: "v1"', "Cache-Control: max-age=60", status="304 Not Modified"))


def _stale(rig):
    _stored_then_stale(rig, "Cache-Control: max-age=5, stale-if-error=60")
    ask(rig, GET)
    rig.refuse()


@pytest.mark.parametrize("word,run", [
    ("relayed", _relayed), ("close", _close), ("failed", _failed), ("aborted", _aborted),
    ("upgraded", _upgraded), ("answered", _answered), ("refreshed", _refreshed), ("stale", _stale),
])
def test_each_backend_result_is_its_own_outcome(docroot, word, run):
    """The word that ends the backend machine is the outcome of derive_remote_response."""
    rig = Rig(docroot)
    run(rig)
    client = client_machine(rig)
    assert taken(client, "derive_remote_response", word) == 1
    ends = [(s, o) for i, (s, o, t) in enumerate(backend_machine(rig).edges)
            if t in ("@done", "@close") and backend_machine(rig).transitions[i]]
    assert word in {o for _, o in ends}


# -- the table checker ------------------------------------------------------------

def _check(text: str):
    reg = default_registry()
    spec, problems = tables.check_text(text, "t.toml", reg)
    return problems, tables.notes(spec, reg) if spec is not None and not problems else []


def test_event_words_are_outcomes_where_they_can_happen():
    text = tables.shipped_table_path("http").read_text()
    problems, notes = _check(text)
    assert problems == [] and notes == []
    problems, notes = _check(tables.shipped_table_path("http-backend").read_text())
    assert problems == [] and notes == []


def test_checker_notes_an_unmapped_event_and_refuses_an_impossible_one():
    text = tables.shipped_table_path("http").read_text()
    unmapped = text.replace('timeout = "derive_remote_response", ', "")
    problems, notes = _check(unmapped)
    assert problems == []
    [note] = notes
    assert note.state == "derive_collapsed_response" and note.key == "on.timeout"
    assert "note: runtime event 'timeout' can happen here and is not mapped: the connection is closed" in str(note)
    # derive_cached_response never waits: a timeout can never reach it.
    impossible = text.replace('stale_hit = "refresh_stale" }', 'stale_hit = "refresh_stale", timeout = "@close" }')
    problems, _ = _check(impossible)
    [p] = problems
    assert p.state == "derive_cached_response" and "runtime event 'timeout' never reaches this state" in p.message


def test_intrinsic_send_engine_declares_no_events():
    """A stalled send is not the table's business: the connection is cut (default)."""
    assert INTRINSICS["send_engine"].events == frozenset()
