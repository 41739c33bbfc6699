"""Tracing end to end: a real ``afpa serve``, a client asking for ``Afpa-Trace``,
the admin ``/trace`` stream and the ``afpa trace`` command following it."""

from __future__ import annotations

import http.client
import json
import os
import selectors
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.integration.backends import RawBackend, response

pytestmark = pytest.mark.integration

TOKEN = "trace-token-0123456789abcdef"


def get(port, path, **headers):
    """GET like curl: returns (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def read_line(stream, timeout: float) -> bytes:
    """One line from a child's pipe, or b"" if none came within ``timeout`` seconds."""
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            return b""
        return stream.readline()
    finally:
        sel.close()


@pytest.fixture
def token_file(tmp_path):
    f = tmp_path / "admin-token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o600)
    return f


def test_client_sees_the_state_path_of_a_hit_and_of_a_forwarded_miss(afpa_process, tmp_path):
    backend = RawBackend(lambda head, _body: response(b"from backend", "Cache-Control: max-age=60"))
    try:
        cfg = tmp_path / "afpa.toml"
        cfg.write_text(f'[[route]]\nprefix = "/api/"\nto = "remote"\nbackend = "{backend.url}"\n')
        p = afpa_process("--config", str(cfg))
        get(p.port, "/hello.txt")
        status, headers, body = get(p.port, "/hello.txt", **{"Afpa-Trace": "1"})
        assert (status, body) == (200, b"hello world\n")
        states = [s.split(" ")[0] for s in headers["afpa-trace"].split(" > ")]
        assert states == ["derive_request", "derive_cached_response", "send_engine"]
        status, headers, body = get(p.port, "/api/x", **{"Afpa-Trace": "1"})
        assert (status, body) == (200, b"from backend")
        assert "derive_remote_response" in headers["afpa-trace"]
        assert "http-backend:backend_read_head" in headers["afpa-trace"]
        assert b"afpa-trace" not in backend.requests[-1].lower()  # never forwarded
        status, headers, _ = get(p.port, "/hello.txt")
        assert status == 200 and "afpa-trace" not in headers  # only when asked
    finally:
        backend.close()


def test_trace_stream_refuses_without_the_token(afpa_process, token_file):
    p = afpa_process("--admin-token-file", str(token_file))
    status, headers, body = get(p.admin_port, "/trace")
    assert status == 401 and "bearer" in headers["www-authenticate"].lower()
    assert "error" in json.loads(body)


@pytest.mark.parametrize("workers", ["1", "2"])  # 2: the supervisor merges its workers' streams
def test_afpa_trace_shows_a_request_sent_after_it_started(afpa_process, token_file, workers):
    p = afpa_process("--admin-token-file", str(token_file), "--workers", workers)
    env = {k: v for k, v in os.environ.items() if k != "AFPA_ADMIN_TOKEN"}
    child = subprocess.Popen([sys.executable, "-m", "afpa", "trace", "--admin", f"127.0.0.1:{p.admin_port}",
                              "--admin-token-file", str(token_file), "--path", "/hello"],
                             cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        started = read_line(child.stderr, 15)
        assert started.startswith(b"afpa: tracing requests at"), started
        for _ in range(int(workers)):  # new connections: whichever worker takes them
            get(p.port, "/page.html")  # filtered out
            get(p.port, "/hello.txt", **{"User-Agent": "trace-test"})
        line = b""
        deadline = time.monotonic() + 15
        while not line and time.monotonic() < deadline and child.poll() is None:
            line = read_line(child.stdout, 1)
        text = line.decode()
        assert " GET 127.0.0.1:" in text and "/hello.txt 200 " in text, text
        assert "derive_request " in text and " > send_engine " in text
        child.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = child.communicate(timeout=10)
        assert child.returncode == 0
        assert err == b""  # quietly: no traceback
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()


def test_unknown_access_log_field_stops_afpa_with_one_line(tmp_path):
    cfg = tmp_path / "afpa.toml"
    cfg.write_text('access_log = "-"\naccess_log_format = \'$remote_addr "$reqest" $status\'\n')
    done = subprocess.run([sys.executable, "-m", "afpa", "serve", "--config", str(cfg), "--listen", "127.0.0.1:0"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(f"afpa: {cfg}: access_log_format: unknown field $reqest (known: ")
