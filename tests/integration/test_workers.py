"""``afpa serve --workers 2`` as real processes on loopback: both workers serve,
a killed worker is replaced without failing anyone else's requests, SIGTERM
drains every worker, and workers never outlive their supervisor."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.httpclient import parse_responses
from tests.integration.test_serve import get
from tests.integration.test_shutdown import finish, held_backend, read_response, sigterm_then_release  # noqa: F401

pytestmark = pytest.mark.integration


def workers(p) -> list[dict]:
    """The supervisor's view of its workers (admin ``/workers``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/workers", timeout=10) as r:
        return json.load(r)["workers"]


def wait_up(p, n: int, not_pids: set[int] = frozenset()) -> list[dict]:
    """Until ``n`` workers are serving (none of them with a pid in ``not_pids``)."""
    for _ in range(600):
        ws = workers(p)
        if sum(1 for w in ws if w["up"] and w["pid"] not in not_pids) == n:
            return ws
        time.sleep(0.05)
    raise AssertionError(f"workers not up: {ws}")


def children(pid: int) -> set[int]:
    return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def gone(pid: int) -> bool:
    """Exited (a zombie nobody reaped counts: it runs no code)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: being reaped right now
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def owner(client: socket.socket, pids) -> int:
    """The worker process holding the server side of a client's connection
    (found by the socket's inode in /proc: no header needed)."""
    port = client.getsockname()[1]
    server_port = client.getpeername()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1].endswith(f":{server_port:04X}") and f[2].endswith(f":{port:04X}"):
            inode = f[9]
    assert inode is not None
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds the connection")


def request(s: socket.socket, path: str = "/hello.txt") -> tuple[int, bytes]:
    s.sendall(get(path))
    [(status, _, body)] = parse_responses(read_response(s))
    return status, body


