"""The supervisor's admin view over several workers, with a fake cluster: two
(or more) in-memory Servers behind a fake ``call`` that runs the real worker ops."""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport

from afpa.ops import admin, metrics
from afpa.process import clusteradmin
from afpa.cache.store import CacheObject
from afpa.ops.clustermetrics import ClusterMetrics, Families
from afpa.ops.metrics import Collector
from tests.conftest import MemoryServer
from tests.httpclient import parse_responses

TOKEN = "cluster-token-0123456789"


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()


def ask(mem, data: bytes) -> None:
    proto, t = mem.connect()
    proto.dataReceived(data)
    return proto, t


class FakeWorker:
    def __init__(self, index: int, mem: MemoryServer, pid: int):
        self.index, self.mem, self.pid = index, mem, pid
        self.up, self.restarts, self.started = True, 0, mem.clock.seconds()
        self.hang = False  # answers nothing: the fake's call times it out


class FakeCluster:
    """D1's supervisor as the admin site sees it: ``call``, ``workers``, exit hooks."""

    def __init__(self, mems, clock, hooks=True):
        self.clock = clock
        self.workers = [FakeWorker(i, m, 1000 + i) for i, m in enumerate(mems)]
        self.ops = clusteradmin.worker_ops()
        self.hooks = []
        self.draining = False
        self.calls = []
        if hooks:
            self.add_exit_hook = self.hooks.append

    def call(self, op, args, timeout):
        self.calls.append(op)
        replies = []
        for w in self.workers:
            if not w.up:
                replies.append({"worker": w.index, "error": "worker is not running"})
            elif not w.hang:
                replies.append({**json.loads(json.dumps(self.ops[op](w.mem.server, args))), "worker": w.index})
        if not any(w.hang for w in self.workers if w.up):
            return succeed(replies)
        d = Deferred()

        def expire():  # the hung workers' replies after the timeout
            d.callback(replies + [{"worker": w.index, "error": f"no answer in {timeout}s"}
                                  for w in self.workers if w.up and w.hang])
        self.clock.callLater(timeout, expire)
        return d

    def kill(self, index):
        self.workers[index].up = False
        for hook in self.hooks:
            hook(index)

    def replace(self, index, mem):
        w = self.workers[index]
        w.mem, w.up, w.pid = mem, True, w.pid + 100
        w.restarts += 1


@pytest.fixture
def pair(docroot):
    a, b = MemoryServer(str(docroot)), MemoryServer(str(docroot))
    return a, b


def scrape(view: ClusterMetrics) -> dict[str, float]:
    """Every sample of one merged scrape: 'name{labels}' -> value."""
    out = {}
    d = view.scrape()
    snap = []
    d.addCallback(snap.append)
    for f in snap[0]["families"]:
        for name, labels, value in f["samples"]:
            out[name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
                        if labels else "")] = value
    return out


def counters(sample: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in sample.items() if re.match(r"[^{]*(_total|_bucket|_count|_sum)\b", k)}


# -- metrics as data --------------------------------------------------------------------

def test_a_single_process_renders_its_snapshot_exactly_as_the_collector(mem):
    ask(mem, get("/hello.txt"))
    ask(mem, get("/hello.txt"))
    ask(mem, b"GET / HTTP/1.1\r\n\r\n")
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(mem.server))
    snap = json.loads(json.dumps(metrics.snapshot(mem.server)))  # JSON-able, survives a pipe
    names = {f["name"] for f in snap["families"]}
    assert {"afpa_state_entries", "afpa_request_duration_seconds", "afpa_cache_collapsed"} <= names  # module's too
    assert metrics.exposition(snap) == generate_latest(reg)
    text = admin.admin_site(mem.server).resource.children[b"metrics"].render_GET(_Req()).decode()
    assert text == generate_latest(reg).decode()


class _Req:
    def setHeader(self, *_):
        pass


# -- merging ------------------------------------------------------------------------------

