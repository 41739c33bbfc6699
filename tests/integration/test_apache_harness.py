"""The Apache harness itself, exercised with stdlib clients against Apache directly."""

from __future__ import annotations

import http.client
import socket
import urllib.request

import pytest

from tests.integration.apache import CACHEABLE_BODY, STATIC_BODY, ApacheServer, _group_pids

pytestmark = pytest.mark.integration


def get(server: ApacheServer, path: str) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def test_static_file_and_access_log(apache):
    assert apache.access_log_lines() == []  # the readiness probe sends no request
    status, headers, body = get(apache, "/static.txt")
    assert status == 200
    assert body == STATIC_BODY
    assert headers["Content-Type"].startswith("text/plain")
    lines = apache.wait_access_log(1, contains="/static.txt")
    assert len(lines) == 1, apache.access_log_lines()
    assert '"GET /static.txt HTTP/1.1" 200 ' in lines[0]
    assert len(apache.access_log_lines()) == 1


def test_cgi_is_dynamic_and_no_store(apache_module):
    s1, h1, b1 = get(apache_module, "/cgi-bin/dynamic.sh?x=1")
    s2, h2, b2 = get(apache_module, "/cgi-bin/dynamic.sh?x=2")
    assert (s1, s2) == (200, 200)
    assert h1["Cache-Control"] == h2["Cache-Control"] == "no-store"
    assert b1 != b2
    assert b"query=x=1" in b1 and b"query=x=2" in b2


def test_cacheable_has_max_age(apache_module):
    with urllib.request.urlopen(apache_module.url("/cacheable.txt"), timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "max-age=60"
        assert resp.read() == CACHEABLE_BODY
    status, headers, _ = get(apache_module, "/static.txt")
    assert status == 200 and headers["Cache-Control"] is None


def test_stop_then_start_on_same_port(apache):
    port = apache.port
    pgid = apache.proc.pid
    assert get(apache, "/static.txt")[0] == 200

    apache.stop()
    assert not apache.running
    assert _group_pids(pgid) == []  # no apache process survives
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()

    apache.start()
    assert apache.port == port
    assert get(apache, "/static.txt")[:3:2] == (200, STATIC_BODY)
    assert len(apache.wait_access_log(2, contains="/static.txt")) == 2


def test_bad_config_reports_error_log():
    from tests.integration.apache import apache_binary, SKIP_REASON

    if apache_binary() is None:
        pytest.skip(SKIP_REASON)
    server = ApacheServer(extra_config="ThisIsNotADirective on\n")
    try:
        with pytest.raises(RuntimeError, match="ThisIsNotADirective"):
            server.start(timeout=5)
        assert not server.running
    finally:
        server.cleanup()