def sigstop(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until it is stopped (the signal lands asynchronously)."""
    os.kill(pid, signal.SIGSTOP)
    for _ in range(400):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] in "Tt":
            return
        time.sleep(0.005)


def connect_to(p, pid: int, others: list[int], probe: bool = True) -> socket.socket:
    """A keep-alive connection served by worker ``pid``: the others are stopped
    (SIGSTOP) while it is accepted, so only that worker can take it.  ``probe``:
    prove it with a request for /hello.txt; else wait until the worker holds it."""
    for other in others:
        sigstop(other)
    try:
        s = socket.create_connection(("127.0.0.1", p.port), timeout=30)
        if probe:
            assert request(s) == (200, b"hello world\n")
        else:
            for _ in range(400):
                try:
                    if owner(s, [pid, *others]) == pid:
                        break
                except AssertionError:  # not accepted yet
                    time.sleep(0.025)
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)
    assert owner(s, [pid, *others]) == pid
    return s


def test_two_workers_both_serve_and_log_whole_lines(afpa_process, tmp_path):
    log = tmp_path / "access.log"
    p = afpa_process("--workers", "2", "--access-log", str(log))
    ws = wait_up(p, 2)
    pids = [w["pid"] for w in ws]
    assert len(set(pids)) == 2 and set(pids) <= children(p.proc.pid)  # children of the supervisor
    a, b = pids
    conns = [connect_to(p, a, [b]), connect_to(p, b, [a])]
    try:
        for _ in range(50):
            for s in conns:
                assert request(s) == (200, b"hello world\n")
        by_pid = {w["pid"]: w for w in workers(p)}
        assert by_pid[a]["connections_total"] >= 1 and by_pid[b]["connections_total"] >= 1
        assert by_pid[a]["connections"] >= 1 and by_pid[b]["connections"] >= 1
    finally:
        for s in conns:
            s.close()
    err = p.stop()
    assert p.proc.returncode == 0, err
    lines = log.read_text().splitlines()
    assert len(lines) == 102 and all('"GET /hello.txt HTTP/1.1" 200' in line for line in lines), lines[:3]


def test_a_killed_worker_is_replaced_and_nobody_else_notices(afpa_process):
    p = afpa_process("--workers", "2")
    ws = wait_up(p, 2)
    victim, survivor = ws[0]["pid"], ws[1]["pid"]
    keep = [connect_to(p, survivor, [victim]) for _ in range(4)]
    doomed = [connect_to(p, victim, [survivor]) for _ in range(2)]
    stop = threading.Event()
    done = [0] * len(keep)
    failures: list[str] = []

    def loop(i: int, s: socket.socket) -> None:
        while not stop.is_set():
            try:
                assert request(s) == (200, b"hello world\n")
                done[i] += 1
            except Exception as exc:  # noqa: BLE001 (recorded, asserted below)
                failures.append(f"keep-alive {i}: {exc!r}")
                return

    threads = [threading.Thread(target=loop, args=(i, s), daemon=True) for i, s in enumerate(keep)]
    for t in threads:
        t.start()
    new_conn = 0

    def one_new_connection() -> None:
        nonlocal new_conn
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            assert request(s) == (200, b"hello world\n")
        new_conn += 1

    try:
        for _ in range(20):
            one_new_connection()
        before = list(done)
        os.kill(victim, signal.SIGKILL)
        for _ in range(400):
            if gone(victim):
                break
            time.sleep(0.01)
        assert gone(victim)
        # While the slot restarts and after: every new connection is served.
        for i in range(2000):
            one_new_connection()
            if i >= 20 and any(w["up"] and w["index"] == ws[0]["index"] and w["pid"] != victim
                               for w in workers(p)):
                break
        for _ in range(20):
            one_new_connection()
        after = wait_up(p, 2, not_pids={victim})
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    assert all(d > b for d, b in zip(done, before))  # the survivor's clients went on
    slot = after[0]
    assert slot["pid"] != victim and slot["restarts"] == 1 and slot["pid"] in children(p.proc.pid)
    assert after[1]["pid"] == survivor and after[1]["restarts"] == 0
    for s in doomed:  # the killed worker's own connections are gone with it
        s.settimeout(10)
        assert s.recv(1) == b""
    for s in keep + doomed:
        s.close()
    err = p.stop()
    assert f"worker 0 (pid {victim}) was killed by SIGKILL; restarting in 0.5 s" in err, err


def test_sigterm_drains_every_worker(afpa_process, held_backend):  # noqa: F811
    p = afpa_process("--workers", "2", "--backend", held_backend.url)
    a, b = (w["pid"] for w in wait_up(p, 2))
    clients = []
    try:
        # Half the requests on each worker (the other stopped while each is accepted).
        for i in range(40):
            pid, other = (a, b) if i % 2 else (b, a)
            sigstop(other)
            try:
                s = socket.create_connection(("127.0.0.1", p.port), timeout=60)
                # POST goes to the origin from the worker that took it (a GET would
                # go through its owner worker, which may be the stopped one).
                s.sendall(get(f"/slow/{i}", "Content-Length: 0", method="POST"))
                for _ in range(400):
                    if len(held_backend.requests) > i:
                        break
                    time.sleep(0.01)
            finally:
                os.kill(other, signal.SIGCONT)
            assert owner(s, [a, b]) == pid
            clients.append(s)
        assert len(held_backend.requests) == 40
        sigterm_then_release(p, held_backend, clients)
    finally:
        for s in clients:
            s.close()
    status, err = finish(p)
    assert status == 0, err
    assert "SIGTERM: draining 2 worker(s)" in err and "drained: every worker finished" in err, err
    assert gone(a) and gone(b)


def test_workers_exit_when_the_supervisor_dies(afpa_process):
    p = afpa_process("--workers", "2")
    pids = [w["pid"] for w in wait_up(p, 2)]
    p.proc.kill()
    p.proc.wait(10)
    for _ in range(600):
        if all(gone(pid) for pid in pids):
            break
        time.sleep(0.05)
    assert all(gone(pid) for pid in pids)
    err = p.proc.stderr.read().decode(errors="replace")
    assert "the supervisor went away: draining" in err, err


def test_bad_workers_values_are_one_line_errors(tmp_path):
    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "afpa", "serve", *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    r = run("--workers", "0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "argument --workers: expected a positive whole number or \"auto\" (one per CPU), got '0'" in r.stderr
    cfg = tmp_path / "afpa.toml"
    cfg.write_text('workers = "x"\n')
    r = run("--config", str(cfg))
    assert r.returncode == 1
    assert r.stderr == f"afpa: {cfg}: workers: expected a positive whole number or \"auto\" (one per CPU), got 'x' (a string)\n"


def test_workers_serve_plain_and_tls_listeners(afpa_process, tmp_path):
    import ssl

    from tests.conftest import free_port
    from tests.integration.test_remote import make_cert

    cert, key = make_cert(tmp_path, "afpa.test")
    tls_port = free_port()
    cfg = tmp_path / "afpa.toml"
    cfg.write_text(f'workers = 2\n[tls]\nlisten = "127.0.0.1:{tls_port}"\n'
                   f'[[tls.certificate]]\ncert = "{cert}"\nkey = "{key}"\n')
    p = afpa_process("--config", str(cfg))
    a, b = (w["pid"] for w in wait_up(p, 2))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cert)
    for pid, other in ((a, b), (b, a)):  # each worker, on each listener
        with connect_to(p, pid, [other]) as s:
            assert request(s) == (200, b"hello world\n")
        sigstop(other)
        try:
            with socket.create_connection(("127.0.0.1", tls_port), timeout=30) as raw:
                with ctx.wrap_socket(raw, server_hostname="afpa.test") as s:
                    assert s.selected_alpn_protocol() in (None, "http/1.1")
                    assert request(s) == (200, b"hello world\n")
        finally:
            os.kill(other, signal.SIGCONT)
    err = p.stop()
    assert f"listening on https://127.0.0.1:{tls_port}/ (2 workers)" in err, err


def test_sighup_reloads_every_worker_and_reopens_their_logs(afpa_process, tmp_path):
    log = tmp_path / "access.log"
    p = afpa_process("--workers", "2", "--access-log", str(log))
    a, b = (w["pid"] for w in wait_up(p, 2))
    conns = {"A": connect_to(p, a, [b]), "B": connect_to(p, b, [a])}
    try:
        log.rename(tmp_path / "access.log.1")  # as logrotate does
        p.proc.send_signal(signal.SIGHUP)
        for _ in range(300):  # each worker reopens, then flushes about once a second
            for name, s in conns.items():
                assert request(s, f"/hello.txt?w={name}") == (200, b"hello world\n")
            text = log.read_text() if log.exists() else ""
            if "w=A" in text and "w=B" in text:
                break
            time.sleep(0.05)
        assert "w=A" in text and "w=B" in text
    finally:
        for s in conns.values():
            s.close()
    assert p.proc.poll() is None  # SIGHUP never stops anyone
    assert [w["restarts"] for w in workers(p)] == [0, 0]
    err = p.stop()
    assert "reloaded every worker" in err and err.count("access log reopened") == 2, err


def test_the_supervisors_admin_answers_for_every_worker(afpa_process, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-for-the-admin\n")
    p = afpa_process("--workers", "2", "--admin-token-file", str(token))
    a, b = (w["pid"] for w in wait_up(p, 2))
    conns = [connect_to(p, a, [b]), connect_to(p, b, [a])]  # one request each already
    try:
        for s in conns:
            for _ in range(4):
                assert request(s) == (200, b"hello world\n")
    finally:
        for s in conns:
            s.close()
    base = f"http://127.0.0.1:{p.admin_port}"
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'afpa_requests_total{machine="http",status_class="2xx"} 10.0' in text
    assert "afpa_workers 2.0" in text and 'afpa_worker_up{worker="1"} 1.0' in text
    with urllib.request.urlopen(base + "/machines/http.json", timeout=10) as r:
        view = json.load(r)
    assert {s["name"]: s["entries"] for s in view["states"]}["derive_request"] >= 10
    purge = urllib.request.Request(base + "/cache/purge", method="POST", data=json.dumps(
        {"url": "http://127.0.0.1/hello.txt"}).encode(),  # the Host the requests sent
        headers={"Authorization": "Bearer s3cret-token-for-the-admin"})
    with urllib.request.urlopen(purge, timeout=10) as r:
        result = json.load(r)
    assert result["workers"] == 2 and result["errors"] == [] and result["purged"] == 2  # one copy in each worker


def test_reload_swaps_every_worker_or_none(afpa_process, tmp_path):
    """POST /reload (what ``afpa reload`` sends) through the supervisor: every worker
    takes the new configuration; a broken one changes nothing anywhere and says
    where the problem is."""
    two = tmp_path / "two"
    (two / "extra").mkdir(parents=True)
    (two / "extra" / "new.txt").write_text("new root\n")  # a docroot route maps the whole path
    token = tmp_path / "token"
    token.write_text("s3cret-token-for-the-admin\n")
    cfg = tmp_path / "afpa.toml"
    base = f'admin_token_file = "{token}"\n'
    route = f'[[route]]\nprefix = "/extra/"\nto = "docroot"\nroot = "{two}"\n'
    cfg.write_text(base)
    p = afpa_process("--workers", "2", "--config", str(cfg))
    a, b = (w["pid"] for w in wait_up(p, 2))
    conns = [connect_to(p, a, [b]), connect_to(p, b, [a])]

    def reload_cli() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "afpa", "reload", "--admin", f"127.0.0.1:{p.admin_port}",
                               "--admin-token-file", str(token)], cwd=REPO, capture_output=True, text=True,
                              timeout=60)

    try:
        assert [request(s, "/extra/new.txt")[0] for s in conns] == [404, 404]
        cfg.write_text(base + route)
        done = reload_cli()
        assert done.returncode == 0, done.stderr
        assert [request(s, "/extra/new.txt") for s in conns] == [(200, b"new root\n")] * 2  # both workers
        cfg.write_text(base + "timeouts = 5\n")
        done = reload_cli()
        assert done.returncode == 1 and f"{cfg}:2:" in done.stderr, done.stderr
        assert [request(s, "/extra/new.txt") for s in conns] == [(200, b"new root\n")] * 2  # nothing changed
    finally:
        for s in conns:
            s.close()
    assert [w["restarts"] for w in workers(p)] == [0, 0]


def test_workers_share_one_cache_each_url_fetched_once(afpa_process, backend):
    """Each URL has one owner worker that stores it; the other asks the owner, so a
    URL requested through both workers reaches the origin once, and a killed owner
    costs no failed request (the other serves its URLs meanwhile)."""
    origin = backend(lambda head, body: b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\n"
                                        b"Content-Length: 6\r\n\r\norigin")
    p = afpa_process("--workers", "2", "--backend", origin.url, "--cache-size", "64M")
    a, b = (w["pid"] for w in wait_up(p, 2))
    conns = {a: connect_to(p, a, [b], probe=False), b: connect_to(p, b, [a], probe=False)}
    paths = [f"/u{i}" for i in range(20)]
    try:
        for path in paths:
            for s in conns.values():
                assert request(s, path) == (200, b"origin")
        seen = [h.split(b" ")[1].decode() for h in origin.requests]
        assert sorted(x for x in seen if x.startswith("/u")) == sorted(paths)  # once each
        with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert "afpa_cache_budget_bytes 6.7108864e+07" in text  # 64M for the whole server
        os.kill(b, signal.SIGKILL)  # the owner of about half of them
        conns.pop(b).close()
        for path in paths:
            assert request(conns[a], path) == (200, b"origin")
        wait_up(p, 2, not_pids={b})
    finally:
        for s in conns.values():
            s.close()


def test_a_hot_url_is_answered_by_every_worker_itself(afpa_process, backend):
    """Asked of its owner often enough (siblings.replica_after, 4), a URL gets a copy
    in the asking worker too: popular objects stay on every worker's fast path, so
    each worker answers them even while the other is stopped."""
    origin = backend(lambda head, body: b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\n"
                                        b"Content-Length: 3\r\n\r\nhot")
    p = afpa_process("--workers", "2", "--backend", origin.url)
    a, b = (w["pid"] for w in wait_up(p, 2))
    conns = {a: connect_to(p, a, [b], probe=False), b: connect_to(p, b, [a], probe=False)}
    try:
        for _ in range(5):
            for s in conns.values():
                assert request(s, "/hot") == (200, b"hot")
        assert len(origin.requests) == 1
        for pid, other in ((a, b), (b, a)):
            sigstop(other)
            try:
                conns[pid].settimeout(10)
                status, body = request(conns[pid], "/hot")
                assert (status, body) == (200, b"hot")
            finally:
                os.kill(other, signal.SIGCONT)
    finally:
        for s in conns.values():
            s.close()