def test_merged_counters_histograms_and_gauges(pair):
    a, b = pair
    ask(a, get("/hello.txt"))
    ask(a, get("/hello.txt"))
    ask(b, get("/hello.txt"))
    ask(b, b"GET / HTTP/1.1\r\n\r\n")
    view = ClusterMetrics(FakeCluster(pair, a.clock))
    s = scrape(view)
    assert s['afpa_requests_total{machine="http",status_class="2xx"}'] == 3
    assert s['afpa_requests_total{machine="http",status_class="4xx"}'] == 1
    assert s['afpa_request_duration_seconds_count{machine="http"}'] == 4
    assert s['afpa_request_duration_seconds_bucket{le="+Inf",machine="http"}'] == 4
    assert s["afpa_cache_hits_total"] == 1 and s["afpa_cache_misses_total"] == 2
    assert s["afpa_cache_objects"] == 2  # each worker stored hello.txt
    assert s["afpa_cache_bytes"] == a.server.runtime.cache.bytes + b.server.runtime.cache.bytes
    assert s["afpa_cache_budget_bytes"] == 2 * a.server.runtime.cache.budget
    assert s['afpa_worker_cache_objects{worker="0"}'] == 1 and s['afpa_worker_cache_objects{worker="1"}'] == 1
    assert s['afpa_state_entries_total{machine="http",state="derive_request"}'] == 4
    assert s["afpa_workers"] == 2 and s['afpa_worker_up{worker="1"}'] == 1
    assert s['afpa_worker_restarts_total{worker="0"}'] == 0
    assert s["afpa_connections_total"] == 4


def test_open_connections_summed_and_per_worker(pair):
    a, b = pair
    keep = [a.connect(), a.connect(), b.connect()]
    s = scrape(ClusterMetrics(FakeCluster(pair, a.clock)))
    assert s["afpa_connections_open"] == 3
    assert s['afpa_worker_connections_open{worker="0"}'] == 2
    assert s['afpa_worker_connections_open{worker="1"}'] == 1
    assert keep


def test_unknown_gauges_are_kept_per_worker_not_summed():
    merged = Families()
    for i, v in enumerate((3, 5)):
        merged.add_snapshot({"families": [{"name": "afpa_mystery", "type": "gauge", "help": "?",
                                           "samples": [["afpa_mystery", {}, v]]}]}, worker=i)
    assert merged.snapshot()["families"][0]["samples"] == [
        ["afpa_mystery", {"worker": "0"}, 3], ["afpa_mystery", {"worker": "1"}, 5]]


# -- workers dying, being replaced, not answering ------------------------------------------

def test_counters_do_not_go_backwards_when_a_worker_dies_and_is_replaced(pair, docroot):
    a, b = pair
    for _ in range(3):
        ask(b, get("/hello.txt"))
    cluster = FakeCluster(pair, a.clock)
    view = ClusterMetrics(cluster)
    before = scrape(view)
    assert before["afpa_cache_hits_total"] == 2
    cluster.kill(1)
    during = scrape(view)
    assert during["afpa_workers"] == 0 + 1 and during['afpa_worker_up{worker="1"}'] == 0
    cluster.replace(1, MemoryServer(str(docroot)))
    ask(cluster.workers[1].mem, get("/hello.txt"))
    after = scrape(view)
    for name, value in counters(before).items():
        if not name.startswith(("afpa_worker_", "afpa_workers_")):
            assert during[name] >= value and after[name] >= value, name
    assert after["afpa_cache_misses_total"] == 2  # the dead worker's 1 + its replacement's 1
    assert after["afpa_cache_hits_total"] == 2
    assert after["afpa_workers_retired_total"] == 1
    assert after['afpa_worker_restarts_total{worker="1"}'] == 1
    assert after["afpa_cache_objects"] == 1  # the dead worker's cache is gone with it
    assert after['afpa_worker_scrape_errors_total{worker="1"}'] == 0  # being down is not a scrape error


def test_a_replacement_is_noticed_without_an_exit_hook(pair, docroot):
    a, b = pair
    ask(b, get("/hello.txt"))
    cluster = FakeCluster(pair, a.clock, hooks=False)
    view = ClusterMetrics(cluster)
    assert scrape(view)["afpa_cache_misses_total"] == 1
    cluster.replace(1, MemoryServer(str(docroot)))  # a new server: a new identity
    s = scrape(view)
    assert s["afpa_cache_misses_total"] == 1 and s["afpa_workers_retired_total"] == 1
    assert scrape(view)["afpa_cache_misses_total"] == 1  # retired once, not at every scrape


