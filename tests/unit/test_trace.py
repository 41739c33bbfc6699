"""Per-request traces (Afpa-Trace), the trace hub and its /trace stream, and the
access-log format (in memory, on a Clock)."""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.internet.testing import MemoryReactorClock, StringTransport

from afpa.ops import admin
from afpa.ops.accesslog import FormatError, compile_format
from afpa.config import SettingError
from afpa.net.helpers import InlineHelpers
from afpa.server import Server
from afpa.machine.trace import FilterError, TraceFilter, TraceHub, format_event
from afpa.ops.tracestream import Subscriber
from protocols.http.states import tracing
from tests.conftest import MemoryServer
from tests.httpclient import parse_responses
from protocols.http.settings import http_settings

TRACED = b"GET /hello.txt HTTP/1.1\r\nHost: t\r\nAfpa-Trace: 1\r\n\r\n"


def connect(server, host="127.0.0.1"):
    proto = server.factory().buildProtocol(None)
    t = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
    proto.makeConnection(t)
    return proto, t


def steps(header: str) -> list[str]:
    """State names of an Afpa-Trace value, times left out."""
    return [part.split(" ")[0] for part in header.split(" > ")]


def answers(t):
    return parse_responses(t.value())


# -- the Afpa-Trace header ------------------------------------------------------

def test_trace_header_from_loopback_shows_the_hit_path(docroot):
    mem = MemoryServer(str(docroot))
    proto, t = connect(mem.server)
    proto.dataReceived(TRACED)  # miss: the file is read and stored
    proto.dataReceived(TRACED)  # hit
    [(s1, h1, b1), (s2, h2, b2)] = answers(t)
    assert (s1, b1, s2, b2) == (200, b"hello world\n", 200, b"hello world\n")
    assert steps(h1["afpa-trace"]) == ["derive_request", "derive_cached_response", "derive_miss_response",
                                       "derive_uncached_response", "send_engine"]
    assert steps(h2["afpa-trace"]) == ["derive_request", "derive_cached_response", "send_engine"]
    assert h2["afpa-trace"].startswith("derive_request 0us > derive_cached_response 0us > send_engine")


def test_trace_header_from_an_untrusted_peer_is_ignored(docroot):
    mem = MemoryServer(str(docroot))
    proto, t = connect(mem.server, "192.0.2.7")
    proto.dataReceived(TRACED)
    proto.dataReceived(TRACED)
    assert all("afpa-trace" not in h for _, h, _ in answers(t))


def test_trusted_proxies_may_trace_and_loopback_can_be_refused(docroot):
    mem = MemoryServer(str(docroot), trusted_proxies=("192.0.2.0/24",), trace_loopback=False)
    proto, t = connect(mem.server, "192.0.2.7")
    proto.dataReceived(TRACED)
    [(_, h, _)] = answers(t)
    assert "afpa-trace" in h
    proto, t = connect(mem.server, "127.0.0.1")
    proto.dataReceived(TRACED)
    [(_, h, _)] = answers(t)
    assert "afpa-trace" not in h


def test_only_the_request_that_asked_is_traced(docroot):
    mem = MemoryServer(str(docroot))
    proto, t = connect(mem.server)
    plain = b"GET /hello.txt HTTP/1.1\r\nHost: t\r\n\r\n"
    proto.dataReceived(plain + TRACED + plain)  # pipelined
    hs = [h for _, h, _ in answers(t)]
    assert ["afpa-trace" in h for h in hs] == [False, True, False]


def test_error_answer_carries_the_trace(docroot):
    mem = MemoryServer(str(docroot))
    proto, t = connect(mem.server)
    proto.dataReceived(b"GET /nothing-here HTTP/1.1\r\nHost: t\r\nAfpa-Trace: 1\r\n\r\n")
    [(status, h, _)] = answers(t)
    assert status == 404
    assert steps(h["afpa-trace"])[-2:] == ["derive_uncached_response", "send_engine"]


class BrokenRouter:
    keyed = False

    def choose(self, host, path):
        raise RuntimeError("routing broke")


