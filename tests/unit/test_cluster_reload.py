"""A reload across workers (afpa.process.clusterreload) with in-memory servers standing in
for the supervisor and its workers: every worker swaps, or none does."""

from __future__ import annotations

import attrs
from twisted.internet.defer import succeed

from afpa.process import clusterreload
from afpa.reload import ConfigSource
from tests.conftest import MemoryServer


class FakeCluster:
    """``call`` runs the real worker ops on in-memory workers (replies as the supervisor's)."""

    def __init__(self, servers):
        self.servers = servers
        self.ops = {}
        clusterreload.register_worker_ops(self.ops.__setitem__)
        self.restarted = []

    def call(self, op, args, timeout):
        replies = []
        for i, server in enumerate(self.servers):
            try:
                replies.append({**self.ops[op](server, args), "worker": i})
            except ValueError as exc:
                replies.append({"worker": i, "error": str(exc)})
        return succeed(replies)

    def restart(self, index):
        self.restarted.append(index)


def source(server, **changes):
    """Re-reading the configuration gives ``changes`` on top of the current settings."""
    def load():
        if "fail" in changes:
            raise ValueError(changes["fail"])
        return attrs.evolve(server.settings, **changes)
    server.source = ConfigSource("afpa.toml", load)


def result(d):
    out = []
    d.addBoth(out.append)
    return out[0]


def test_every_worker_commits_or_none_does(docroot):
    sup, w0, w1 = (MemoryServer(str(docroot)).server for _ in range(3))
    cluster = FakeCluster([w0, w1])
    reloader = clusterreload.ClusterReload(cluster, sup)
    for s in (sup, w0, w1):
        source(s, cache_bytes=s.settings.cache_bytes // 2)
    source(w1, fail="afpa.toml: timeouts: expected a table")  # worker 1 reads a broken file
    out = result(reloader.reload())
    assert out["ok"] is False
    [problem] = out["problems"]
    assert problem["file"] == "afpa.toml" and "timeouts: expected a table" in problem["problem"]
    assert [s.generation for s in (sup, w0, w1)] == [0, 0, 0]  # nobody swapped
    assert clusterreload._pending == {}  # worker 0's prepared generation was dropped
    source(w1, cache_bytes=w1.settings.cache_bytes // 2)
    out = result(reloader.reload())
    assert out["ok"] is True and out["workers"] == 2, out
    assert [s.generation for s in (sup, w0, w1)] == [1, 1, 1]
    assert w0.runtime.cache.budget == w0.settings.cache_bytes


def test_what_workers_cannot_change_without_a_restart_is_refused(docroot):
    sup, w0 = (MemoryServer(str(docroot)).server for _ in range(2))
    cluster = FakeCluster([w0])
    reloader = clusterreload.ClusterReload(cluster, sup)
    source(sup, listen=("127.0.0.1", 1), workers=3)
    out = result(reloader.reload())
    assert out["ok"] is False
    problems = " ".join(p["problem"] for p in out["problems"])
    assert "moving a listener needs a restart" in problems and "number of workers" in problems
    assert (sup.generation, w0.generation) == (0, 0)
