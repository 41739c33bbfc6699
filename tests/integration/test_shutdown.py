"""Signals on a real ``afpa serve``: SIGTERM drains, a second SIGTERM stops at once,
SIGHUP never kills."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.httpclient import parse_responses
from tests.integration.backends import RawBackend, response
from tests.integration.test_serve import _complete, get

pytestmark = pytest.mark.integration


def wait_refused(port: int) -> None:
    """Until the listener is closed (the drain has started)."""
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.05)
    raise AssertionError(f"port {port} still accepts connections")


def read_response(s: socket.socket) -> bytes:
    raw = b""
    while not _complete(raw, 1, ()):
        chunk = s.recv(65536)
        if not chunk:
            break
        raw += chunk
    return raw


def finish(p, timeout: float = 60) -> tuple[int, str]:
    """Wait for the process to end on its own; (exit status, stderr)."""
    _, err = p.proc.communicate(timeout=timeout)
    return p.proc.returncode, err.decode(errors="replace")


@pytest.fixture
def held_backend():
    """A backend that holds every answer until ``gate`` is set."""
    gate = threading.Event()
    b = RawBackend(lambda head, body: response(b"done:" + head.split(b" ")[1], "Cache-Control: no-store")
                   if gate.wait(60) else None)
    b.sock.listen(512)  # room for every forwarded request at once
    b.gate = gate
    yield b
    gate.set()
    b.close()


def sigterm_then_release(p, held_backend, clients) -> None:
    """SIGTERM ``p`` (whose listener then closes), let the held backend answer, and
    check that client ``i`` got its ``/slow/i`` whole, announcing the close."""
    p.proc.send_signal(signal.SIGTERM)
    wait_refused(p.port)
    held_backend.gate.set()
    for i, s in enumerate(clients):
        [(status, h, body)] = parse_responses(read_response(s))
        assert (status, body) == (200, f"done:/slow/{i}".encode())
        assert h["connection"] == "close"


def test_sigterm_lets_200_requests_in_flight_finish(afpa_process, held_backend):
    p = afpa_process("--backend", held_backend.url)
    clients = []
    try:
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", p.port), timeout=60)
            s.sendall(get(f"/slow/{i}"))
            clients.append(s)
        for _ in range(600):
            if len(held_backend.requests) >= 200:
                break
            time.sleep(0.05)
        assert len(held_backend.requests) == 200
        sigterm_then_release(p, held_backend, clients)
        for s in clients:
            assert s.recv(1) == b""  # and the connection closes after it
    finally:
        for s in clients:
            s.close()
    status, err = finish(p)
    assert status == 0
    # (the count may include one probe of wait_refused accepted just before the drain)
    assert "SIGTERM: draining 20" in err and "drained: every connection finished" in err, err


def test_sigterm_mid_download_the_client_still_gets_everything(afpa_process, docroot):
    data = os.urandom(20 << 20)
    (docroot / "big.bin").write_bytes(data)
    p = afpa_process("--max-object-size", "1M")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)  # so the file cannot sit in buffers
    s.settimeout(60)
    s.connect(("127.0.0.1", p.port))
    try:
        s.sendall(get("/big.bin"))
        raw = bytearray()
        while len(raw) < (1 << 20):
            chunk = s.recv(16384)
            assert chunk
            raw += chunk
            time.sleep(0.001)  # a slow reader
        p.proc.send_signal(signal.SIGTERM)
        wait_refused(p.port)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
    finally:
        s.close()
    [(status, h, body)] = parse_responses(bytes(raw))
    assert status == 200 and len(body) == len(data)
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    status, _ = finish(p)
    assert status == 0


def test_idle_keepalive_closed_and_exit_at_once(afpa_process):
    p = afpa_process()
    with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
        s.sendall(get("/hello.txt"))
        [(status, _, body)] = parse_responses(read_response(s))
        assert (status, body) == (200, b"hello world\n")
        p.proc.send_signal(signal.SIGTERM)
        assert s.recv(1) == b""  # the idle keep-alive connection is closed, not kept
    status, err = finish(p, timeout=10)
    assert status == 0 and "draining 1 connection(s)" in err


def test_second_sigterm_stops_at_once(afpa_process, held_backend):
    p = afpa_process("--backend", held_backend.url)
    with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
        s.sendall(get("/held"))
        for _ in range(400):
            if held_backend.requests:
                break
            time.sleep(0.05)
        assert held_backend.requests
        p.proc.send_signal(signal.SIGTERM)
        wait_refused(p.port)
        assert p.proc.poll() is None  # still draining: the request is held
        # The admin listener stays up while draining, and says so to load balancers.
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/healthz", timeout=10)
        assert health.value.code == 503 and health.value.read() == b"draining\n"
        p.proc.send_signal(signal.SIGTERM)
        _, err = finish(p, timeout=10)
        assert not held_backend.gate.is_set()  # ended while the answer was still held
        assert s.recv(65536) == b""  # cut, no response
    assert "again: stopping now" in err and "drained" not in err, err


def test_sighup_never_kills(afpa_process):
    p = afpa_process()
    for _ in range(2):
        p.proc.send_signal(signal.SIGHUP)
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            s.sendall(get("/hello.txt"))
            [(status, _, body)] = parse_responses(read_response(s))
        assert (status, body) == (200, b"hello world\n")
    assert p.proc.poll() is None
    err = p.stop()
    assert "nothing to reopen" in err


def test_spliced_connection_carries_on_until_the_drain_deadline(afpa_process):
    def tunnel(head, body):
        def echo(c):
            c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n")
            c.settimeout(30)
            try:
                while data := c.recv(100):
                    c.sendall(data)
            except OSError:
                pass
        return echo
    b = RawBackend(tunnel)
    try:
        p = afpa_process("--defer", b.url, "--drain-timeout", "1")
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            s.sendall(get("/t", "Upgrade: x", "Connection: Upgrade"))
            raw = b""
            while b"\r\n\r\n" not in raw:
                raw += s.recv(4096)
            assert raw.startswith(b"HTTP/1.1 101")
            p.proc.send_signal(signal.SIGTERM)
            wait_refused(p.port)
            s.sendall(b"ping")  # the tunnel still carries traffic while draining
            assert s.recv(4) == b"ping"
            while s.recv(4096):  # until afpa closes it at the deadline
                pass
        status, err = finish(p, timeout=30)
        assert status == 0 and "cut 1 connection(s)" in err
    finally:
        b.close()
