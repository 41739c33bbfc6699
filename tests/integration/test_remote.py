"""Derive Remote and Deferred Response over real sockets: afpa in front of test backends."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO
from tests.httpclient import parse_responses
from tests.integration.backends import response
from tests.integration.test_serve import exchange, get, rss_sampler

pytestmark = pytest.mark.integration


def one(port, data, **kw):
    [r] = parse_responses(exchange(port, data, **kw))
    return r


def test_cacheable_response_stored_while_streaming(afpa_process, backend):
    b = backend(lambda head, body: response(b"fresh body", "Cache-Control: max-age=60", "ETag: \"v1\""))
    p = afpa_process("--backend", b.url)
    status, h, body = one(p.port, get("/page"))
    assert (status, body) == (200, b"fresh body")
    assert h["cache-status"] == "afpa; fwd=uri-miss; fwd-status=200; stored"
    assert h["via"] == "1.1 afpa"
    status, h, body = one(p.port, get("/page"))
    assert (status, body, h["cache-status"]) == (200, b"fresh body", "afpa; hit")
    assert "age" in h and h["etag"] == '"v1"'
    status, h, _ = one(p.port, get("/page", 'If-None-Match: "v1"'))
    assert status == 304
    assert len(b.requests) == 1


@pytest.mark.parametrize("resp_headers,req_headers", [
    (("Cache-Control: no-store",), ()),
    (("Cache-Control: private, max-age=60",), ()),
    (("Cache-Control: max-age=60", "Set-Cookie: a=b"), ()),
    (("Cache-Control: max-age=60", "Vary: *"), ()),
    (("Cache-Control: max-age=60",), ("Authorization: Basic eDp5",)),
    ((), ()),  # no explicit freshness
    (("Expires: Thu, 01 Jan 1970 00:00:00 GMT",), ()),
])
def test_uncacheable_passes_through(afpa_process, backend, resp_headers, req_headers):
    b = backend(lambda head, body: response(b"dynamic", *resp_headers))
    p = afpa_process("--backend", b.url)
    for _ in range(2):
        status, h, body = one(p.port, get("/dyn", *req_headers))
        assert (status, body) == (200, b"dynamic")
        assert "stored" not in h["cache-status"]
    assert len(b.requests) == 2


def test_headers_rewritten_both_ways(afpa_process, backend):
    b = backend(lambda head, body: response(b"x", "Connection: close, X-Hop", "X-Hop: secret", "Keep-Alive: timeout=5",
                                            "X-End: kept"))
    p = afpa_process("--backend", b.url)
    status, h, _ = one(p.port, get("/h", "Connection: X-Client-Hop", "X-Client-Hop: 1", "Keep-Alive: 300",
                                   "X-Forwarded-For: 6.6.6.6", "Proxy-Authorization: Basic x", "TE: trailers",
                                   "Via: 1.0 upstream", "Forwarded: for=6.6.6.6", "X-Real-IP: 6.6.6.6",
                                   "True-Client-IP: 6.6.6.6", "X-Forwarded-Proto: https"))
    assert status == 200 and "x-hop" not in h and "keep-alive" not in h and h["x-end"] == "kept"
    sent = b.requests[0].decode().lower()
    for gone in ("x-client-hop", "keep-alive", "proxy-authorization", "te: trailers", "6.6.6.6", "forwarded:",
                 "x-real-ip", "true-client-ip", "x-forwarded-proto: https"):
        assert gone not in sent
    assert "x-forwarded-for: 127.0.0.1" in sent
    assert "x-forwarded-proto: http" in sent and "x-forwarded-host: 127.0.0.1" in sent
    assert "via: 1.0 upstream, 1.1 afpa" in sent


def test_trusted_forwarded_headers_are_appended(afpa_process, backend):
    b = backend(lambda head, body: response(b"x"))
    p = afpa_process("--backend", b.url, "--trusted-proxy", "127.0.0.0/8")
    one(p.port, get("/", "X-Forwarded-For: 10.1.2.3", "X-Forwarded-Proto: https", "X-Real-IP: 10.1.2.3"))
    sent = b.requests[0].decode().lower()
    assert sent.count("x-forwarded-for:") == 1 and "x-forwarded-for: 10.1.2.3, 127.0.0.1\r\n" in sent
    assert "x-forwarded-proto: https" in sent and "x-real-ip: 10.1.2.3" in sent


def test_connect_refused_502(afpa_process):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    p = afpa_process("--backend", f"http://127.0.0.1:{dead}")
    status, h, body = one(p.port, get("/"))
    assert status == 502 and b"cannot connect" in body


def test_first_byte_timeout_504(afpa_process, backend, tmp_path):
    b = backend(lambda head, body: (lambda c: time.sleep(5)))
    cfg = tmp_path / "afpa.toml"
    cfg.write_text(f'backend = "{b.url}"\n[timeouts]\nbackend_first_byte = 0.5\n')
    p = afpa_process("--config", str(cfg))
    status, _, body = one(p.port, get("/slow"))
    assert status == 504


def test_backend_dies_mid_body_client_is_cut_nothing_cached(afpa_process, backend):
    def respond(head, body):
        def half(c):
            c.sendall(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 1000\r\n\r\n" + b"a" * 400)
        return half
    b = backend(respond)
    p = afpa_process("--backend", b.url)
    for _ in range(2):
        raw = exchange(p.port, get("/partial"))
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"Content-Length: 1000" in head and len(body) < 1000  # cut, never complete
    assert len(b.requests) == 2  # nothing was stored


@pytest.mark.parametrize("bad", [
    b"HTTP/1.1 2OO OK\r\nContent-Length: 1\r\n\r\nx",
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
])
def test_malformed_backend_response_502_never_cached(afpa_process, backend, bad):
    b = backend(lambda head, body: bad.replace(b"\r\n\r\n", b"\r\nCache-Control: max-age=60\r\n\r\n", 1)
                if bad.startswith(b"HTTP") else bad)
    p = afpa_process("--backend", b.url)
    for _ in range(2):
        status, _, body = one(p.port, get("/bad"))
        assert status == 502
    assert len(b.requests) == 2


def test_keepalive_pool_reused_across_clients(afpa_process, backend):
    b = backend(lambda head, body: response(b"ok"))
    p = afpa_process("--backend", b.url)
    for _ in range(3):
        assert one(p.port, get("/"))[2] == b"ok"
    assert b.connections == 1 and len(b.requests) == 3
    import urllib.request
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/metrics", timeout=5).read().decode()
    assert f'afpa_backend_connections_opened_total{{backend="{b.url}"}} 1.0' in metrics
    assert f'afpa_backend_connections_reused_total{{backend="{b.url}"}} 2.0' in metrics
    # The backend machine's result for each request: relayed, ending on @done (the pool keeps the connection).
    assert 'afpa_state_transitions_total{machine="http-backend",outcome="relayed",state="backend_stream_body"} 3.0' in metrics


def test_idempotent_request_retried_on_fresh_connection(afpa_process, backend):
    answers = iter([None, response(b"second try")])
    b = backend(lambda head, body: next(answers))
    p = afpa_process("--backend", b.url)
    status, _, body = one(p.port, get("/"))
    assert (status, body) == (200, b"second try") and b.connections == 2


def test_post_not_retried(afpa_process, backend):
    b = backend(lambda head, body: None)
    p = afpa_process("--backend", b.url)
    raw = exchange(p.port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
    assert raw.startswith(b"HTTP/1.1 502") and len(b.requests) == 1


def test_request_bodies_forwarded(afpa_process, backend):
    b = backend(lambda head, body: response(b"got %d" % len(body)))
    p = afpa_process("--backend", b.url)
    status, _, body = one(p.port, b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    assert body == b"got 5" and b.bodies[-1] == b"hello"
    status, _, body = one(p.port, b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert body == b"got 5" and b.bodies[-1] == b"abcde"
    assert b"transfer-encoding: chunked" in b.requests[-1].lower()


def test_bad_chunk_answered_400_and_backend_never_sees_a_clean_end(afpa_process, backend):
    b = backend(lambda head, body: response(b"should not happen"))
    p = afpa_process("--backend", b.url)
    raw = exchange(p.port, b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
    assert raw.startswith(b"HTTP/1.1 400")
    assert b.bodies == []


def test_chunked_backend_body_relayed_to_http10_client_by_close(afpa_process, backend):
    b = backend(lambda head, body: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    p = afpa_process("--backend", b.url)
    status, h, body = one(p.port, get("/c"))
    assert h["transfer-encoding"] == "chunked"
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"GET /c HTTP/1.0\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):  # the end of this body is the close
            raw += chunk
    assert raw.endswith(b"\r\n\r\nabc") and b"Connection: close" in raw


def stream_backend(size: int):
    """A backend that answers every request with ``size`` zero bytes (chunked) and
    counts the request body it reads without keeping it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    got = {"body": 0}

    def serve():
        c, _ = srv.accept()
        with c:
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += c.recv(65536)
            head, rest = buf.split(b"\r\n\r\n", 1)
            n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]) if b"content-length" in head.lower() else 0
            got["body"] = len(rest)
            while got["body"] < n:
                got["body"] += len(c.recv(1 << 20))
            c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n" % (1 << 20) + b"\0" * (1 << 20) + b"\r\n"
            for _ in range(size >> 20):
                c.sendall(chunk)
            c.sendall(b"0\r\n\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, got, t


def test_gib_download_and_upload_with_bounded_memory(afpa_process):
    size = 1 << 30
    srv, got, t = stream_backend(size)
    p = afpa_process("--backend", f"http://127.0.0.1:{srv.getsockname()[1]}")
    base = p.rss_kib()
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=rss_sampler, args=(f"/proc/{p.proc.pid}/status", stop, peak))
    sampler.start()
    received = 0
    try:
        with socket.create_connection(("127.0.0.1", p.port), timeout=60) as s:
            s.sendall(b"PUT /big HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
            block = b"\0" * (1 << 20)
            for _ in range(size >> 20):
                s.sendall(block)
            raw = b""
            while b"\r\n\r\n" not in raw:
                raw += s.recv(65536)
            head, _, rest = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            tail = rest
            buf = bytearray(1 << 20)
            while not tail.endswith(b"0\r\n\r\n"):
                n = s.recv_into(buf)
                assert n, "connection closed early"
                received += n
                tail = (tail + bytes(buf[:n]))[-16:]
            received += len(rest)
    finally:
        stop.set()
        sampler.join()
        t.join(timeout=30)
        srv.close()
    assert got["body"] == size
    assert received > size  # the body plus chunk framing
    assert peak[0] - base < 96 * 1024, f"RSS grew by {peak[0] - base} KiB"


def test_defer_splices_raw_bytes(afpa_process, backend):
    b = backend(lambda head, body: response(b"from local server"))
    p = afpa_process("--defer", b.url)
    raw = exchange(p.port, get("/a", "X-Odd: kept as sent") + get("/b"), expect=2)
    resps = parse_responses(raw)
    assert [r[2] for r in resps] == [b"from local server"] * 2
    assert "via" not in resps[0][1]  # afpa only relayed bytes
    assert b"X-Odd: kept as sent" in b.requests[0] and b"via" not in b.requests[0].lower()
    assert b.connections == 1


WS = ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
      "Sec-WebSocket-Version: 13")


