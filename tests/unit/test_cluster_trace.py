"""The supervisor's trace stream over workers (afpa.ops.clustertrace), with in-memory
servers standing in for the workers and one Clock for all."""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from afpa.ops import clustertrace
from afpa.net.helpers import InlineHelpers
from afpa.server import Server
from afpa.machine.trace import TraceFilter
from protocols.http.settings import http_settings


class FakeCluster:
    def __init__(self, servers):
        self.servers = servers
        self.ops = {}
        clustertrace.register_worker_ops(self.ops.__setitem__)
        self.calls = []

    def call(self, op, args, timeout):
        self.calls.append(op)
        return succeed([{**self.ops[op](s, args), "worker": i} for i, s in enumerate(self.servers)])


def get(server, path):
    proto = server.factory().buildProtocol(None)
    proto.makeConnection(StringTransport())
    proto.dataReceived(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def test_events_of_every_worker_reach_the_supervisors_subscribers_while_anyone_listens(docroot):
    clock = Clock()
    workers = [Server(http_settings(root=str(docroot)), reactor=clock, helpers=InlineHelpers()) for _ in range(2)]
    cluster = FakeCluster(workers)
    traces = clustertrace.ClusterTraces(cluster, clock)
    got = []
    unsubscribe = traces.hub.subscribe(TraceFilter(path="/hello"), got.append)
    assert all(w.trace_all for w in workers)  # the first poll made every worker record
    get(workers[0], "/hello.txt")
    get(workers[1], "/hello.txt")
    get(workers[1], "/other")
    clock.advance(clustertrace.POLL)
    assert sorted(ev["worker"] for ev in got) == [0, 1]
    assert all(ev["path"] == "/hello.txt" and "derive_request" in str(ev) for ev in got)
    unsubscribe()
    assert cluster.calls[-1] == "trace_stop"
    assert not any(w.trace_all for w in workers)  # nobody listens: nothing recorded


def test_a_worker_no_longer_polled_stops_collecting_by_itself(docroot):
    clock = Clock()
    worker = Server(http_settings(root=str(docroot)), reactor=clock, helpers=InlineHelpers())
    clustertrace.op_poll(worker, {})
    assert worker.trace_all
    clock.advance(clustertrace.EXPIRY + 0.1)
    assert not worker.trace_all and id(worker) not in clustertrace._collectors
    clustertrace.op_poll(worker, {})
    collector = clustertrace._collectors[id(worker)]
    for _ in range(clustertrace.HOLD + 3):  # a bound between two polls: the rest is counted
        collector.add({})
    taken = clustertrace.op_poll(worker, {})
    assert (len(taken["events"]), taken["dropped"]) == (clustertrace.HOLD, 3)
    clustertrace.stop(worker)