def test_a_state_that_raises_is_marked_in_the_trace(docroot):
    mem = MemoryServer(str(docroot))
    mem.server.g.router = BrokenRouter()
    proto, t = connect(mem.server)
    proto.dataReceived(b"GET /hello.txt HTTP/1.1\r\nHost: t\r\nAfpa-Trace: 1\r\n\r\n")
    [(status, h, _)] = answers(t)
    assert status == 500
    assert h["afpa-trace"].endswith("derive_miss_response 0us (raised)")


class Backend:
    """A server forwarding to a backend whose connection the test completes."""

    def __init__(self, root, **overrides):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_800_000_000)
        self.server = Server(http_settings(root=str(root), backend="http://127.0.0.1:9", **overrides),
                             reactor=self.reactor, helpers=InlineHelpers())

    def accept(self, n=0):
        proto = self.reactor.tcpClients[n][2].buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        self.reactor.advance(0)
        return proto, t


@pytest.mark.parametrize("peer", ["127.0.0.1", "192.0.2.7"])
def test_forwarded_miss_shows_backend_states_and_never_forwards_the_header(docroot, peer):
    rig = Backend(docroot)
    proto, t = connect(rig.server, peer)
    proto.dataReceived(b"GET /x HTTP/1.1\r\nHost: t\r\nAfpa-Trace: 1\r\n\r\n")
    backend, bt = rig.accept()
    assert bt.value().startswith(b"GET /x HTTP/1.1") and b"afpa-trace" not in bt.value().lower()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nAfpa-Trace: forged\r\n"
                         b"Cache-Control: max-age=60\r\n\r\nok")
    [(status, h, body)] = answers(t)
    assert (status, body) == (200, b"ok")
    if peer == "192.0.2.7":
        assert "afpa-trace" not in h  # neither ours nor the backend's
        return
    assert steps(h["afpa-trace"]) == [
        "derive_request", "derive_cached_response", "derive_miss_response", "derive_remote_response",
        "http-backend:backend_buffer_body", "http-backend:backend_connect", "http-backend:backend_send_request",
        "http-backend:backend_read_head"]
    assert "forged" not in h["afpa-trace"]


