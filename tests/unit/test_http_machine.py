"""The HTTP machine end to end on in-memory transports and a Clock."""

from __future__ import annotations

import os

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.internet.testing import StringTransport
from prometheus_client import CollectorRegistry, generate_latest

from afpa.machine import tables
from afpa.net.helpers import InlineHelpers
from afpa.ops.metrics import Collector
from afpa.net.intrinsics import default_registry
from afpa.machine.modules import ProtocolModule, collect, state
from afpa.server import Server
from tests.conftest import MemoryServer
from tests.httpclient import parse_responses
from protocols.http.settings import http_settings


def ask(mem, data: bytes, head_only=()):
    proto, t = mem.connect()
    proto.dataReceived(data)
    return proto, t, parse_responses(t.value(), head_only)


def get(path: str, *headers: str, method="GET", version="1.1") -> bytes:
    extra = "".join(h + "\r\n" for h in headers)
    return f"{method} {path} HTTP/{version}\r\nHost: test\r\n{extra}\r\n".encode()


def test_miss_then_hit(mem):
    _, _, [(status, h, body)] = ask(mem, get("/hello.txt"))
    assert (status, body) == (200, b"hello world\n")
    assert h["cache-status"] == "afpa; fwd=uri-miss; stored"
    assert h["content-type"] == "text/plain; charset=utf-8"
    assert h["content-length"] == "12" and "etag" in h and "last-modified" in h and "date" in h
    mem.clock.advance(1)
    _, _, [(status, h, body)] = ask(mem, get("/hello.txt"))
    assert (status, body, h["cache-status"], h["age"]) == (200, b"hello world\n", "afpa; hit", "1")


class _NeverHelpers:
    """Helper threads that never finish: anything needing one would hang."""

    def run(self, fn, *args):
        return Deferred()


def test_hit_is_answered_inside_data_received(mem):
    """The fast path: a hit is written before dataReceived returns, with no
    helper thread involved (the helpers here never answer)."""
    ask(mem, get("/hello.txt"))
    mem.server.g.helpers = _NeverHelpers()
    machine = mem.server.machine
    uncached = machine.states["derive_uncached_response"].index
    before = machine.entries[uncached]
    proto, t = mem.connect()
    proto.dataReceived(get("/hello.txt") + get("/hello.txt"))
    [(_, h1, b1), (_, h2, b2)] = parse_responses(t.value())
    assert b1 == b2 == b"hello world\n" and h1["cache-status"] == h2["cache-status"] == "afpa; hit"
    assert not proto.conn.busy and machine.entries[uncached] == before
    proto.dataReceived(get("/page.html"))  # a miss needs a helper: it waits
    assert proto.conn.busy


def test_keep_alive_and_pipelining_in_order(mem):
    ask(mem, get("/page.html"))  # one of them cached, the others not
    data = get("/hello.txt") + get("/page.html") + get("/dir/") + get("/missing")
    proto, t, resps = ask(mem, data)
    assert [r[0] for r in resps] == [200, 200, 200, 404]
    assert [r[2] for r in resps][:3] == [b"hello world\n", b"<h1>page</h1>\n", b"<p>index</p>\n"]
    assert [r[1]["cache-status"] for r in resps][:2] == ["afpa; fwd=uri-miss; stored", "afpa; hit"]
    assert not t.disconnecting


def test_pipelined_byte_at_a_time(mem):
    data = get("/hello.txt") + get("/page.html")
    proto, t = mem.connect()
    for i in range(len(data)):
        proto.dataReceived(data[i:i + 1])
    assert [r[2] for r in parse_responses(t.value())] == [b"hello world\n", b"<h1>page</h1>\n"]


def test_head(mem):
    for _ in range(2):  # miss, then hit
        _, t, [(status, h, body)] = ask(mem, get("/hello.txt", method="HEAD"), head_only=(True,))
        assert status == 200 and h["content-length"] == "12"
        assert t.value().endswith(b"\r\n\r\n")
    ask(mem, get("/hello.txt"))
    _, t, [(status, h, _)] = ask(mem, get("/hello.txt", method="HEAD"), head_only=(True,))
    assert h["cache-status"] == "afpa; hit" and t.value().endswith(b"\r\n\r\n")


