"""Reload of a real afpa process: ``afpa reload`` (success and failure), SIGHUP,
a renewed TLS certificate, listen address changes, and 100 reloads under a
concurrent load with no failed request."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from cryptography.hazmat.primitives import serialization

from afpa.machine import tables
from tests.conftest import REPO, free_port, wait_port
from tests.integration.backends import RawBackend, response

TOKEN = "integration-reload-token-0123456789"


class Configured:
    """``afpa serve --config F`` in a subprocess; stderr goes to a file (a
    pipe nobody reads could fill up and stall the server)."""

    def __init__(self, tmp_path, docroot, body: str = "", port: int | None = None):
        self.dir = tmp_path
        self.docroot = docroot
        self.port = port or free_port()
        self.admin_port = free_port()
        self.token = tmp_path / "token"
        self.token.write_text(TOKEN + "\n")
        self.conf = tmp_path / "afpa.toml"
        self.write(body)
        self.log = open(tmp_path / "stderr.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "afpa", "serve", "--config", str(self.conf)],
                                     cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.log,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_port(self.port, self.proc)
        wait_port(self.admin_port, self.proc)

    def write(self, body: str = "", listen: int | None = None) -> None:
        self.conf.write_text(
            f'listen = "127.0.0.1:{listen or self.port}"\nadmin = "127.0.0.1:{self.admin_port}"\n'
            f'admin_token_file = "{self.token}"\nroot = "{self.docroot}"\n{body}')

    def reload_cli(self) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "afpa", "reload", "--config", str(self.conf)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)

    def reload_api(self) -> tuple[int, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}/reload", data=b"", method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stderr(self) -> str:
        return (self.dir / "stderr.log").read_text(errors="replace")

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.log.close()


@pytest.fixture
def configured(tmp_path, docroot):
    started = []

    def start(body: str = "", **kw):
        c = Configured(tmp_path, docroot, body, **kw)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def fetch(port: int, path: str, host: str = "test") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Host": host})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_afpa_reload_success_then_failure_keeps_the_old_config(configured, tmp_path):
    table = tmp_path / "http.toml"
    table.write_text(tables.shipped_table_path("http").read_text())
    other = tmp_path / "other"
    (other / "r").mkdir(parents=True)
    (other / "r" / "x.txt").write_bytes(b"routed\n")
    c = configured(f'table = "{table}"\n')
    assert fetch(c.port, "/r/x.txt")[0] == 404
    c.write(f'table = "{table}"\n\n[[route]]\nprefix = "/r/"\nto = "docroot"\nroot = "{other}"\n')
    done = c.reload_cli()
    assert done.returncode == 0, done.stderr
    assert done.stdout == "afpa: reloaded (generation 1; changed: route)\n"
    assert fetch(c.port, "/r/x.txt") == (200, b"routed\n")

    lines = table.read_text().splitlines(keepends=True)
    at = next(n for n, line in enumerate(lines) if line.lstrip().startswith("on = {"))
    lines[at] = lines[at].replace("on = {", 'on = { bogus = "nowhere", ', 1)
    table.write_text("".join(lines))
    c.write(f'table = "{table}"\n')  # the route goes too, but nothing may change
    done = c.reload_cli()
    assert done.returncode == 1
    assert f"{table}:{at + 1}: " in done.stderr and "unknown target state 'nowhere'" in done.stderr
    assert done.stderr.rstrip().endswith("afpa: reload failed; the running configuration is unchanged")
    assert fetch(c.port, "/r/x.txt") == (200, b"routed\n")  # the old configuration still serves
    status, result = c.reload_api()
    assert status == 422 and result["problems"][0]["line"] == at + 1
    assert "reload failed: " + str(table) in c.stderr()


def test_sighup_reloads_a_route_for_a_keep_alive_client(configured, tmp_path):
    other = tmp_path / "other"
    (other / "r").mkdir(parents=True)
    (other / "r" / "x.txt").write_bytes(b"routed\n")
    c = configured()
    conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=30)
    conn.request("GET", "/r/x.txt")
    r = conn.getresponse()
    assert r.status == 404
    r.read()
    c.write(f'\n[[route]]\nprefix = "/r/"\nto = "docroot"\nroot = "{other}"\n')
    c.proc.send_signal(signal.SIGHUP)
    for _ in range(300):
        if "reloaded: generation 1" in c.stderr():
            break
        time.sleep(0.05)
    assert "reloaded: generation 1 (changed: route)" in c.stderr()
    conn.request("GET", "/r/x.txt")  # the same connection, at a request boundary
    r = conn.getresponse()
    assert (r.status, r.read()) == (200, b"routed\n")
    conn.close()
    # A broken configuration on SIGHUP: logged, and the old one keeps serving.
    c.conf.write_text(c.conf.read_text() + "\n[cache]\nsize = \"lots\"\n")
    c.proc.send_signal(signal.SIGHUP)
    for _ in range(300):
        if "reload failed" in c.stderr():
            break
        time.sleep(0.05)
    assert f"reload failed: {c.conf}:" in c.stderr() and "cache.size" in c.stderr()
    assert fetch(c.port, "/r/x.txt") == (200, b"routed\n")
    assert c.proc.poll() is None


def _peer_cert(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="a.test") as s:
            der = s.getpeercert(binary_form=True)
            s.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    return der


def test_renewed_certificate_is_used_by_new_handshakes(configured, tmp_path):
    from tests.unit.test_tls import _make_cert

    old, old_x509 = _make_cert(tmp_path, "old", "a.test", ["a.test"])
    new, new_x509 = _make_cert(tmp_path, "new", "a.test", ["a.test"])
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(open(old.cert, "rb").read())
    key.write_bytes(open(old.key, "rb").read())
    tls_port = free_port()
    c = configured(f'\n[tls]\nlisten = "127.0.0.1:{tls_port}"\n\n[[tls.certificate]]\n'
                   f'cert = "{cert}"\nkey = "{key}"\n')
    wait_port(tls_port, c.proc)
    assert _peer_cert(tls_port) == old_x509.public_bytes(serialization.Encoding.DER)
    key.write_text("not a key\n")  # half-renewed: refused, the old certificate stays
    done = c.reload_cli()
    assert done.returncode == 1 and f"{key}: TLS private key" in done.stderr
    assert _peer_cert(tls_port) == old_x509.public_bytes(serialization.Encoding.DER)
    cert.write_bytes(open(new.cert, "rb").read())
    key.write_bytes(open(new.key, "rb").read())
    done = c.reload_cli()
    assert done.returncode == 0 and "tls certificates" in done.stdout
    assert _peer_cert(tls_port) == new_x509.public_bytes(serialization.Encoding.DER)


def test_listen_address_moves_and_an_unbindable_one_changes_nothing(configured):
    c = configured()
    moved = free_port()
    c.write(listen=moved)
    status, result = c.reload_api()
    assert status == 200 and result["changed"] == ["listen"]
    assert fetch(moved, "/hello.txt") == (200, b"hello world\n")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", c.port), timeout=5).close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        c.write(listen=busy.getsockname()[1])
        status, result = c.reload_api()
        assert status == 422
        assert f"cannot listen on 127.0.0.1:{busy.getsockname()[1]}" in result["problems"][0]["problem"]
        assert result["problems"][0]["line"] == 1 and result["problems"][0]["file"] == str(c.conf)
    assert fetch(moved, "/hello.txt") == (200, b"hello world\n")


def _metric(admin_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
               or line.startswith(name + " "))


def test_100_reloads_under_concurrent_load_fail_no_request(configured, tmp_path):
    backend = RawBackend(lambda head, body: response(b"from the backend\n", "Cache-Control: no-store"))
    table = tmp_path / "http.toml"
    shipped = tables.shipped_table_path("http").read_text()
    table.write_text(shipped)

    def body(i: int) -> str:
        # Every reload changes something: the grace (a setting), the route's
        # prefix set, and every tenth time the table text (a new machine).
        return (f'table = "{table}"\n\n[cache]\ngrace = {i % 3}\n\n[[route]]\nprefix = "/api/"\nto = "remote"\n'
                f'backend = "{backend.url}"\n' + ("" if i % 2 else '\n[[route]]\nprefix = "/b/"\nto = "remote"\n'
                                                   f'backend = "{backend.url}"\n'))

    c = configured(body(0))
    stop = threading.Event()
    failures: list[str] = []
    done = [0]
    lock = threading.Lock()

    def client(n: int) -> None:
        paths = ["/hello.txt", "/api/x", "/page.html", "/api/y?n=" + str(n)]
        expect = {"/hello.txt": b"hello world\n", "/page.html": b"<h1>page</h1>\n"}
        i = 0
        while not stop.is_set() and i < 100_000:
            conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=30)
            try:
                # Keep-alive runs of a few requests, then a new connection.
                for _ in range(1 + (i + n) % 5):
                    path = paths[i % len(paths)]
                    i += 1
                    try:
                        conn.request("GET", path, headers={"Host": "test"})
                        r = conn.getresponse()
                        data = r.read()
                    except (OSError, http.client.HTTPException) as exc:
                        failures.append(f"{path}: {exc!r}")
                        break
                    want = expect.get(path, b"from the backend\n")
                    if r.status != 200 or data != want:
                        failures.append(f"{path}: {r.status} {data[:60]!r}")
                    with lock:
                        done[0] += 1
            finally:
                conn.close()

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(6)]
    for t in threads:
        t.start()
    try:
        before = _metric(c.admin_port, "afpa_state_entries_total")
        for i in range(1, 101):
            if i % 10 == 0:
                table.write_text(shipped + f"# reload {i}\n")
            c.write(body(i))
            status, result = c.reload_api()
            assert status == 200 and result["generation"] == i, result
            after = _metric(c.admin_port, "afpa_state_entries_total")
            assert after >= before  # counters never go backwards across a reload
            before = after
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        backend.close()
    assert not failures, failures[:10]
    print("requests during the reloads:", done[0])
    assert done[0] > 100
    assert c.proc.poll() is None