def test_a_late_answer_from_a_retired_worker_is_not_counted_twice(pair):
    a, b = pair
    ask(b, get("/hello.txt"))
    cluster = FakeCluster(pair, a.clock)
    view = ClusterMetrics(cluster)
    scrape(view)
    late = {**clusteradmin.op_snapshot(b.server, {}), "worker": 1}
    cluster.kill(1)
    merged = view.observe([{**clusteradmin.op_snapshot(a.server, {}), "worker": 0}, late])
    misses = [f for f in merged["families"] if f["name"] == "afpa_cache_misses"][0]
    assert misses["samples"][0][2] == 1


def test_a_worker_that_does_not_answer_is_counted_and_the_scrape_still_answers(pair):
    a, b = pair
    for _ in range(2):
        ask(b, get("/hello.txt"))
    cluster = FakeCluster(pair, a.clock)
    site = clusteradmin.supervisor_admin_site(cluster, a.settings, machines=a.server.machines)
    status, _, text = request(site, a.clock, "GET", "/metrics")
    assert status == 200 and "afpa_cache_hits_total 1.0" in text.decode()
    cluster.workers[1].hang = True
    ask(b, get("/hello.txt"))  # counted by the worker, but it will not say so
    channel, t = open_request(site, a.clock, "GET", "/metrics")
    assert t.value() == b""  # waiting for the workers
    a.clock.advance(clusteradmin.SCRAPE_TIMEOUT)
    [(status, _, body)] = parse_responses(t.value())
    text = body.decode()
    assert status == 200
    assert 'afpa_worker_scrape_errors_total{worker="1"} 1.0' in text
    assert "afpa_cache_hits_total 1.0" in text  # its last known counters, not fewer
    assert 'afpa_worker_cache_objects{worker="1"}' not in text  # but no stale gauges
    assert 'afpa_worker_cache_objects{worker="0"} 0.0' in text


class RecycledCluster(FakeCluster):
    """Worker 1 answers with a fixed snapshot (one miss) under its pid as identity:
    a fresh worker at every replacement without building a server each time."""

    def __init__(self, mems, clock):
        super().__init__(mems, clock)
        ask(mems[1], get("/hello.txt"))
        self.template = clusteradmin.op_snapshot(mems[1].server, {})

    def call(self, op, args, timeout):
        d = super().call(op, args, timeout)
        w = self.workers[1]
        return d.addCallback(lambda replies: [
            {**self.template, "id": str(w.pid), "worker": 1} if r["worker"] == 1 and w.up else r
            for r in replies])


def test_retiring_a_thousand_workers_adds_no_series(pair):
    """The set of series after 1,000 dead workers is the set after one: the dead
    are folded into one total, not kept one per process."""
    a, _ = pair
    cluster = RecycledCluster(pair, a.clock)
    view = ClusterMetrics(cluster)

    def cycle():
        scrape(view)
        cluster.kill(1)
        cluster.replace(1, cluster.workers[1].mem)

    cycle()
    once, retired_once = scrape(view), view.retired.series()
    for _ in range(999):
        cycle()
    many = scrape(view)
    assert set(many) == set(once)
    assert view.retired.series() == retired_once
    assert many["afpa_workers_retired_total"] == 1000
    assert many["afpa_cache_misses_total"] == 1001  # 1,000 retired, one live
    assert len(view.last) == 2 and len(view.gone) == 1


# -- the supervisor admin site -------------------------------------------------------------

def open_request(site, clock, method, path, body=b"", token=TOKEN):
    channel = site.buildProtocol(None)
    channel.callLater = clock.callLater
    t = StringTransport()
    channel.makeConnection(t)
    head = f"{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    channel.dataReceived(head.encode() + b"\r\n" + body)
    return channel, t


def request(site, clock, method, path, body=b"", token=TOKEN):
    _, t = open_request(site, clock, method, path, body, token)
    [(status, headers, out)] = parse_responses(t.value())
    return status, headers, out


