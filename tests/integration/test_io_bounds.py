"""Connection I/O and memory bounds over real sockets (issue 11 items 3, 4, 5, 7)."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from tests.httpclient import parse_responses
from tests.integration.backends import RawBackend, response
from tests.integration.test_serve import exchange, get, rss_sampler

pytestmark = pytest.mark.integration

BAD = b"GET /bad HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"


def read_all(s: socket.socket, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    raw = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        raw += chunk
    return raw


def slow_client(port: int, data: bytes) -> socket.socket:
    """A client that sends ``data`` and then reads nothing (small receive buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(data)
    return s


class Peak:
    """The process's peak RSS while the block runs."""

    def __init__(self, p):
        self.p = p

    def __enter__(self):
        self.base = self.p.rss_kib()
        self.stop, self.peak = threading.Event(), [0]
        self.t = threading.Thread(target=rss_sampler,
                                  args=(f"/proc/{self.p.proc.pid}/status", self.stop, self.peak))
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()

    @property
    def growth_mib(self) -> float:
        return (self.peak[0] - self.base) / 1024


def metric(p, name: str) -> float:
    with socket.create_connection(("127.0.0.1", p.admin_port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        text = read_all(s).decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# -- item 3 ------------------------------------------------------------------

def test_nothing_after_a_400_that_closes(afpa_process):
    p = afpa_process()
    with socket.create_connection(("127.0.0.1", p.port)) as s:
        s.sendall(BAD + get("/hello.txt"))
        s.sendall(get("/hello.txt"))
        [(status, h, _)] = parse_responses(read_all(s))
    assert status == 400 and h["connection"] == "close"


def test_backend_sees_nothing_after_a_400_that_closes(afpa_process):
    b = RawBackend(lambda head, body: response(b"x", "Cache-Control: max-age=60"))
    try:
        p = afpa_process("--backend", b.url)
        with socket.create_connection(("127.0.0.1", p.port)) as s:
            s.sendall(BAD + get("/stored"))
            s.sendall(get("/forwarded"))
            [(status, _, _)] = parse_responses(read_all(s))
        assert status == 400
        [(status, h, _)] = parse_responses(exchange(p.port, get("/stored")))
        assert h["cache-status"].startswith("afpa; fwd=uri-miss")  # never stored before
        assert len(b.requests) == 1 and b"/stored" in b.requests[0]
    finally:
        b.close()


# -- item 4 ------------------------------------------------------------------

def test_pipelining_to_a_client_that_does_not_read_is_bounded(afpa_process, docroot):
    (docroot / "60k.bin").write_bytes(os.urandom(60 * 1024))
    p = afpa_process()
    exchange(p.port, get("/60k.bin"))  # cached
    with Peak(p) as peak:
        # 2,000 pipelined GETs (about 90 KB) ask for 120 MB of answers.
        s = slow_client(p.port, get("/60k.bin") * 2000)
        try:
            time.sleep(1.0)
            # Another client is served meanwhile.
            [(status, _, body)] = parse_responses(exchange(p.port, get("/hello.txt")))
            assert (status, body) == (200, b"hello world\n")
            # Now a trickle of reading: each time the socket takes bytes, the
            # server may move what it queued; it must not have queued it all.
            s.settimeout(5)
            got = 0
            while got < 8 << 20:
                got += len(s.recv(65536))
                time.sleep(0.001)
        finally:
            s.close()
    assert peak.growth_mib < 60, f"RSS grew by {peak.growth_mib:.0f} MiB"


# -- item 5 ------------------------------------------------------------------

def pipeline(s: socket.socket, data: bytes, n: int) -> list:
    """Send ``data`` (``n`` requests) and read their ``n`` answers."""
    s.sendall(data)
    raw = b""
    while True:
        try:
            got = parse_responses(raw)
            if len(got) >= n and all(len(b) >= int(h.get("content-length", 0)) for _, h, b in got):
                return got
        except (ValueError, IndexError):
            pass
        chunk = s.recv(65536)
        assert chunk, "connection closed early"
        raw += chunk


def test_many_long_host_values_keep_memory_within_the_cache_budget(afpa_process):
    budget = 1 << 20
    p = afpa_process("--cache-size", "1M")
    with Peak(p) as peak:
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            for batch in range(50):
                data = b"".join(b"GET /hello.txt HTTP/1.1\r\nHost: %05d.%s\r\n\r\n" % (i, b"h" * 240)
                                for i in range(batch * 100, batch * 100 + 100))
                got = pipeline(s, data, 100)
                assert {st for st, _, _ in got} == {200}
        # Host values longer than a DNS name are refused, never stored.
        answers = []
        for i in range(600):
            with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
                s.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: %05d%s\r\n\r\n" % (i, b"a" * 60000))
                answers += pipeline(s, b"", 1)
    assert peak.growth_mib < 30, f"RSS grew by {peak.growth_mib:.0f} MiB"
    assert all(st == 400 and b"Host too long" in body for st, _, body in answers)
    assert metric(p, "afpa_cache_bytes") <= budget


# -- item 7 ------------------------------------------------------------------

def test_slow_readers_of_distinct_files_stay_bounded(afpa_process, docroot):
    data = os.urandom(2 << 20)
    for i in range(200):
        (docroot / f"f{i}.bin").write_bytes(b"%d" % i + data)
    p = afpa_process("--cache-size", "16M")
    clients = []
    with Peak(p) as peak:
        try:
            for i in range(200):
                clients.append(slow_client(p.port, get(f"/f{i}.bin")))
            time.sleep(3)
            # Others are still served.
            [(status, _, body)] = parse_responses(exchange(p.port, get("/hello.txt")))
            assert (status, body) == (200, b"hello world\n")
        finally:
            for s in clients:
                s.close()
    assert peak.growth_mib < 150, f"RSS grew by {peak.growth_mib:.0f} MiB"


def test_concurrent_cacheable_misses_stay_within_the_in_flight_budget(afpa_process):
    size = 4 << 20
    b = RawBackend(lambda head, body: response(os.urandom(size), "Cache-Control: max-age=60"))
    try:
        p = afpa_process("--backend", b.url, "--cache-size", "16M")
        results: list = []

        def fetch(i: int) -> None:
            raw = exchange(p.port, get(f"/big{i}"), timeout=60)
            [(status, h, body)] = parse_responses(raw)
            results.append((status, h["cache-status"], len(body)))

        with Peak(p) as peak:
            threads = [threading.Thread(target=fetch, args=(i,)) for i in range(50)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert len(results) == 50 and all(st == 200 and n == size for st, _, n in results)
        assert peak.growth_mib < 120, f"RSS grew by {peak.growth_mib:.0f} MiB"
        assert any("detail=busy" in cs for _, cs, _ in results)
        assert metric(p, "afpa_cache_inflight_bytes") == 0
    finally:
        b.close()