def test_conditional_get(mem):
    _, _, [(_, h, _)] = ask(mem, get("/hello.txt"))
    etag, lm = h["etag"], h["last-modified"]
    _, _, [(status, h2, body)] = ask(mem, get("/hello.txt", f"If-None-Match: W/{etag}, \"zzz\""))
    assert (status, body, h2["etag"]) == (304, b"", etag)
    _, _, [(status, _, _)] = ask(mem, get("/hello.txt", f"If-Modified-Since: {lm}"))
    assert status == 304
    _, _, [(status, _, _)] = ask(mem, get("/hello.txt", 'If-None-Match: "other"', f"If-Modified-Since: {lm}"))
    assert status == 200  # If-None-Match wins over If-Modified-Since
    _, _, [(status, _, _)] = ask(mem, get("/hello.txt", 'If-Match: "other"'))
    assert status == 412


def test_methods(mem):
    _, t, [(status, h, _), (_, _, body)] = ask(
        mem, b"POST /hello.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc" + get("/hello.txt"))
    assert status == 405 and h["allow"] == "GET, HEAD"
    assert body == b"hello world\n"  # the POST body was drained, the connection kept
    _, _, [(status, _, _)] = ask(mem, get("/hello.txt", method="BREW"))
    assert status == 501


def test_chunked_body_drained_between_requests(mem):
    data = (b"DELETE /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n" + get("/hello.txt"))
    _, t, resps = ask(mem, data)
    assert [r[0] for r in resps] == [405, 200]


