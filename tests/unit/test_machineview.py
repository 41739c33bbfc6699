"""machine_view: the running machines and their live counters as JSON-able data,
and merge_views adding up the views of several processes."""

from __future__ import annotations

import json

from afpa.machine import tables
from afpa.net.helpers import InlineHelpers
from afpa.net.intrinsics import default_registry
from afpa.ops.machineview import machine_view, merge_views
from afpa.machine.modules import ProtocolModule, collect, state
from afpa.server import Server
from tests.conftest import MemoryServer
from tests.httpclient import parse_responses
from protocols.http.settings import http_settings


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


def by_name(items, key="name"):
    return {item[key]: item for item in items}


def test_view_lists_every_machine_with_its_structure(mem):
    view = machine_view(mem.server)
    json.dumps(view)  # JSON-able as it is
    assert view["time"] == mem.clock.seconds()
    http, backend = view["machines"]
    assert (http["name"], backend["name"]) == ("http", "http-backend")
    assert http["module"] == "http" and http["start"] == "derive_request"
    assert http["doc"].startswith("HTTP/1.x")
    assert http["text"] == tables.shipped_table_path("http").read_text()
    assert http["source"].endswith("http.toml")
    states = by_name(http["states"])
    assert list(states) == list(mem.server.machine.states)
    assert states["derive_request"]["doc"].startswith("Parse one request")
    assert states["send_engine"]["function"] == "afpa.send_engine"
    assert all(s["entries"] == 0 and s["errors"] == 0 for s in http["states"])
    edges = {(t["from"], t["outcome"]): t for t in http["transitions"]}
    assert edges[("derive_request", "need_more")]["to"] == "@wait"
    assert edges[("derive_cached_response", "hit")]["to"] == "send_engine"
    assert len(edges) == len(mem.server.machine.edges)
    assert [x["name"] for x in http["specials"]] == ["@wait", "@done", "@close"]
    assert by_name(backend["states"])["backend_connect"]["doc"].startswith("Take a pooled connection")


def test_counts_follow_traffic(mem):
    proto, t = mem.connect()
    proto.dataReceived(get("/hello.txt") + get("/hello.txt") + b"GET /hello.txt HTTP/1.1\r\n")
    assert [r[0] for r in parse_responses(t.value())] == [200, 200]
    [http, _] = machine_view(mem.server)["machines"]
    states = by_name(http["states"])
    assert states["derive_request"]["entries"] == 3  # two complete requests and one waiting
    assert states["send_engine"]["entries"] == 2
    assert states["derive_uncached_response"]["entries"] == 1  # the first one, from disk
    assert states["refresh_stale"]["entries"] == 0
    edges = {(e["from"], e["outcome"]): e["count"] for e in http["transitions"]}
    assert edges[("derive_cached_response", "hit")] == 1
    assert edges[("derive_cached_response", "miss")] == 1
    assert edges[("derive_request", "need_more")] == 1
    specials = by_name(http["specials"])
    assert specials["@done"]["count"] == 2 and specials["@wait"]["count"] == 1
    assert specials["@close"]["count"] == 0
    assert http["requests"] == 2


@state("docroot", "remote", "deferred", "collapsed", "sibling")
def explode(g, conn, req):
    """Always raises."""
    raise RuntimeError("boom")


def test_a_raising_state_shows_its_errors(docroot):
    registry = default_registry()
    registry.register(ProtocolModule("testlib", collect([explode]), "", None, None, None))
    table = docroot.parent / "boom.toml"
    table.write_text(tables.shipped_table_path("http").read_text().replace(
        'run = "derive_miss_response"', 'run = "testlib.explode"'))
    mem = MemoryServer(str(docroot))
    mem.server = Server(http_settings(root=str(docroot), table=str(table)), reactor=mem.clock,
                        registry=registry, helpers=InlineHelpers())
    proto, t = mem.connect()
    proto.dataReceived(get("/hello.txt"))
    assert parse_responses(t.value())[0][0] == 500
    states = by_name(machine_view(mem.server)["machines"][0]["states"])
    assert states["derive_miss_response"] == {
        "name": "derive_miss_response", "function": "testlib.explode", "entries": 1, "errors": 1,
        "doc": states["derive_miss_response"]["doc"]}
    assert states["derive_miss_response"]["doc"].startswith("Ask routing")
    assert sum(s["errors"] for s in states.values()) == 1


def test_views_of_several_processes_add_up(mem, docroot):
    other = MemoryServer(str(docroot))
    for m, n in ((mem, 1), (other, 2)):
        proto, t = m.connect()
        proto.dataReceived(get("/hello.txt") * n)
    other.clock.advance(5)
    a, b = machine_view(mem.server), machine_view(other.server)
    merged = merge_views([a, b])
    assert merged["time"] == b["time"]
    http = merged["machines"][0]
    assert [m["name"] for m in merged["machines"]] == ["http", "http-backend"]
    assert by_name(http["states"])["send_engine"]["entries"] == 3
    assert by_name(http["specials"])["@done"]["count"] == 3
    assert http["requests"] == 3
    edges = {(e["from"], e["outcome"]): e["count"] for e in http["transitions"]}
    assert edges[("derive_cached_response", "hit")] == 1  # the second process's second request
    assert edges[("derive_cached_response", "miss")] == 2
    # The inputs are left as they were.
    assert by_name(a["machines"][0]["states"])["send_engine"]["entries"] == 1
    assert merge_views([]) == {"time": 0.0, "machines": []}