def test_upgrade_refused_by_backend_keeps_the_connection_parsed(afpa_process, backend):
    """An Upgrade the backend does not take (200) is an ordinary request: what
    follows on the connection is parsed by afpa, so a smuggling attempt is refused."""
    b = backend(lambda head, body: response(b"no switch"))
    p = afpa_process("--backend", b.url)
    smuggled = (b"POST /admin HTTP/1.1\r\nHost: internal\r\nContent-Length: 4\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    raw = exchange(p.port, get("/ws", *WS, "X-Forwarded-For: 6.6.6.6") + smuggled, expect=2)
    first, second = parse_responses(raw)
    assert (first[0], first[2]) == (200, b"no switch")
    assert second[0] == 400
    assert len(b.requests) == 1  # the CL+TE request never reached the backend
    sent = b.requests[0].lower()
    assert b"x-forwarded-for: 127.0.0.1" in sent and b"6.6.6.6" not in sent
    assert b"upgrade: websocket" in sent and b"connection: upgrade" in sent


def test_websocket_upgrade_spliced_after_101(afpa_process, backend):
    def upgrade(head, body):
        def echo(c):
            # The backend may speak first, in the same segment as its 101.
            c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nhello")
            data = b""
            while not data.endswith(b"ping"):
                data += c.recv(100)
            c.sendall(b"echo:" + data)
        return echo
    b = backend(upgrade)
    p = afpa_process("--backend", b.url)
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(get("/ws", *WS, "X-Forwarded-For: 6.6.6.6", "Connection: keep-alive, X-Hop", "X-Hop: 1"))
        raw = b""
        while b"hello" not in raw:
            chunk = s.recv(4096)
            assert chunk
            raw += chunk
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        lower = head.lower()
        assert b"upgrade: websocket" in lower and b"connection: upgrade" in lower
        assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in lower
        assert rest == b"hello"
        s.sendall(b"ping")
        reply = b""
        while b"echo:ping" not in reply:
            chunk = s.recv(4096)
            assert chunk
            reply += chunk
        assert s.recv(4096) == b""  # the backend closed: so does the client side
    sent = b.requests[0].lower()
    assert b"upgrade: websocket" in sent and b"connection: upgrade" in sent
    assert b"sec-websocket-key: dghlihnhbxbszsbub25jzq==" in sent
    assert b"x-forwarded-for: 127.0.0.1" in sent and b"6.6.6.6" not in sent
    assert b"x-hop" not in sent and b"keep-alive" not in sent


def test_h2c_upgrade_forwarded_as_an_ordinary_request(afpa_process, backend):
    answers = iter([response(b"plain"),
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"])
    b = backend(lambda head, body: next(answers))
    p = afpa_process("--backend", b.url)
    status, _, body = one(p.port, get("/h2", "Upgrade: h2c", "Connection: Upgrade, HTTP2-Settings",
                                      "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"))
    assert (status, body) == (200, b"plain")
    sent = b.requests[0].lower()
    assert b"upgrade" not in sent and b"http2-settings" not in sent
    # A backend that switches anyway, unasked: never relayed.
    status, _, _ = one(p.port, get("/h2", "Upgrade: h2c", "Connection: Upgrade"))
    assert status == 502


def test_backend_101_to_another_protocol_than_asked_is_502(afpa_process, backend):
    b = backend(lambda head, body: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
    p = afpa_process("--backend", b.url)
    status, _, _ = one(p.port, get("/ws", *WS))
    assert status == 502


def test_deferred_route_still_splices_upgrades(afpa_process, backend):
    def upgrade(head, body):
        def echo(c):
            c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            c.sendall(b"echo:" + c.recv(100))
        return echo
    b = backend(upgrade)
    p = afpa_process("--defer", b.url)
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(get("/ws", *WS, "X-Forwarded-For: 6.6.6.6"))
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += s.recv(4096)
        assert raw.startswith(b"HTTP/1.1 101")
        s.sendall(b"ping")
        reply = raw.partition(b"\r\n\r\n")[2]
        while b"echo:ping" not in reply:
            chunk = s.recv(4096)
            assert chunk
            reply += chunk
    assert b"X-Forwarded-For: 6.6.6.6" in b.requests[0]  # the operator chose raw bytes


@pytest.mark.parametrize("te", ["gzip", "gzip, chunked"])
def test_backend_transfer_coding_passed_on(afpa_process, backend, te):
    """RFC 9112 6.3: with a coding afpa does not undo, the body is relayed (read
    until the close when chunked is not last) and named to an HTTP/1.1 client;
    an HTTP/1.0 client, which cannot receive a transfer coding, gets 502."""
    coded = b"\x1f\x8b pretend-gzip"
    body = coded if te == "gzip" else b"%x\r\n" % len(coded) + coded + b"\r\n0\r\n\r\n"
    b = backend(lambda head, _: b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: "
                + te.encode() + b"\r\n\r\n" + body if te != "gzip" else (lambda c: c.sendall(
                    b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: gzip\r\n\r\n" + body)))
    p = afpa_process("--backend", b.url)
    raw = exchange(p.port, get("/z") + get("/z"), expect=2)
    resps = parse_responses(raw)
    for status, h, got in resps:
        assert (status, got) == (200, coded)
        assert h["transfer-encoding"] == "gzip, chunked" and "stored" not in h["cache-status"]
    assert len(b.requests) == 2  # never stored
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"GET /z HTTP/1.0\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 502") and b"transfer-encoding" not in raw.lower()


def make_cert(tmp_path, name: str):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=10))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_termination(afpa_process, backend, tmp_path):
    cert, key = make_cert(tmp_path, "afpa.test")
    b = backend(lambda head, body: response(b"over tls", "Cache-Control: max-age=60"))
    p = afpa_process("--backend", b.url, "--tls-cert", str(cert), "--tls-key", str(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cert)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    for expected in ("afpa; fwd=uri-miss; fwd-status=200; stored", "afpa; hit"):
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="afpa.test") as s:
                assert s.selected_alpn_protocol() == "http/1.1"
                assert s.version() in ("TLSv1.2", "TLSv1.3")
                s.sendall(get("/secure"))
                data = b""
                while not data.endswith(b"over tls"):
                    chunk = s.recv(4096)
                    assert chunk
                    data += chunk
        [(status, h, body)] = parse_responses(data)
        assert h["cache-status"] == expected
    assert b"x-forwarded-proto: https" in b.requests[0].lower()


@pytest.mark.parametrize("mistake,message", [
    ("key-is-dir", "{dir}: TLS private key: is a directory, not a PEM file"),
    ("missing-cert", "{dir}/missing.crt: TLS certificate: no such file"),
    ("cert-not-pem", "{dir}/junk.pem: TLS certificate: not a PEM certificate"),
    ("key-not-pem", "{dir}/junk.pem: TLS private key: not a PEM private key"),
    ("mismatched-key", "{dir}/other.test.key: TLS private key does not match the certificate"),
])
def test_tls_file_mistakes_are_one_line(tmp_path, mistake, message):
    cert, key = make_cert(tmp_path, "afpa.test")
    _, other_key = make_cert(tmp_path, "other.test")
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not a certificate\n")
    cert, key = {"key-is-dir": (cert, tmp_path), "missing-cert": (tmp_path / "missing.crt", key),
                 "cert-not-pem": (junk, key), "key-not-pem": (cert, junk),
                 "mismatched-key": (cert, other_key)}[mistake]
    res = subprocess.run([sys.executable, "-m", "afpa", "serve", "--listen", "127.0.0.1:0",
                          "--tls-cert", str(cert), "--tls-key", str(key)],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("afpa: " + message.format(dir=tmp_path)), res.stderr


def test_tls_handshake_timeout_closes_a_silent_client(afpa_process, tmp_path):
    cert, key = make_cert(tmp_path, "afpa.test")
    p = afpa_process("--tls-cert", str(cert), "--tls-key", str(key), "--tls-handshake-timeout", "0.5")
    with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
        s.sendall(b"\x16\x03\x01")  # the start of a ClientHello, never finished
        try:
            assert s.recv(4096) == b""  # closed by afpa (the socket timeout bounds the wait)
        except ConnectionResetError:
            pass  # an abort may arrive as a reset: closed all the same
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cert)
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="afpa.test") as s:
            s.sendall(get("/hello.txt"))
            assert s.recv(4096).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("route", ["defer", "backend"])
def test_idle_tunnel_is_closed(afpa_process, backend, tmp_path, route):
    seen = []

    def silent(head, body):
        def hold(c):
            c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            c.settimeout(10)
            try:
                seen.append(c.recv(10))  # b"" once afpa closes the tunnel's backend side
            except OSError as exc:
                seen.append(exc)
        return hold
    b = backend(silent)
    cfg = tmp_path / "afpa.toml"
    cfg.write_text(f'{route} = "{b.url}"\n[timeouts]\ntunnel_idle = 0.5\n')
    p = afpa_process("--config", str(cfg))
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(get("/t", *WS))
        raw = b""
        try:
            while chunk := s.recv(4096):
                raw += chunk
        except ConnectionResetError:
            pass
    assert raw.startswith(b"HTTP/1.1 101")  # and then the idle tunnel was closed
    for _ in range(100):
        if seen:
            break
        time.sleep(0.1)
    assert seen and not isinstance(seen[0], socket.timeout), seen  # the backend side too


def test_slow_client_pauses_the_backend_read(afpa_process):
    """A client that stops reading makes afpa stop reading the backend: memory stays
    bounded and the backend's own writes block, instead of afpa buffering it all."""
    size = 256 << 20
    srv, got, t = stream_backend(size)
    p = afpa_process("--backend", f"http://127.0.0.1:{srv.getsockname()[1]}")
    base = p.rss_kib()
    with socket.create_connection(("127.0.0.1", p.port), timeout=60) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        s.recv(65536)
        time.sleep(1.5)  # not reading: the backend must be held back by afpa
        stalled_rss = p.rss_kib()
        assert t.is_alive()  # the backend is still blocked writing
        received = 0
        s.settimeout(30)
        while True:
            chunk = s.recv(1 << 20)
            assert chunk, "connection closed early"
            received += len(chunk)
            if chunk.endswith(b"0\r\n\r\n"):
                break
    t.join(timeout=30)
    srv.close()
    assert received > size - (1 << 20)
    assert stalled_rss - base < 32 * 1024, f"RSS grew by {stalled_rss - base} KiB while the client was stalled"


# -- issue 11: backend failures, resets, connection limits ------------------------

def test_get_whose_retry_is_refused_gets_502(afpa_process, backend):
    """The backend reads the request, closes without answering and stops
    listening (a restart): the retry's connect is refused, and the client gets
    a 502 instead of waiting forever."""
    def respond(head, body):
        b.sock.shutdown(socket.SHUT_RDWR)  # stop listening (close alone leaves accept() running)
        b.sock.close()
        return None
    b = backend(respond)
    p = afpa_process("--backend", b.url)
    status, _, body = one(p.port, get("/restart"), timeout=15)
    assert status == 502 and len(b.requests) == 1
    assert b"Traceback" not in body and b"Error" not in body.split(b"\n", 1)[1]


def test_close_delimited_body_ended_by_reset_is_cut_and_not_stored(afpa_process, backend):
    """A body delimited by the close and ended by a TCP reset is not complete: the
    client sees no terminating chunk, and nothing is stored."""
    relayed = threading.Event()

    def reset_after_body(c):
        c.sendall(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n\r\n" + b"r" * 500)
        relayed.wait(10)  # the client has the bytes: afpa read them before the reset
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()

    answers = iter([reset_after_body, response(b"whole", "Cache-Control: max-age=60")])
    b = backend(lambda head, body: next(answers))
    p = afpa_process("--backend", b.url)
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(get("/reset"))
        raw = b""
        while b"r" * 500 not in raw:
            chunk = s.recv(65536)
            assert chunk
            raw += chunk
        relayed.set()
        try:
            while chunk := s.recv(65536):
                raw += chunk
        except ConnectionResetError:
            pass
    assert b"Transfer-Encoding: chunked" in raw and not raw.endswith(b"0\r\n\r\n")
    status, h, body = one(p.port, get("/reset"))
    assert (status, body) == (200, b"whole") and "hit" not in h["cache-status"]
    assert len(b.requests) == 2


def held_backend(backend):
    """A backend whose answers wait until ``release`` is set."""
    release = threading.Event()

    def respond(head, body):
        release.wait(20)
        return response(b"done " + head.split(b" ")[1], "Cache-Control: no-store")
    return backend(respond), release


def config(tmp_path, url, **sections):
    text = f'backend = "{url}"\n'
    for name, keys in sections.items():
        text += f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
    path = tmp_path / "afpa.toml"
    path.write_text(text)
    return str(path)


def wait_until(check, what: str, limit: float = 10.0):
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_connections_per_backend_are_bounded_and_requests_queue(afpa_process, backend, tmp_path):
    b, release = held_backend(backend)
    p = afpa_process("--config", config(tmp_path, b.url, backends={"max_connections": 2}))
    results: dict[int, tuple] = {}

    def client(i):
        results[i] = one(p.port, get(f"/q{i}"), timeout=20)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: len(b.requests) == 2, "two requests reach the backend")
    time.sleep(0.3)  # the third one is given the chance to (wrongly) open a connection
    assert b.connections == 2 and len(b.requests) == 2
    release.set()
    for t in threads:
        t.join(30)
    assert sorted(r[0] for r in results.values()) == [200, 200, 200]
    assert all(results[i][2] == b"done /q%d" % i for i in range(3))
    assert b.connections == 2  # the third request waited and took a connection given back


def test_queue_timeout_answers_503(afpa_process, backend, tmp_path):
    b, release = held_backend(backend)
    p = afpa_process("--config", config(tmp_path, b.url, backends={"max_connections": 1, "queue_timeout": 0.5}))
    first = threading.Thread(target=lambda: one(p.port, get("/first"), timeout=20))
    first.start()
    try:
        wait_until(lambda: len(b.requests) == 1, "the first request reaches the backend")
        status, _, body = one(p.port, get("/second"), timeout=15)
        assert status == 503 and body == b"503 Service Unavailable: backend busy\n"
    finally:
        release.set()
        first.join(30)
    assert len(b.requests) == 1


def test_slow_small_upload_holds_no_backend_connection(afpa_process, backend):
    b = backend(lambda head, body: response(b"got " + body))
    p = afpa_process("--backend", b.url)
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
        time.sleep(0.5)  # afpa has the head and half the body
        assert b.connections == 0
        s.sendall(b"world")
        raw = b""
        while not raw.endswith(b"got helloworld"):
            chunk = s.recv(65536)
            assert chunk
            raw += chunk
    assert b.connections == 1 and b.bodies == [b"helloworld"]
    # A slow chunked upload that ends within the limit is buffered too.
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        time.sleep(0.5)
        assert len(b.bodies) == 1  # nothing of it went to the backend yet
        s.sendall(b"2\r\nde\r\n0\r\n\r\n")
        raw = b""
        while not raw.endswith(b"got abcde"):
            chunk = s.recv(65536)
            assert chunk
            raw += chunk


def test_refused_backend_is_logged_once_and_counted(afpa_process):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    url = f"http://127.0.0.1:{dead}"
    p = afpa_process("--backend", url)
    for _ in range(20):
        status, _, body = one(p.port, get("/"))
        assert status == 502 and body == b"502 Bad Gateway: cannot connect to the backend\n"
    import urllib.request
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/metrics", timeout=5).read().decode()
    assert f'afpa_backend_failures_total{{backend="{url}",reason="refused"}} 20.0' in metrics
    err = p.stop()
    lines = [line for line in err.splitlines() if f"backend {url}: connection refused" in line]
    assert len(lines) == 1, err


def test_stale_response_revalidated_with_if_none_match(afpa_process, backend):
    def respond(head, body):
        if b'If-None-Match: "v1"' in head:
            return response(b"", 'ETag: "v1"', "Cache-Control: max-age=1", status="304 Not Modified")
        return response(b"the stored body", 'ETag: "v1"', "Cache-Control: max-age=1")

    b = backend(respond)
    p = afpa_process("--backend", b.url)
    assert one(p.port, get("/r"))[1]["cache-status"] == "afpa; fwd=uri-miss; fwd-status=200; stored"
    deadline = time.monotonic() + 10
    while True:  # wait for the stored response to go stale (max-age=1)
        status, h, body = one(p.port, get("/r"))
        if h["cache-status"] != "afpa; hit" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (status, body) == (200, b"the stored body")
    assert h["cache-status"] == "afpa; fwd=stale; fwd-status=304"
    assert len(b.requests) == 2 and b'If-None-Match: "v1"\r\n' in b.requests[1]
    # Fresh again after the 304, and a client's own validator is answered from the cache.
    status, h, _ = one(p.port, get("/r", 'If-None-Match: "v1"'))
    assert status == 304 and len(b.requests) in (2, 3)


def test_vary_accept_encoding_variants_are_not_mixed(afpa_process, backend):
    def respond(head, body):
        if b"gzip" in head.lower():
            return response(b"GZ-BODY", "Cache-Control: max-age=60", "Vary: Accept-Encoding", "Content-Encoding: gzip")
        return response(b"plain-body", "Cache-Control: max-age=60", "Vary: Accept-Encoding")

    b = backend(respond)
    p = afpa_process("--backend", b.url)
    for _ in range(2):
        status, h, body = one(p.port, get("/v", "Accept-Encoding: gzip, deflate"))
        assert body == b"GZ-BODY" and h["content-encoding"] == "gzip"
        status, h, body = one(p.port, get("/v"))
        assert body == b"plain-body" and "content-encoding" not in h
    assert h["cache-status"] == "afpa; hit" and len(b.requests) == 2


def test_early_hints_relayed_before_the_final_answer(afpa_process, backend):
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    b = backend(lambda head, body: hints + response(b"page", "Cache-Control: max-age=60"))
    p = afpa_process("--backend", b.url)
    [(s1, h1, _), (s2, h2, body)] = parse_responses(exchange(p.port, get("/hinted"), expect=2))
    assert (s1, h1["link"], h1["via"]) == (103, "</style.css>; rel=preload", "1.1 afpa")
    assert "cache-status" not in h1 and "content-length" not in h1
    assert (s2, body, h2["cache-status"]) == (200, b"page", "afpa; fwd=uri-miss; fwd-status=200; stored")
    # Never stored: the hit is the 200 alone.  An HTTP/1.0 client never sees a 1xx.
    assert parse_responses(exchange(p.port, get("/hinted")))[0][:1] == (200,)
    raw = exchange(p.port, b"GET /other HTTP/1.0\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ") and b" 103 " not in raw
    assert len(b.requests) == 2
