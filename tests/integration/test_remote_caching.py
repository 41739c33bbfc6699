"""The caching policy in front of test backends over real sockets: heuristic
freshness, Age and Date on hits, request directives, invalidation and targeted
cache-control fields (RFC 9111, RFC 9213)."""

from __future__ import annotations

import threading
import time
import urllib.request
from email.utils import formatdate

import pytest

from tests.httpclient import parse_responses
from tests.integration.backends import response
from tests.integration.test_serve import exchange, get

pytestmark = pytest.mark.integration

LONG_AGO = "Last-Modified: " + formatdate(time.time() - 30 * 86400, usegmt=True)


def one(port, data):
    raw = exchange(port, data)
    [r] = parse_responses(raw)
    return r + (raw,)


def test_last_modified_only_is_cached_heuristically_with_the_origins_date_and_age(afpa_process, backend):
    date = formatdate(time.time(), usegmt=True)
    b = backend(lambda head, body: response(b"page", LONG_AGO, f"Date: {date}", "Age: 100"))
    p = afpa_process("--backend", b.url)
    status, h, body, _ = one(p.port, get("/page"))
    assert (status, body, h["cache-status"]) == (200, b"page", "afpa; fwd=uri-miss; fwd-status=200; stored")
    status, h, body, raw = one(p.port, get("/page"))
    assert (status, body, h["cache-status"]) == (200, b"page", "afpa; hit")
    assert h["date"] == date and raw.count(b"\r\nDate: ") == 1   # the origin's Date, once
    assert int(h["age"]) >= 100                                    # the origin's Age counts (4.2.3)
    assert len(b.requests) == 1


