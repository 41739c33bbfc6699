"""Scrape time of the supervisor's merged /metrics after many worker restarts.

    python bench/scrape_after_restarts.py [--restarts 1000] [--workers 2] [--scrapes 20]

Simulated restarts, in one process: each worker's snapshot is a real
afpa.ops.metrics.snapshot of an in-memory Server that served a few requests, sent
through JSON as over the control channel.  After 0, 1, 10, 100 and --restarts
worker deaths (each folded into the retired total by ClusterMetrics) it prints
the median time of one scrape (merge + Prometheus text), the number of series
and the size of the text.

For contrast, the same counters written the way prometheus_client's
multiprocess directory keeps them (one counter file and one histogram file per
process, dead ones included) and collected with its MultiProcessCollector:
its scrape time grows with the number of dead processes, ours does not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.mmap_dict import MmapedDict, mmap_key  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402
from twisted.internet.defer import succeed  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from afpa.ops import clusteradmin

from afpa.ops import metrics  # noqa: E402
from afpa.ops.clustermetrics import ClusterMetrics  # noqa: E402
from protocols.http.settings import http_settings  # noqa: E402
from afpa.net.helpers import InlineHelpers  # noqa: E402
from afpa.server import Server  # noqa: E402


def worker_snapshot(root: str) -> dict:
    """A snapshot of a Server that served a few misses, hits and a 404."""
    clock = Clock()
    clock.advance(1_800_000_000)
    server = Server(http_settings(root=root), reactor=clock, helpers=InlineHelpers())
    for path in ("/a.txt", "/a.txt", "/b.txt", "/missing"):
        proto = server.factory().buildProtocol(None)
        proto.makeConnection(StringTransport())
        proto.dataReceived(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    return json.loads(json.dumps(clusteradmin.op_snapshot(server, {})))


class Worker:
    def __init__(self, index: int):
        self.index, self.pid, self.up, self.restarts, self.started = index, 10_000 + index, True, 0, 0.0


class SimulatedCluster:
    """Every worker answers the same snapshot under its own pid as identity."""

    def __init__(self, n: int, snap: dict):
        self.workers = [Worker(i) for i in range(n)]
        self.snap = snap
        self.hooks = []
        self.add_exit_hook = self.hooks.append

    def call(self, op, args, timeout):
        return succeed([{**self.snap, "id": str(w.pid), "worker": w.index} for w in self.workers])

    def restart(self, index: int) -> None:
        for hook in self.hooks:
            hook(index)
        self.workers[index].pid += 1000
        self.workers[index].restarts += 1


def scrape_once(view: ClusterMetrics) -> bytes:
    out = []
    view.scrape().addCallback(metrics.exposition).addCallback(out.append)
    return out[0]


def median_ms(fn, scrapes: int) -> tuple[float, bytes]:
    times, text = [], b""
    for _ in range(scrapes):
        t0 = time.perf_counter()
        text = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, text


def write_multiprocess_files(directory: str, pid: int, snap: dict) -> None:
    """One process's counters and histograms as prometheus_client's multiprocess mode stores them."""
    files = {}
    for f in snap["families"]:
        if f["type"] not in ("counter", "histogram"):
            continue
        db = files.get(f["type"])
        if db is None:
            db = files[f["type"]] = MmapedDict(os.path.join(directory, f"{f['type']}_{pid}.db"))
        for name, labels, value in f["samples"]:
            if name.endswith("_count"):
                continue  # multiprocess mode derives _count from the buckets
            key = mmap_key(f["name"], name, list(labels), list(labels.values()), f["help"])
            db.write_value(key, float(value), 0.0)
    for db in files.values():
        db.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--restarts", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scrapes", type=int, default=20, help="scrapes timed per checkpoint (median)")
    ap.add_argument("--no-multiprocess", action="store_true", help="skip the prometheus_client contrast")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="afpa-scrape-bench-")
    try:
        root = os.path.join(tmp, "www")
        os.mkdir(root)
        for name in ("a.txt", "b.txt"):
            Path(root, name).write_text("bench\n")
        snap = worker_snapshot(root)
        cluster = SimulatedCluster(args.workers, snap)
        view = ClusterMetrics(cluster)
        mpdir = os.path.join(tmp, "multiproc")
        os.mkdir(mpdir)
        for w in cluster.workers:
            write_multiprocess_files(mpdir, w.pid, snap)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, mpdir)
        checkpoints = sorted({0, 1, 10, 100, args.restarts})
        done = 0
        rows = []
        for target in checkpoints:
            while done < target:
                scrape_once(view)  # the dying worker was scraped at least once
                index = done % args.workers
                cluster.restart(index)
                if not args.no_multiprocess:
                    write_multiprocess_files(mpdir, cluster.workers[index].pid, snap)
                done += 1
            ms, text = median_ms(lambda: scrape_once(view), args.scrapes)
            series = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
            row = [done, f"{ms:.2f}", series, len(text), len(view.retired.series())]
            if not args.no_multiprocess:
                mp_ms, _ = median_ms(lambda: generate_latest(registry), max(3, args.scrapes // 4))
                row += [len(os.listdir(mpdir)), f"{mp_ms:.2f}"]
            rows.append(row)
        head = ["restarts", "afpa scrape ms", "series", "bytes", "retired series"]
        if not args.no_multiprocess:
            head += ["multiproc files", "multiproc scrape ms"]
        print(f"| {' | '.join(head)} |")
        print(f"|{'---|' * len(head)}")
        for row in rows:
            print(f"| {' | '.join(str(c) for c in row)} |")
        print(f"\n{args.workers} live workers, {len(snap['families'])} families per worker snapshot; "
              f"median of {args.scrapes} scrapes (multiproc: {max(3, args.scrapes // 4)}).")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