def test_forwarded_request_event_lists_both_machines(docroot):
    rig = Backend(docroot)
    events = []
    rig.server.trace_hub.subscribe(None, events.append)
    proto, t = connect(rig.server, "192.0.2.7")
    proto.dataReceived(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
    backend, _ = rig.accept()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    [ev] = events
    names = [s[0] for s in ev["states"]]
    assert names == ["derive_request", "derive_cached_response", "derive_miss_response", "derive_remote_response",
                     "http-backend:backend_buffer_body", "http-backend:backend_connect",
                     "http-backend:backend_send_request", "http-backend:backend_read_head",
                     "http-backend:backend_stream_body"]
    assert (ev["status"], ev["bytes"], ev["method"], ev["path"]) == (200, 2, "GET", "/x")
    assert ev["cache_status"].startswith("afpa; fwd=uri-miss; fwd-status=200")
    json.dumps(ev)  # JSON-able


# -- the hub --------------------------------------------------------------------

def test_subscribing_traces_every_request_and_leaving_stops_it(docroot):
    mem = MemoryServer(str(docroot))
    proto, t = connect(mem.server, "192.0.2.7")  # open before anyone subscribed
    events = []
    unsubscribe = mem.server.trace_hub.subscribe(TraceFilter(path="/hello"), events.append)
    assert mem.server.trace_all
    proto.dataReceived(b"GET /hello.txt HTTP/1.1\r\nHost: t\r\n\r\nGET /page.html HTTP/1.1\r\nHost: t\r\n\r\n")
    assert [e["path"] for e in events] == ["/hello.txt"]
    assert [s[0] for s in events[0]["states"]][-1] == "send_engine"
    assert "afpa-trace" not in answers(t)[0][1]  # the header only for who asked
    unsubscribe()
    assert not mem.server.trace_all and proto.step == proto.run
    proto.dataReceived(b"GET /hello.txt HTTP/1.1\r\nHost: t\r\n\r\n")
    assert len(events) == 1


def ev(status=200, host="a.example", path="/x", states=("derive_request", "send_engine")):
    return {"status": status, "host": host, "path": path, "states": [[s, 1] for s in states]}


def test_filters():
    assert TraceFilter(host="A.example").matches(ev())
    assert not TraceFilter(host="b.example").matches(ev())
    assert TraceFilter(path="/x").matches(ev(path="/x/y")) and not TraceFilter(path="/y").matches(ev())
    assert TraceFilter(status="404").matches(ev(404)) and not TraceFilter(status=404).matches(ev(200))
    assert TraceFilter(status="5xx").matches(ev(503)) and not TraceFilter(status="5xx").matches(ev(404))
    assert TraceFilter(state="send_engine").matches(ev())
    assert not TraceFilter(state="derive_remote_response").matches(ev())
    backend = ev(states=("derive_request", "http-backend:backend_connect"))
    assert TraceFilter(state="backend_connect").matches(backend)
    assert TraceFilter(state="http-backend:backend_connect").matches(backend)


@pytest.mark.parametrize("query, problem", [
    ({"status": "abc"}, "status"), ({"status": "6xx"}, "status"), ({"sample": "0"}, "sample"),
    ({"sample": "x"}, "sample"), ({"colour": "red"}, "unknown parameter 'colour'")])
def test_bad_filters_are_refused(query, problem):
    with pytest.raises(FilterError, match=problem):
        TraceFilter.from_query(query)


def test_sampling_keeps_one_in_n_of_the_matches():
    hub = TraceHub()
    got = []
    hub.subscribe(TraceFilter(status="200", sample=3), got.append)
    for i in range(10):
        hub.publish({**ev(), "n": i})
        hub.publish(ev(404))  # filtered out before sampling
    assert [e["n"] for e in got] == [2, 5, 8]


def test_hub_reports_interest_and_survives_a_broken_subscriber():
    changes = []
    hub = TraceHub(on_change=changes.append)
    got = []

    def broken(_ev):
        raise RuntimeError("subscriber broke")

    u1 = hub.subscribe(None, broken)
    u2 = hub.subscribe(None, got.append)
    hub.publish(ev())
    assert got == [ev()]
    u1()
    u1()  # twice is harmless
    u2()
    assert changes == [True, False]


class FakeRequest:
    """What Subscriber uses of a twisted.web request."""

    def __init__(self):
        self.written = []
        self.producer = None
        from twisted.internet.defer import Deferred
        self.finished = Deferred()

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def write(self, data):
        self.written.append(json.loads(data))

    def notifyFinish(self):
        return self.finished


def test_slow_reader_gets_a_bounded_queue_and_a_dropped_count():
    hub = TraceHub()
    req = FakeRequest()
    sub = Subscriber(req, hub, TraceFilter(), limit=5)
    assert req.written == [{"subscribed": {"sample": 1}}]
    hub.publish({**ev(), "n": 0})
    sub.pauseProducing()  # the client's socket is full
    for i in range(1, 21):
        hub.publish({**ev(), "n": i})
    assert len(sub.queue) == 5 and sub.dropped == 15
    sub.resumeProducing()
    assert [w.get("n") for w in req.written[1:7]] == [0, 1, 2, 3, 4, 5]
    assert req.written[7:] == [{"dropped": 15}]
    req.finished.callback(None)  # the client left
    assert not hub.active


def _admin_get(server, path, token=None):
    site = admin.admin_site(server)
    channel = site.buildProtocol(None)
    t = StringTransport()
    channel.makeConnection(t)
    auth = b"" if token is None else b"Authorization: Bearer " + token + b"\r\n"
    channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n" + auth + b"\r\n")
    return channel, t


def test_trace_stream_needs_the_token_and_streams_ndjson(docroot, tmp_path):
    token = b"0123456789abcdef0123"
    (tmp_path / "token").write_bytes(token)
    mem = MemoryServer(str(docroot), admin_token_file=str(tmp_path / "token"))
    _, t = _admin_get(mem.server, b"/trace")
    assert t.value().startswith(b"HTTP/1.1 401")
    _, t = _admin_get(mem.server, b"/trace", b"wrong-token-wrong-token")
    assert t.value().startswith(b"HTTP/1.1 403")
    _, t = _admin_get(mem.server, b"/trace?status=teapot", token)
    assert t.value().startswith(b"HTTP/1.1 400") and b"status" in t.value()
    assert not mem.server.trace_hub.active
    channel, t = _admin_get(mem.server, b"/trace?path=/hello&state=send_engine", token)
    assert mem.server.trace_all
    proto, _ = connect(mem.server)
    proto.dataReceived(b"GET /hello.txt HTTP/1.1\r\nHost: t\r\n\r\nGET /page.html HTTP/1.1\r\nHost: t\r\n\r\n")
    raw = t.value()
    assert raw.startswith(b"HTTP/1.1 200") and b"application/x-ndjson" in raw
    lines = [json.loads(line) for line in raw.split(b"\r\n") if line.startswith(b"{")]
    assert lines[0] == {"subscribed": {"path": "/hello", "state": "send_engine", "sample": 1}}
    assert [e["path"] for e in lines[1:]] == ["/hello.txt"]
    channel.connectionLost(Failure(ConnectionDone()))  # the client leaves
    assert not mem.server.trace_hub.active and not mem.server.trace_all


def test_format_event_is_one_readable_line():
    line = format_event({"time": 0.5, "peer": "127.0.0.1:1", "status": 200, "method": "GET", "host": "h",
                         "path": "/p", "query": "a=1", "cache_status": "afpa; hit", "bytes": 3,
                         "duration_ms": 0.2, "states": [["derive_request", 5], ["x", 1, "raised"]]})
    assert "\n" not in line
    assert line.endswith('127.0.0.1:1 GET h/p?a=1 200 "afpa; hit" 3B 0.2ms derive_request 5us > x 1us (raised)')


# -- the access-log format ---------------------------------------------------------

@pytest.mark.parametrize("fmt, problem", [
    ("$remote_addr $nonsense", "unknown field $nonsense"),
    ("$status $", "'$' without a field name at column 9"),
    ("${}", "empty field name"),
    ("$status\n$status", "one line"),
])
def test_format_errors_name_the_problem(fmt, problem):
    with pytest.raises(FormatError, match=problem.replace("$", r"\$")):
        compile_format(fmt, tracing.access_field)


def test_bad_format_stops_the_server_at_startup(docroot):
    with pytest.raises(SettingError) as exc:
        MemoryServer(str(docroot), access_log_format='$remote_addr "$reqest"')
    assert exc.value.field == "access_log_format" and "unknown field $reqest" in exc.value.problem


def test_default_line_is_combined_plus_cache_status_and_states(docroot, tmp_path):
    log = tmp_path / "access.log"
    mem = MemoryServer(str(docroot), access_log=str(log))
    assert mem.server.trace_all  # $states needs every request traced
    proto, _ = connect(mem.server)
    proto.dataReceived(b'GET /hello.txt HTTP/1.1\r\nHost: t\r\nUser-Agent: curl "quoted"\r\n'
                       b'Referer: http://r/\r\n\r\n')
    mem.server.access_log.flush()
    [line] = log.read_text().splitlines()
    assert line.startswith("127.0.0.1 - - [")
    assert ('] "GET /hello.txt HTTP/1.1" 200 12 "http://r/" "curl \\x22quoted\\x22" '
            '"afpa; fwd=uri-miss; stored" derive_request:0us>derive_cached_response:0us>') in line
    assert line.endswith(">send_engine:0us")


def test_custom_format_without_states_traces_nothing(docroot, tmp_path):
    log = tmp_path / "access.log"
    mem = MemoryServer(str(docroot), access_log=str(log),
                       access_log_format="$request_method ${uri}?$args $host $http_x_missing $cache_status")
    assert not mem.server.trace_all
    proto, _ = connect(mem.server)
    proto.dataReceived(b"GET /hello.txt?q=1 HTTP/1.1\r\nHost: t\r\n\r\n")
    mem.server.access_log.flush()
    assert log.read_text() == "GET /hello.txt?q=1 t - afpa; fwd=uri-miss; stored\n"
