"""Shared test helpers: an in-memory server (unit) and a subprocess server (integration)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from afpa.config import Settings
from afpa.net.helpers import InlineHelpers
from afpa.server import Server
from protocols.http.settings import http_settings

REPO = Path(__file__).resolve().parent.parent


def settings_from_file(path) -> Settings:
    """The Settings ``afpa serve --config PATH`` runs on."""
    from afpa.cli import build_parser, settings_from_args
    return settings_from_args(build_parser().parse_args(["serve", "--config", str(path)]))


class MemoryServer:
    """A Server on a Clock with inline helpers; connections are StringTransports."""

    def __init__(self, root: str, **overrides):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.settings = http_settings(root=root, **overrides)
        self.server = Server(self.settings, reactor=self.clock, helpers=InlineHelpers())

    def connect(self):
        proto = self.server.factory().buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport


@pytest.fixture
def docroot(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello world\n")
    (root / "page.html").write_bytes(b"<h1>page</h1>\n")
    (root / "dir").mkdir()
    (root / "dir" / "index.html").write_bytes(b"<p>index</p>\n")
    (root / "noindex").mkdir()
    return root


@pytest.fixture
def mem(docroot):
    return MemoryServer(str(docroot))


def admin_call(server: Server, method: str, path: str, token: str | None = None):
    """One request to ``server``'s admin site over an in-memory transport:
    ``(status, headers, body)``."""
    from afpa.ops import admin
    from tests.httpclient import parse_responses

    site = admin.admin_site(server)
    channel = site.buildProtocol(None)
    channel.callLater = server.reactor.callLater
    t = StringTransport()
    channel.makeConnection(t)
    head = f"{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    channel.dataReceived(head.encode() + b"\r\n")
    [answer] = parse_responses(t.value())
    return answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


class AfpaProcess:
    """``afpa serve`` in a subprocess on ephemeral loopback ports."""

    def __init__(self, root, *extra: str):
        self.port = free_port()
        self.admin_port = free_port()
        cmd = [sys.executable, "-m", "afpa", "serve", "--root", str(root),
               "--listen", f"127.0.0.1:{self.port}", "--admin", f"127.0.0.1:{self.admin_port}", *extra]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_port(self.port, self.proc)
        wait_port(self.admin_port, self.proc)

    def stop(self) -> str:
        """SIGTERM (afpa drains: at once when idle); if work is still held after a
        few seconds, a second SIGTERM stops it at once; SIGKILL as a last resort."""
        for _ in range(2):
            if self.proc.poll() is None:
                self.proc.terminate()
            try:
                _, err = self.proc.communicate(timeout=5)
                return err.decode(errors="replace")
            except subprocess.TimeoutExpired:
                pass
        self.proc.kill()
        _, err = self.proc.communicate()
        return err.decode(errors="replace")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


@pytest.fixture
def afpa_process(docroot):
    procs = []

    def start(*extra, root=None):
        p = AfpaProcess(root or docroot, *extra)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.proc.poll() is None:
            p.stop()