@pytest.fixture
def stocked(docroot, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    mems = [MemoryServer(str(docroot), admin_token_file=str(token_file)) for _ in range(2)]
    for m in mems:
        now = m.clock.seconds()
        for path, tags in ((b"/static/a.css", (b"css",)), (b"/page", (b"page", b"css"))):
            o = CacheObject((b"example.com", path), b"HTTP/1.1 200 OK\r\n", (b"x",), 1, now, now + 60)
            o.set_tags(tags)
            m.server.runtime.cache.put(o)
    cluster = FakeCluster(mems, mems[0].clock)
    site = clusteradmin.supervisor_admin_site(cluster, mems[0].settings)
    return mems, cluster, site


def post(site, mems, path, spec, token=TOKEN):
    status, _, out = request(site, mems[0].clock, "POST", path, json.dumps(spec).encode(), token)
    return status, json.loads(out)


def test_purges_are_fanned_out_and_summed(stocked):
    mems, cluster, site = stocked
    status, result = post(site, mems, "/cache/tag", {"tags": ["css", "none"]})
    assert status == 200
    assert result == {"purged": 4, "tags": {"css": 4, "none": 0}, "soft": False, "workers": 2, "errors": []}
    assert all(len(m.server.runtime.cache) == 0 for m in mems)
    assert all(m.server.runtime.cache.purged["tag"] == 2 for m in mems)


def test_a_purge_lists_the_workers_that_did_not_apply_it(stocked):
    mems, cluster, site = stocked
    cluster.workers[1].up = False
    status, result = post(site, mems, "/cache/purge", {"url": "http://example.com/page"})
    assert status == 200 and result["purged"] == 1 and result["workers"] == 1
    assert result["errors"] == [{"worker": 1, "error": "worker is not running"}]
    cluster.workers[0].up = False
    status, result = post(site, mems, "/cache/purge", {"url": "http://example.com/page"})
    assert status == 503 and "no worker applied it" in result["error"]


def test_the_token_is_checked_by_the_supervisor_before_any_worker_is_asked(stocked):
    mems, cluster, site = stocked
    status, result = post(site, mems, "/cache/tag", {"tags": ["css"]}, token=TOKEN + "x")
    assert status == 403 and result == {"error": "wrong admin token"}
    status, _ = post(site, mems, "/cache/tag", {"tags": ["css"]}, token=None)
    assert status == 401
    status, result = post(site, mems, "/cache/ban", {"prefix": "/", "sof": True})
    assert status == 400 and "unknown field 'sof'" in result["error"]
    assert cluster.calls == [] and all(len(m.server.runtime.cache) == 2 for m in mems)


def test_a_request_every_worker_refuses_gets_their_status(stocked):
    mems, _, site = stocked
    status, result = post(site, mems, "/cache/ban", {"regex": "("})
    assert status == 400 and "error" in result and "errors" not in result


def test_health_and_tables(stocked):
    mems, cluster, site = stocked
    assert request(site, mems[0].clock, "GET", "/healthz")[::2] == (200, b"ok\n")
    cluster.workers[0].up = False
    assert request(site, mems[0].clock, "GET", "/healthz")[0] == 200
    cluster.workers[1].up = False
    assert request(site, mems[0].clock, "GET", "/healthz")[::2] == (503, b"no worker up\n")
    cluster.workers[1].up = True
    cluster.draining = True
    assert request(site, mems[0].clock, "GET", "/healthz")[::2] == (503, b"draining\n")
    status, _, page = request(site, mems[0].clock, "GET", "/tables/")
    assert status == 200 and b"/tables/http.toml" in page and b"/tables/http-backend.toml" in page
    status, _, text = request(site, mems[0].clock, "GET", "/tables/http.toml")
    assert status == 200 and text.decode() == mems[0].server.machine.text


def test_the_machine_page_data_adds_up_every_workers_counts(stocked, docroot):
    mems, cluster, site = stocked
    for i, m in enumerate(mems):
        proto, _ = m.connect()
        proto.dataReceived(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n" * (i + 1))  # 1 and 2 requests

    def entries(view, machine, state):
        [m] = [m for m in view["machines"] if m["name"] == machine]
        return {s["name"]: s["entries"] for s in m["states"]}[state]

    status, _, body = request(site, mems[0].clock, "GET", "/machines.json")
    assert status == 200
    view = json.loads(body)
    assert entries(view, "http", "derive_request") == 3
    status, _, body = request(site, mems[0].clock, "GET", "/machines/http.json")
    assert status == 200 and json.loads(body)["name"] == "http"
    cluster.workers[1].up = False  # a worker that is down is left out, never an error
    status, _, body = request(site, mems[0].clock, "GET", "/machines.json")
    assert status == 200 and entries(json.loads(body), "http", "derive_request") == 1