def test_malformed_gets_400_and_close(mem):
    proto, t, [(status, h, body)] = ask(mem, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert status == 400 and h["connection"] == "close" and b"more than one Host" in body
    assert t.disconnecting


@pytest.mark.parametrize("path,status", [
    ("/../etc/passwd", 400),
    ("/%2e%2e/etc/passwd", 400),
    ("/dir/%2e%2e/%2e%2e/etc/passwd", 400),
    ("/dir%2f..%2f..%2fetc/passwd", 400),
    ("/hello.txt%00.html", 400),
    ("/outside", 403),
    ("/noindex/", 403),
    ("/dir", 301),
    ("/dir/./../hello.txt", 200),
])
def test_no_escape_from_root(mem, docroot, tmp_path, path, status):
    (tmp_path / "secret").write_text("secret")
    os.symlink(tmp_path / "secret", docroot / "outside")
    _, _, [(got, h, body)] = ask(mem, get(path))
    assert got == status
    assert b"secret" not in body
    if status == 301:
        assert h["location"] == "/dir/"


def test_http10_closes_unless_keep_alive(mem):
    _, t, [(_, h, _)] = ask(mem, b"GET /hello.txt HTTP/1.0\r\n\r\n")
    assert h["connection"] == "close" and t.disconnecting
    _, t, [(_, h, _)] = ask(mem, b"GET /hello.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert h["connection"] == "keep-alive" and not t.disconnecting


def test_header_timeout_408(mem):
    proto, t = mem.connect()
    proto.dataReceived(b"GET /hello.txt HTTP/1.1\r\nHost: t\r\n")
    mem.server.start_sweep()
    mem.clock.advance(mem.settings.module_settings.header_timeout + 1)
    [(status, h, _)] = parse_responses(t.value())
    assert status == 408 and t.disconnecting


def test_idle_timeout_closes_quietly(mem):
    proto, t = mem.connect()
    proto.dataReceived(get("/hello.txt"))
    answered = t.value()
    mem.server.start_sweep()
    mem.clock.advance(mem.settings.idle_timeout - 1)
    assert not t.disconnecting
    mem.clock.advance(2)
    assert t.disconnecting and t.value() == answered


def tls_connect(mem):
    # A TLS listener's connection as the engine sees it: Twisted's TLS wrapper
    # calls handshakeCompleted() once the handshake is done.
    proto = mem.server.factory(tls=True).buildProtocol(None)
    t = StringTransport()
    proto.makeConnection(t)
    return proto, t


def test_tls_handshake_never_completed_is_closed(mem):
    assert mem.settings.tls_handshake_timeout < mem.settings.idle_timeout
    _, t = tls_connect(mem)
    mem.server.start_sweep()
    mem.clock.advance(mem.settings.tls_handshake_timeout + 1)
    assert t.disconnecting and t.value() == b""
    assert not mem.server.connections


def test_tls_handshake_completed_then_idle_timeout_applies(mem):
    proto, t = tls_connect(mem)
    mem.server.start_sweep()
    mem.clock.advance(1)
    proto.handshakeCompleted()
    mem.clock.advance(mem.settings.tls_handshake_timeout + 1)
    assert not t.disconnecting
    proto.dataReceived(get("/hello.txt"))
    [(status, _, _)] = parse_responses(t.value())
    assert status == 200 and not t.disconnecting
    mem.clock.advance(mem.settings.idle_timeout + 1)
    assert t.disconnecting


def test_stale_object_revalidated_then_refetched(mem, docroot):
    ask(mem, get("/hello.txt"))
    mem.clock.advance(mem.settings.module_settings.revalidate_after + 1)
    _, _, [(_, h, body)] = ask(mem, get("/hello.txt"))
    assert h["cache-status"] == "afpa; fwd=stale; detail=revalidated" and body == b"hello world\n"
    _, _, [(_, h, _)] = ask(mem, get("/hello.txt"))
    assert h["cache-status"] == "afpa; hit"
    (docroot / "hello.txt").write_bytes(b"changed\n")
    mem.clock.advance(mem.settings.module_settings.revalidate_after + 1)
    _, _, [(_, h, body)] = ask(mem, get("/hello.txt"))
    assert h["cache-status"] == "afpa; fwd=stale; stored" and body == b"changed\n"


def test_large_object_sent_in_fragments_with_flow_control(docroot):
    data = os.urandom(300 * 1024)
    (docroot / "big.bin").write_bytes(data)
    mem = MemoryServer(str(docroot))
    proto, t = mem.connect()
    proto.dataReceived(get("/big.bin") + get("/hello.txt"))
    # The pull producer writes one fragment per 'send window open' event.
    rounds = 0
    while t.producer is not None and rounds < 100:
        t.producer.resumeProducing()
        rounds += 1
    resps = parse_responses(t.value())
    assert resps[0][2] == data and resps[1][2] == b"hello world\n"
    assert rounds >= 4  # 300 KiB went out as several <= 64 KiB writes
    assert mem.server.runtime.cache.pinned_bytes == 0


def test_file_above_max_object_is_streamed_uncached(docroot):
    data = os.urandom(100 * 1024)
    (docroot / "big.bin").write_bytes(data)
    mem = MemoryServer(str(docroot), max_object_bytes=32 * 1024)
    for _ in range(2):
        proto, t = mem.connect()
        proto.dataReceived(get("/big.bin"))
        for _ in range(100):
            if t.producer is None:
                break
            t.producer.resumeProducing()
        [(status, h, body)] = parse_responses(t.value())
        assert body == data and h["cache-status"] == "afpa; fwd=uri-miss; detail=too-large"
    assert len(mem.server.runtime.cache) == 0


# -- a state function that raises -------------------------------------------

@state("docroot", "remote", "deferred", "collapsed", "sibling")
def explode(g, conn, req):
    """Always raises."""
    raise RuntimeError("boom")


def test_raising_state_gives_500_and_others_carry_on(docroot):
    registry = default_registry()
    registry.register(ProtocolModule("testlib", collect([explode]), "", None, None, None))
    text = tables.shipped_table_path("http").read_text().replace(
        'run = "derive_miss_response"', 'run = "testlib.explode"')
    table = docroot.parent / "boom.toml"
    table.write_text(text)
    clock_server = MemoryServer(str(docroot))
    server = Server(http_settings(root=str(docroot), table=str(table)), reactor=clock_server.clock,
                    registry=registry, helpers=InlineHelpers())
    clock_server.server = server
    good, tg = clock_server.connect()
    bad, tb = clock_server.connect()
    good.dataReceived(b"GET /hello.txt HTTP/1.1\r\nHost: t\r\n")  # in progress
    bad.dataReceived(get("/hello.txt"))
    [(status, h, _)] = parse_responses(tb.value())
    assert status == 500 and h["connection"] == "close" and tb.disconnecting
    assert server.machine.errors[server.machine.states["derive_miss_response"].index] == 1
    good.dataReceived(b"\r\n")  # the other connection is unaffected (it fails the same way, on its own)
    assert parse_responses(tg.value())[0][0] == 500


def test_edited_table_bypassing_the_cache(docroot):
    text = tables.shipped_table_path("http").read_text().replace(
        'complete = "derive_cached_response"', 'complete = "derive_miss_response"')
    # derive_cached_response is now unreachable: it must be removed to validate.
    start = text.index("[states.derive_cached_response]")
    end = text.index("[states.derive_miss_response]")
    text = text[:start] + text[end:]
    table = docroot.parent / "nocache.toml"
    table.write_text(text)
    mem = MemoryServer(str(docroot), table=str(table))
    for _ in range(2):
        _, _, [(status, h, body)] = ask(mem, get("/hello.txt"))
        assert (status, body, h["cache-status"]) == (200, b"hello world\n", "afpa; fwd=bypass")
    assert len(mem.server.runtime.cache) == 0


def test_metrics_exposition(mem):
    ask(mem, get("/hello.txt"))
    ask(mem, get("/hello.txt"))
    ask(mem, b"GET / HTTP/1.1\r\n\r\n")
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(mem.server))
    text = generate_latest(reg).decode()
    assert 'afpa_state_transitions_total{machine="http",outcome="hit",state="derive_cached_response"} 1.0' in text
    assert 'afpa_state_entries_total{machine="http",state="derive_request"} 3.0' in text
    assert "afpa_cache_hits_total 1.0" in text and "afpa_cache_misses_total 1.0" in text
    assert "afpa_cache_stored_total 1.0" in text and "afpa_cache_objects 1.0" in text
    assert 'afpa_requests_total{machine="http",status_class="2xx"} 2.0' in text
    assert 'afpa_requests_total{machine="http",status_class="4xx"} 1.0' in text
    assert 'afpa_request_duration_seconds_count{machine="http"} 3.0' in text


# -- a table wired past a state's needs ---------------------------------------------

@state("done")
def forget_answer(g, conn, req):
    """A contract-less third-party function that (wrongly) leaves no response."""
    return "done"


def test_stale_wired_to_send_engine_is_refused_at_load(docroot):
    table = docroot.parent / "stale.toml"
    table.write_text(tables.shipped_table_path("http").read_text().replace(
        'stale = "derive_miss_response"', 'stale = "send_engine"'))
    with pytest.raises(tables.TableError, match="needs 'response', missing on path"):
        MemoryServer(str(docroot), table=str(table))


def test_send_engine_without_a_response_is_a_counted_500_not_a_hang(docroot):
    """A state the checker must trust (no contract) sends the request on without an
    answer: the Send Engine refuses, the error is logged and counted, the client gets
    a 500 and the connection closes, instead of waiting for the idle timeout."""
    registry = default_registry()
    registry.register(ProtocolModule("testlib", collect([forget_answer]), "", None, None, None))
    text = tables.shipped_table_path("http").read_text().replace(
        'stale = "derive_miss_response"', 'stale = "forgetful"')
    text += '\n[states.forgetful]\nrun = "testlib.forget_answer"\non = { done = "send_engine" }\n'
    table = docroot.parent / "forgetful.toml"
    table.write_text(text)
    mem = MemoryServer(str(docroot))
    mem.server = Server(http_settings(root=str(docroot), table=str(table)), reactor=mem.clock,
                        registry=registry, helpers=InlineHelpers())
    machine = mem.server.machine
    ask(mem, get("/hello.txt"))
    mem.clock.advance(mem.settings.module_settings.revalidate_after + 1)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        _, t, [(status, h, _)] = ask(mem, get("/hello.txt"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert status == 500 and h["connection"] == "close" and t.disconnecting
    errors = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]
    assert len(errors) == 1 and "state send_engine needs 'response'" in errors[0]
    assert machine.errors[machine.states["send_engine"].index] == 1
    assert sum(machine.errors) == 1


def test_cache_status_of_a_stale_file_refused_by_the_request(mem):
    """A request whose own Cache-Control refused a stored file says fwd=request
    however the file check ends (RFC 9211), as a forwarded response does."""
    ask(mem, get("/hello.txt"))
    _, _, [(_, h, _)] = ask(mem, get("/hello.txt", "Cache-Control: no-cache"))
    assert h["cache-status"] == "afpa; fwd=request; detail=revalidated"
    _, _, [(status, h, _)] = ask(mem, get("/missing.txt", "Cache-Control: no-cache"))
    assert (status, h["cache-status"]) == (404, "afpa; fwd=uri-miss")
