"""What an attacker tries next: oversized heads, header floods, idle and slow
connections, output that is never read, backends that reset or restart.

Each test runs a real ``afpa serve`` on loopback and checks two things a user
would see: the abusive connection gets the protocol's answer (or is closed), and
everyone else is still served, with the process's memory bounded by its
settings (RSS measured with generous margins, never a timing).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.httpclient import parse_responses
from tests.integration.backends import RawBackend, response
from tests.integration.test_io_bounds import Peak, read_all
from tests.integration.test_serve import exchange, get

pytestmark = pytest.mark.integration

def served(port: int) -> bool:
    """A fresh client still gets the small file."""
    [(status, _, body)] = parse_responses(exchange(port, get("/hello.txt")))
    return status == 200 and body == b"hello world\n"


@pytest.mark.parametrize("head,status", [
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (200 << 10) + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(10_000)) + b"\r\n", 431),
    (b"GET /" + b"a" * (64 << 10) + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: " + b"h" * 4000 + b"\r\n\r\n", 400),
], ids=["200k-header-line", "10k-headers", "64k-target", "4k-host"])
def test_oversized_heads_refused_and_others_served(afpa_process, head, status):
    p = afpa_process()
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        try:
            s.sendall(head)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before all of it was read: the answer is still waiting
        raw = read_all(s)
    assert raw.startswith(b"HTTP/1.1 %d " % status), raw[:80]
    assert b"Connection: close" in raw
    assert served(p.port)


def test_many_idle_connections_do_not_stop_others(afpa_process):
    p = afpa_process()
    idle = []
    try:
        with Peak(p) as peak:
            for i in range(800):
                s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
                if i % 2:
                    s.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: a\r\n")  # a head that never ends
                idle.append(s)
            assert served(p.port)
        assert peak.growth_mib < 64, f"RSS grew by {peak.growth_mib:.1f} MiB for 800 idle connections"
    finally:
        for s in idle:
            s.close()
    assert served(p.port)


def test_slow_sender_gets_408_and_others_are_served(afpa_process):
    p = afpa_process("--header-timeout", "1")
    with socket.create_connection(("127.0.0.1", p.port), timeout=15) as s:
        s.sendall(b"GET /hello.txt HTTP/1.1\r\n")
        assert served(p.port)
        for _ in range(3):  # a byte now and then does not extend the head's deadline
            s.sendall(b"X")
            time.sleep(0.3)
        raw = read_all(s)
    assert raw.startswith(b"HTTP/1.1 408 "), raw[:80]


def test_slow_reader_is_cut_and_memory_stays_flat(afpa_process, docroot):
    with open(docroot / "big.bin", "wb") as f:
        f.truncate(32 << 20)
    p = afpa_process("--send-timeout", "1")
    with Peak(p) as peak:
        stalled = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", p.port), timeout=30)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(get("/big.bin"))
            stalled.append(s)
        assert served(p.port)
        # Every stalled download is closed by the send timeout, not buffered.
        for s in stalled:
            got = len(read_all(s))
            assert got < 32 << 20
            s.close()
    assert peak.growth_mib < 96, f"RSS grew by {peak.growth_mib:.1f} MiB"
    assert served(p.port)


def test_pipelined_requests_never_read_are_bounded(afpa_process, docroot):
    (docroot / "60k.bin").write_bytes(b"x" * (60 << 10))
    p = afpa_process()
    assert parse_responses(exchange(p.port, get("/60k.bin")))[0][0] == 200  # cached now
    burst = get("/60k.bin") * 8000  # about 340 KB asking for 480 MB of answers
    sockets = []
    with Peak(p) as peak:
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
            s.setblocking(False)
            sent = 0
            deadline = time.monotonic() + 5
            while sent < len(burst) and time.monotonic() < deadline:
                try:
                    sent += s.send(burst[sent:])
                except BlockingIOError:
                    time.sleep(0.01)  # afpa stopped reading us: exactly what it should do
            sockets.append(s)
        # Read a little now and then: each time the socket drains, the server's
        # transport is asked to write again (where an unbounded queue gets copied).
        for _ in range(50):
            for s in sockets:
                try:
                    s.recv(65536)
                except BlockingIOError:
                    pass
            time.sleep(0.02)
        assert served(p.port)
    for s in sockets:
        s.close()
    print(f"pipelining: RSS grew by {peak.growth_mib:.1f} MiB")
    assert peak.growth_mib < 64, f"RSS grew by {peak.growth_mib:.1f} MiB"


def test_backend_restart_under_load_every_request_answered(afpa_process):
    """Clients keep asking while the backend goes away and comes back on the same
    port: every request gets an answer (200, or 502/503/504 while it is down), none
    hangs, and 200s return once the backend is back."""
    def ok(head, body):
        return response(b"fine", "Cache-Control: no-store")

    first = RawBackend(ok)
    port = first.port
    p = afpa_process("--backend", first.url)
    statuses: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                raw = exchange(p.port, get("/x"), timeout=20)
                [(status, _, _)] = parse_responses(raw)
            except (OSError, ValueError) as exc:  # a hang or a cut answer
                status = repr(exc)
            with lock:
                statuses.append(status)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        first.close()
        time.sleep(0.5)
        second = None
        for _ in range(50):  # the old socket may linger a moment
            try:
                second = RawBackend(ok, port=port)
                break
            except OSError:
                time.sleep(0.1)
        assert second is not None
        time.sleep(1.0)
        with lock:
            seen_before = len(statuses)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    try:
        assert not any(t.is_alive() for t in threads), "a request hung"
        assert set(statuses) <= {200, 502, 503, 504}, set(statuses)
        assert statuses[seen_before:] and set(statuses[-4:]) == {200}
    finally:
        second.close()