def test_response_without_date_gets_one_and_keeps_it(afpa_process, backend):
    b = backend(lambda head, body: b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 1\r\n\r\nx")
    p = afpa_process("--backend", b.url)
    first = one(p.port, get("/d"))
    time.sleep(1.1)  # a fresh Date would now differ
    second = one(p.port, get("/d"))
    assert second[1]["cache-status"] == "afpa; hit"
    assert second[1]["date"] == first[1]["date"] and second[3].count(b"\r\nDate: ") == 1


def test_no_content_is_stored(afpa_process, backend):
    b = backend(lambda head, body: b"HTTP/1.1 204 No Content\r\nCache-Control: max-age=60\r\n\r\n")
    p = afpa_process("--backend", b.url)
    assert one(p.port, get("/empty"))[1]["cache-status"].endswith("; stored")
    status, h, body, _ = one(p.port, get("/empty"))
    assert (status, body, h["cache-status"]) == (204, b"", "afpa; hit")
    assert "content-length" not in h and len(b.requests) == 1


@pytest.mark.parametrize("directive", ["Cache-Control: no-cache", "Pragma: no-cache", "Cache-Control: max-age=0, x=1"])
def test_request_no_cache_and_max_age_are_forwarded(afpa_process, backend, directive):
    b = backend(lambda head, body: response(b"v", "Cache-Control: max-age=60", "Age: 5"))
    p = afpa_process("--backend", b.url)
    one(p.port, get("/r"))
    status, h, _, _ = one(p.port, get("/r", directive))
    assert status == 200 and h["cache-status"].startswith("afpa; fwd=request; fwd-status=200")
    assert len(b.requests) == 2
    # Pragma is ignored when Cache-Control is present (RFC 9111 5.4).
    _, h, _, _ = one(p.port, get("/r", "Pragma: no-cache", "Cache-Control: max-stale"))
    assert h["cache-status"].startswith("afpa; hit; ttl=")


def test_only_if_cached(afpa_process, backend):
    b = backend(lambda head, body: response(b"v", "Cache-Control: max-age=60"))
    p = afpa_process("--backend", b.url)
    status, h, _, _ = one(p.port, get("/o", "Cache-Control: only-if-cached"))
    assert status == 504 and h["cache-status"] == "afpa; detail=only-if-cached"
    assert len(b.requests) == 0
    one(p.port, get("/o"))
    status, h, body, _ = one(p.port, get("/o", "Cache-Control: only-if-cached"))
    assert (status, body) == (200, b"v") and h["cache-status"].startswith("afpa; hit")
    assert len(b.requests) == 1


def test_request_no_store_is_not_stored(afpa_process, backend):
    b = backend(lambda head, body: response(b"v", "Cache-Control: max-age=60"))
    p = afpa_process("--backend", b.url)
    _, h, _, _ = one(p.port, get("/n", "Cache-Control: no-store"))
    assert "stored" not in h["cache-status"]
    assert one(p.port, get("/n"))[1]["cache-status"].startswith("afpa; fwd=uri-miss")


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
def test_unsafe_method_invalidates_target_and_location(afpa_process, backend, method):
    def respond(head, body):
        if head.startswith(b"GET"):
            return response(b"cached", "Cache-Control: max-age=60")
        return response(b"done", "Location: /other", status="201 Created")
    b = backend(respond)
    p = afpa_process("--backend", b.url)
    for path in ("/item", "/other", "/kept"):
        one(p.port, get(path))
        assert one(p.port, get(path))[1]["cache-status"] == "afpa; hit"
    status, _, _, _ = one(p.port, get("/item", "Content-Length: 0", method=method))
    assert status == 201
    assert one(p.port, get("/item"))[1]["cache-status"].startswith("afpa; fwd=uri-miss")
    assert one(p.port, get("/other"))[1]["cache-status"].startswith("afpa; fwd=uri-miss")
    assert one(p.port, get("/kept"))[1]["cache-status"] == "afpa; hit"


def test_failed_unsafe_request_invalidates_nothing(afpa_process, backend):
    def respond(head, body):
        if head.startswith(b"GET"):
            return response(b"cached", "Cache-Control: max-age=60")
        return response(b"no", status="409 Conflict")
    b = backend(respond)
    p = afpa_process("--backend", b.url)
    one(p.port, get("/item"))
    one(p.port, get("/item", "Content-Length: 0", method="PUT"))
    assert one(p.port, get("/item"))[1]["cache-status"] == "afpa; hit"


@pytest.mark.parametrize("field", ["CDN-Cache-Control", "Afpa-Cache-Control"])
def test_targeted_field_overrides_cache_control_and_is_never_relayed(afpa_process, backend, field):
    b = backend(lambda head, body: response(b"edge", "Cache-Control: no-store", f"{field}: max-age=60"))
    p = afpa_process("--backend", b.url)
    for want in ("afpa; fwd=uri-miss; fwd-status=200; stored", "afpa; hit"):
        status, h, body, raw = one(p.port, get("/t"))
        assert (status, body, h["cache-status"]) == (200, b"edge", want)
        assert field.lower().encode() not in raw.lower()
        assert h["cache-control"] == "no-store"  # still what the browser obeys
    assert len(b.requests) == 1


def test_operator_named_targeted_field(afpa_process, backend, tmp_path):
    b = backend(lambda head, body: response(b"edge", "Cache-Control: no-store", "Edge-Control: max-age=60",
                                            "Afpa-Cache-Control: no-store"))
    cfg = tmp_path / "afpa.toml"
    cfg.write_text(f'backend = "{b.url}"\n[cache]\ntargeted_field = "Edge-Control"\n')
    p = afpa_process("--config", str(cfg))
    one(p.port, get("/t"))
    _, h, _, raw = one(p.port, get("/t"))
    assert h["cache-status"] == "afpa; hit" and b"edge-control" not in raw.lower()
    assert b"afpa-cache-control: no-store" in raw.lower()  # not afpa's field any more: relayed


def test_no_cache_field_is_left_out_of_the_stored_response(afpa_process, backend):
    b = backend(lambda head, body: response(b"x", 'Cache-Control: max-age=60, no-cache="X-Token"', "X-Token: secret"))
    p = afpa_process("--backend", b.url)
    assert one(p.port, get("/f"))[1]["x-token"] == "secret"
    _, h, _, _ = one(p.port, get("/f"))
    assert h["cache-status"] == "afpa; hit" and "x-token" not in h


def test_cache_policy_per_route_from_the_config_file(afpa_process, backend, tmp_path):
    """[cache] and [route.cache] as an operator writes them: static assets stored
    whatever the origin says (no-store, Set-Cookie), their query ignored; the
    rest keeps the origin's word with a default TTL and sorted queries."""
    def respond(head, body):
        path = head.split(b" ")[1]
        if path.startswith(b"/static/"):
            return response(b"asset " + path, "Cache-Control: no-store", "Set-Cookie: sid=1")
        return response(b"page " + path)  # no freshness at all: the default TTL decides

    b = backend(respond)
    cfg = tmp_path / "afpa.toml"
    cfg.write_text(f'backend = "{b.url}"\n[cache]\ndefault_ttl = 60\nquery = "sort"\n'
                   f'[[route]]\nto = "remote"\nbackend = "{b.url}"\nprefix = "/static/"\n'
                   '[route.cache]\nignore_cache_control = true\nset_cookie = "strip"\nquery = "ignore"\n'
                   'default_ttl = 3600\n')
    p = afpa_process("--config", str(cfg))
    status, h, body, _ = one(p.port, get("/static/app.css?v=1"))
    assert (status, body) == (200, b"asset /static/app.css?v=1") and h["cache-status"].endswith("; stored")
    status, h, body, raw = one(p.port, get("/static/app.css?v=2"))
    assert (body, h["cache-status"]) == (b"asset /static/app.css?v=1", "afpa; hit") and b"Set-Cookie" not in raw
    one(p.port, get("/page?b=1&a=2"))
    status, h, body, _ = one(p.port, get("/page?a=2&b=1"))
    assert (body, h["cache-status"]) == (b"page /page?b=1&a=2", "afpa; hit")
    assert len(b.requests) == 2


def test_bad_route_cache_setting_stops_afpa_with_one_line(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "afpa.toml"
    cfg.write_text('backend = "http://127.0.0.1:9"\n[[route]]\nto = "remote"\nbackend = "http://127.0.0.1:9"\n'
                   '[[route]]\nto = "remote"\nbackend = "http://127.0.0.1:9"\n[route.cache]\nmax_ttl = -1\n')
    out = subprocess.run([sys.executable, "-m", "afpa", "serve", "--config", str(cfg), "--listen", "127.0.0.1:0"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].endswith(
        "route 2: cache.max_ttl: expected a positive number of seconds, got -1")
    assert "Traceback" not in out.stderr


def test_stale_while_revalidate_answers_at_once_and_refreshes_once(afpa_process, backend):
    release = threading.Event()

    def respond(head, body):
        if b"If-None-Match" not in head:
            return response(b"old", "Cache-Control: max-age=1, stale-while-revalidate=60", 'ETag: "v1"')
        release.wait(20)  # the refresh is held until the stale answers are in
        return response(b"", "Cache-Control: max-age=60", 'ETag: "v1"', "X-Refreshed: yes",
                        status="304 Not Modified").replace(b"Content-Length: 0\r\n", b"")

    b = backend(respond)
    p = afpa_process("--backend", b.url)
    assert "stored" in one(p.port, get("/s"))[1]["cache-status"]
    time.sleep(2.1)  # now stale by about a second
    for _ in range(3):  # answered while the backend still holds the refresh
        status, h, body, _ = one(p.port, get("/s"))
        assert (status, body) == (200, b"old")
        assert h["cache-status"].startswith("afpa; hit; ttl=-")
        assert h["cache-status"].endswith("; detail=stale-while-revalidate")
    release.set()
    for _ in range(100):
        status, h, body, _ = one(p.port, get("/s"))
        if h["cache-status"] == "afpa; hit":
            break
        time.sleep(0.05)
    assert (body, h["cache-status"], h.get("x-refreshed")) == (b"old", "afpa; hit", "yes")
    assert len(b.requests) == 2 and b'If-None-Match: "v1"' in b.requests[1]


def test_stale_if_error_answers_a_5xx_with_the_stale_copy(afpa_process, backend):
    b = backend(lambda head, body: response(b"old", "Cache-Control: max-age=1, stale-if-error=60")
                if len(b.requests) == 1 else response(b"down", status="503 Service Unavailable"))
    p = afpa_process("--backend", b.url)
    assert "stored" in one(p.port, get("/e"))[1]["cache-status"]
    time.sleep(2.1)
    status, h, body, _ = one(p.port, get("/e"))
    assert (status, body) == (200, b"old")
    assert h["cache-status"].startswith("afpa; fwd=stale; fwd-status=503; ttl=-")
    assert h["cache-status"].endswith("; detail=stale-if-error")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/metrics", timeout=5).read().decode()
    assert 'afpa_cache_stale_served_total{why="if-error"} 1.0' in metrics
