"""afpa serve as a real process on 127.0.0.1, talked to over real sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tests.conftest import REPO, free_port, wait_port
from tests.httpclient import parse_responses

pytestmark = pytest.mark.integration


def exchange(port: int, data: bytes, expect: int = 1, timeout: float = 10.0, head_only=()) -> bytes:
    """Send raw bytes, read until ``expect`` complete responses arrived (or the close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        raw = b""
        while not _complete(raw, expect, head_only):
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break  # an aborted response: the caller checks what arrived
            if not chunk:
                break
            raw += chunk
        return raw


def _complete(raw: bytes, expect: int, head_only) -> bool:
    try:
        got = parse_responses(raw, head_only)
    except (ValueError, IndexError):
        return False
    if len(got) < expect:
        return False
    for i, (status, h, body) in enumerate(got):
        bodiless = status == 304 or (i < len(head_only) and head_only[i])
        if not bodiless and len(body) < int(h.get("content-length", 0)):
            return False
    return True


def get(path: str, *headers: str, method: str = "GET") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()


def test_miss_then_hit_and_metrics(afpa_process):
    p = afpa_process()
    first = parse_responses(exchange(p.port, get("/hello.txt")))[0]
    second = parse_responses(exchange(p.port, get("/hello.txt")))[0]
    assert first[0] == second[0] == 200 and first[2] == second[2] == b"hello world\n"
    assert first[1]["cache-status"] == "afpa; fwd=uri-miss; stored"
    assert second[1]["cache-status"] == "afpa; hit"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/metrics", timeout=5).read().decode()
    assert "afpa_cache_hits_total 1.0" in metrics
    assert 'afpa_state_transitions_total{machine="http",outcome="hit",state="derive_cached_response"} 1.0' in metrics
    assert "afpa_request_duration_seconds_bucket" in metrics
    dot = urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/tables/http.dot", timeout=5).read()
    assert dot.startswith(b'digraph "http"')


def test_admin_indexes_and_server_header(afpa_process):
    p = afpa_process()
    admin = f"http://127.0.0.1:{p.admin_port}"
    with urllib.request.urlopen(admin + "/", timeout=5) as r:
        root = r.read().decode()
        assert r.headers["Server"] == "afpa"
    assert all(f'href="{link}"' in root for link in ("/metrics", "/healthz", "/tables/"))
    with urllib.request.urlopen(admin + "/tables/", timeout=5) as r:
        index = r.read().decode()
        assert r.status == 200 and r.headers["Server"] == "afpa"
    for machine in ("http", "http-backend"):
        for ext in ("toml", "dot"):
            assert f'href="/tables/{machine}.{ext}"' in index
            with urllib.request.urlopen(f"{admin}/tables/{machine}.{ext}", timeout=5) as r:
                assert r.status == 200 and r.read()
    for path in ("/metrics", "/healthz"):
        with urllib.request.urlopen(admin + path, timeout=5) as r:
            assert r.headers["Server"] == "afpa"


def test_keep_alive_pipelining_head_and_304(afpa_process):
    p = afpa_process()
    raw = exchange(p.port, get("/hello.txt") + get("/page.html") + get("/dir/") + get("/hello.txt"), expect=4)
    resps = parse_responses(raw)
    assert [r[2] for r in resps] == [b"hello world\n", b"<h1>page</h1>\n", b"<p>index</p>\n", b"hello world\n"]
    assert resps[3][1]["cache-status"] == "afpa; hit"
    etag = resps[0][1]["etag"]
    raw = exchange(p.port, get("/hello.txt", method="HEAD") + get("/hello.txt", f"If-None-Match: {etag}")
                   + get("/page.html"), expect=3, head_only=(True,))
    head, not_modified, page = parse_responses(raw, head_only=(True,))
    assert head[0] == 200 and head[1]["content-length"] == "12" and head[2] == b""
    assert not_modified[0] == 304 and page[2] == b"<h1>page</h1>\n"


@pytest.mark.parametrize("target", [
    "/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/dir/..%2f..%2fetc%2fpasswd",
    "/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "/outside", "/hello.txt%00", "/dir/../../etc/passwd",
])
def test_traversal_refused(afpa_process, docroot, tmp_path, target):
    if not (docroot / "outside").exists():
        (tmp_path / "secret.txt").write_text("top secret")
        os.symlink(tmp_path / "secret.txt", docroot / "outside")
    p = afpa_process()
    [(status, _, body)] = parse_responses(exchange(p.port, get(target)))
    assert status in (400, 403, 404)
    assert b"root:" not in body and b"top secret" not in body


def rss_sampler(proc_status: str, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        try:
            for line in open(proc_status):
                if line.startswith("VmRSS:"):
                    peak[0] = max(peak[0], int(line.split()[1]))
        except OSError:
            return
        time.sleep(0.05)


def test_one_gib_file_with_bounded_memory(afpa_process, docroot):
    size = 1 << 30
    with open(docroot / "huge.bin", "wb") as f:
        f.truncate(size)  # sparse: the disk holds nothing, the server still reads 1 GiB
    p = afpa_process()
    base = p.rss_kib()
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=rss_sampler, args=(f"/proc/{p.proc.pid}/status", stop, peak))
    sampler.start()
    try:
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            s.sendall(get("/huge.bin"))
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(65536)
            head, _, got_bytes = head.partition(b"\r\n\r\n")
            assert b"Content-Length: %d" % size in head
            assert b"detail=too-large" in head
            got = len(got_bytes)
            buf = bytearray(1 << 20)
            while got < size:
                n = s.recv_into(buf)
                assert n, "connection closed early"
                got += n
    finally:
        stop.set()
        sampler.join()
    assert got == size
    # Memory stays bounded: a few chunks in flight, never the file.
    assert peak[0] - base < 64 * 1024, f"RSS grew by {peak[0] - base} KiB"


def test_malformed_request_while_another_download_carries_on(afpa_process, docroot):
    size = 64 << 20
    with open(docroot / "big.bin", "wb") as f:
        f.truncate(size)
    p = afpa_process()
    with socket.create_connection(("127.0.0.1", p.port), timeout=30) as dl:
        dl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        dl.sendall(get("/big.bin"))
        first = dl.recv(65536)  # the download has started and is now stalled on us
        assert first.startswith(b"HTTP/1.1 200 ")
        got = len(first.partition(b"\r\n\r\n")[2])
        bad = exchange(p.port, b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        assert bad.startswith(b"HTTP/1.1 400 ")
        good = parse_responses(exchange(p.port, get("/hello.txt")))
        assert good[0][2] == b"hello world\n"
        while got < size:
            chunk = dl.recv(1 << 20)
            assert chunk, "download cut short"
            got += len(chunk)
    assert got == size


def test_edited_table_changes_behaviour(afpa_process, tmp_path):
    out = subprocess.run([sys.executable, "-m", "afpa", "tables", "show", "http"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    edited = out.replace('complete = "derive_cached_response"', 'complete = "derive_miss_response"')
    start = edited.index("[states.derive_cached_response]")
    edited = edited[:start] + edited[edited.index("[states.derive_miss_response]"):]
    table = tmp_path / "my-http.toml"
    table.write_text(edited)
    check = subprocess.run([sys.executable, "-m", "afpa", "tables", "check", str(table)], cwd=REPO,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    p = afpa_process("--table", str(table))
    for _ in range(2):
        [(status, h, body)] = parse_responses(exchange(p.port, get("/hello.txt")))
        assert status == 200 and h["cache-status"] == "afpa; fwd=bypass"


def test_invalid_table_never_runs(docroot, tmp_path):
    table = tmp_path / "bad.toml"
    table.write_text((REPO / "statetables" / "http.toml").read_text().replace('ready = "send_engine"', 'ready = "nowhere"'))
    res = subprocess.run([sys.executable, "-m", "afpa", "serve", "--root", str(docroot), "--table", str(table),
                          "--listen", "127.0.0.1:0"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert "[states.derive_uncached_response] on.ready: unknown target state 'nowhere'" in res.stderr


def test_tables_cli(tmp_path):
    def afpa(*args):
        # PYTHONPATH: this checkout's afpa, not whichever one is installed.
        return subprocess.run([sys.executable, "-m", "afpa", *args], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})

    shown = afpa("tables", "show", "http")
    assert shown.returncode == 0 and shown.stdout == (REPO / "statetables" / "http.toml").read_text()
    mine = tmp_path / "my-http.toml"
    mine.write_text(shown.stdout)
    assert afpa("tables", "check", str(mine)).returncode == 0
    mine.write_text(shown.stdout.replace('run = "derive_miss_response"', 'run = "nope"')
                    .replace('hit = "send_engine"', 'hit = "gone"'))
    bad = afpa("tables", "check", str(mine))
    assert bad.returncode == 1
    assert "[states.derive_miss_response] run: unknown function 'nope'" in bad.stderr
    assert "[states.derive_cached_response] on.hit: unknown target state 'gone'" in bad.stderr
    dot = afpa("tables", "graph", "http")
    assert dot.returncode == 0 and '"derive_request" -> "derive_cached_response"' in dot.stdout
    mermaid = afpa("tables", "graph", "http", "--mermaid")
    assert mermaid.stdout.startswith("stateDiagram-v2")


def test_serve_defaults_to_current_directory(tmp_path):
    """`afpa serve` with no options serves the current directory (on 8080 by default;
    here --listen picks a free port so the test never collides)."""
    (tmp_path / "x.txt").write_text("cwd file")
    port = free_port()
    child = subprocess.Popen([sys.executable, "-m", "afpa", "serve", "--listen", f"127.0.0.1:{port}"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port(port, child)
        [(status, _, body)] = parse_responses(exchange(port, get("/x.txt")))
        assert (status, body) == (200, b"cwd file")
    finally:
        child.terminate()
        child.communicate(timeout=10)


def test_access_log(afpa_process, tmp_path):
    log = tmp_path / "access.log"
    p = afpa_process("--access-log", str(log))
    exchange(p.port, get("/hello.txt"))
    exchange(p.port, get("/hello.txt"))
    exchange(p.port, get("/missing"))
    p.stop()  # flushes
    lines = log.read_text().splitlines()
    assert len(lines) == 3
    # Combined log format, then Cache-Status and the state path.
    assert lines[0].startswith("127.0.0.1 - - [")
    assert '"GET /hello.txt HTTP/1.1" 200 12 "-" "-" "afpa; fwd=uri-miss; stored" derive_request:' in lines[0]
    assert '"GET /hello.txt HTTP/1.1" 200 12 "-" "-" "afpa; hit" derive_request:' in lines[1]
    assert lines[1].split()[-1].split(">")[1].startswith("derive_cached_response:")
    assert '"GET /missing HTTP/1.1" 404 ' in lines[2] and "send_engine:" in lines[2]


def test_dotfiles_denied_and_redirects_stay_on_this_host(afpa_process, docroot, tmp_path):
    """`afpa serve` in a checkout does not hand out .git, .env or .htaccess;
    `dotfiles_allow` opens a named one (the ACME case); a directory redirect
    never names another host."""
    (docroot / ".git").mkdir()
    (docroot / ".git" / "config").write_text("[remote]\nurl = secret\n")
    (docroot / ".env").write_text("SECRET=1\n")
    (docroot / ".htaccess").write_text("deny from all\n")
    (docroot / ".well-known" / "acme-challenge").mkdir(parents=True)
    (docroot / ".well-known" / "acme-challenge" / "tok").write_text("tok.key\n")
    acme = "/.well-known/acme-challenge/tok"
    p = afpa_process()
    for target in ("/.git/config", "/.env", "/.htaccess", "/%2eenv", "/dir/../.git/config", acme):
        [(status, _, body)] = parse_responses(exchange(p.port, get(target)))
        assert status == 404 and b"secret" not in body.lower(), target
    [(status, h, _)] = parse_responses(exchange(p.port, get("//evil.com/../dir")))
    assert (status, h["location"]) == (301, "/dir/")
    cfg = tmp_path / "afpa.toml"
    cfg.write_text('dotfiles_allow = [".well-known"]\n')
    p = afpa_process("--config", str(cfg))
    [(status, _, body)] = parse_responses(exchange(p.port, get(acme)))
    assert (status, body) == (200, b"tok.key\n")
    [(status, _, _)] = parse_responses(exchange(p.port, get("/.env")))
    assert status == 404
