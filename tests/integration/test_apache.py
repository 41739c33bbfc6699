"""afpa in front of a real Apache httpd (installed by .ci/run with apt-get install -y apache2)."""

from __future__ import annotations

import os
import gzip
import time

import pytest

from tests.httpclient import parse_responses
from tests.integration.apache import CACHEABLE_BODY, STATIC_BODY, WS_BODY, ApacheServer, _require_apache
from tests.integration.test_serve import exchange, get

pytestmark = pytest.mark.integration


@pytest.fixture
def afpa_before_apache(apache, afpa_process, tmp_path):
    cfg = tmp_path / "afpa.toml"
    cfg.write_text(f'''
backend = "{apache.base_url}"

[[route]]
prefix = "/ws/"
to = "defer"
backend = "{apache.base_url}"
''')
    return afpa_process("--config", str(cfg))


def one(port, data):
    [r] = parse_responses(exchange(port, data))
    return r


def test_static_file_miss_then_hit_apache_sees_one_request(apache, afpa_before_apache):
    p = afpa_before_apache
    first = one(p.port, get("/cacheable.txt"))
    second = one(p.port, get("/cacheable.txt"))
    assert first[2] == second[2] == CACHEABLE_BODY
    assert first[1]["cache-status"] == "afpa; fwd=uri-miss; fwd-status=200; stored"
    assert second[1]["cache-status"] == "afpa; hit"
    apache.wait_access_log(1, contains="/cacheable.txt")
    assert len(apache.access_log_lines(contains="/cacheable.txt")) == 1


def test_stock_static_file_with_only_last_modified_becomes_a_hit(apache, afpa_before_apache):
    # Stock Apache sends no Cache-Control or Expires on a static file, only
    # Last-Modified and ETag: heuristic freshness (RFC 9111 4.2.2) caches it.
    body_text = STATIC_BODY * 100  # large enough for mod_deflate to compress
    path = apache.write_file("old.txt", body_text)
    month_ago = time.time() - 30 * 86400
    os.utime(path, (month_ago, month_ago))
    p = afpa_before_apache
    status, first, body = one(p.port, get("/old.txt"))
    assert (status, body) == (200, body_text)
    assert "cache-control" not in first and "expires" not in first and "last-modified" in first
    assert first["cache-status"] == "afpa; fwd=uri-miss; fwd-status=200; stored"
    time.sleep(1.1)  # so that the Age of the hit is at least 1
    status, second, body = one(p.port, get("/old.txt"))
    assert (status, body, second["cache-status"]) == (200, body_text, "afpa; hit")
    assert second["date"] == first["date"] and int(second["age"]) >= 1
    # The client's own validator is answered from the cache.
    status, h, body = one(p.port, get("/old.txt", f"If-None-Match: {first['etag']}"))
    assert (status, body, h["cache-status"]) == (304, b"", "afpa; hit")
    # mod_deflate's gzip variant (Vary: Accept-Encoding) is cached beside it, never mixed.
    status, h, gz = one(p.port, get("/old.txt", "Accept-Encoding: gzip"))
    assert h.get("content-encoding") == "gzip" and gzip.decompress(gz) == body_text
    status, h, gz = one(p.port, get("/old.txt", "Accept-Encoding: gzip"))
    assert h["cache-status"] == "afpa; hit" and gzip.decompress(gz) == body_text
    assert one(p.port, get("/old.txt"))[2] == body_text
    apache.wait_access_log(2, contains="/old.txt")
    assert len(apache.access_log_lines(contains="/old.txt")) == 2  # identity and gzip, once each


def test_request_directives_and_put_invalidation_with_apache(apache, afpa_before_apache):
    p = afpa_before_apache
    assert one(p.port, get("/cacheable.txt", "Cache-Control: only-if-cached"))[0] == 504
    one(p.port, get("/cacheable.txt"))
    assert one(p.port, get("/cacheable.txt"))[1]["cache-status"] == "afpa; hit"
    # no-cache: the stored copy is revalidated (RFC 9111 5.2.1.4); Apache says 304.
    status, h, _ = one(p.port, get("/cacheable.txt", "Cache-Control: no-cache"))
    assert status == 200 and h["cache-status"].startswith("afpa; fwd=request; fwd-status=304")
    lines = apache.wait_access_log(2, contains="GET /cacheable.txt")
    assert lines[-1].split('"')[2].split()[0] == "304"
    # Apache refuses a PUT to a static file (an error): nothing is invalidated.
    assert one(p.port, get("/cacheable.txt", "Content-Length: 0", method="PUT"))[0] >= 400
    assert one(p.port, get("/cacheable.txt"))[1]["cache-status"] == "afpa; hit"


def test_put_invalidates_a_cached_url_with_apache(apache, afpa_before_apache):
    script = apache.cgi_bin / "item.sh"
    script.write_text("#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\nCache-Control: max-age=60\\r\\n\\r\\n'\n"
                      "printf '%s %s\\n' \"$REQUEST_METHOD\" \"$(date +%s%N)\"\n")
    script.chmod(0o755)
    p = afpa_before_apache
    first = one(p.port, get("/cgi-bin/item.sh"))
    assert one(p.port, get("/cgi-bin/item.sh"))[1]["cache-status"] == "afpa; hit"
    status, _, body = one(p.port, get("/cgi-bin/item.sh", "Content-Length: 0", method="PUT"))
    assert status == 200 and body.startswith(b"PUT ")
    status, h, body = one(p.port, get("/cgi-bin/item.sh"))
    assert h["cache-status"].startswith("afpa; fwd=uri-miss") and body != first[2]
    apache.wait_access_log(3, contains="/cgi-bin/item.sh")
    assert len(apache.access_log_lines(contains="GET /cgi-bin/item.sh")) == 2


def test_cgi_passed_through_uncached(apache, afpa_before_apache):
    p = afpa_before_apache
    bodies = [one(p.port, get("/cgi-bin/dynamic.sh?x=1"))[2] for _ in range(2)]
    assert bodies[0] != bodies[1] and all(b"query=x=1" in b for b in bodies)
    apache.wait_access_log(2, contains="/cgi-bin/dynamic.sh")


def test_deferred_path_spliced_to_apache(apache, afpa_before_apache):
    p = afpa_before_apache
    raw = exchange(p.port, get("/ws/") + get("/static.txt"), expect=2)
    first, second = parse_responses(raw)
    assert first[2] == WS_BODY and second[2] == STATIC_BODY
    assert "via" not in first[1] and "cache-status" not in first[1]  # only bytes relayed
    apache.wait_access_log(1, contains="/ws/")


def test_apache_stopped_502_then_recovery(apache, afpa_before_apache):
    p = afpa_before_apache
    assert one(p.port, get("/static.txt"))[0] == 200
    apache.stop()
    status, _, body = one(p.port, get("/static.txt"))
    assert status == 502
    apache.start()
    status, _, body = one(p.port, get("/static.txt"))
    assert (status, body) == (200, STATIC_BODY)


SLOW_CACHEABLE_CGI = """#!/bin/sh
sleep 0.5
printf 'Content-Type: text/plain\\r\\n'
printf 'Cache-Control: max-age=60\\r\\n'
printf '\\r\\n'
printf 'slow and cacheable\\n'
"""


def test_concurrent_misses_make_one_request_in_apaches_access_log(apache, afpa_before_apache):
    from concurrent.futures import ThreadPoolExecutor

    script = apache.cgi_bin / "slow.sh"
    script.write_text(SLOW_CACHEABLE_CGI)
    script.chmod(0o755)
    p = afpa_before_apache
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda _: one(p.port, get("/cgi-bin/slow.sh")), range(50)))
    assert all((status, body) == (200, b"slow and cacheable\n") for status, _, body in results)
    apache.wait_access_log(1, contains="/cgi-bin/slow.sh")
    assert len(apache.access_log_lines(contains="/cgi-bin/slow.sh")) == 1
    # An uncacheable answer (no-store) is never serialised: every miss reaches Apache.
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda _: one(p.port, get("/cgi-bin/dynamic.sh")), range(50)))
    assert all(status == 200 for status, _, _ in results)
    assert len(apache.wait_access_log(50, contains="/cgi-bin/dynamic.sh")) == 50
PAGE = b"<p>a page mod_deflate compresses</p>\n" * 50
SHORT_BODY = b"short-lived page, max-age=1\n" * 8
EXPLICIT = """
<Files "page.html">
    Header set Cache-Control "max-age=60"
</Files>
<Files "short.txt">
    Header set Cache-Control "max-age=1"
</Files>
"""


@pytest.fixture
def apache_fresh():
    """Stock Apache (mod_deflate on) with explicit freshness on two files
    (mod_headers): page.html for a minute, short.txt for one second."""
    _require_apache()
    server = ApacheServer(extra_config=EXPLICIT)
    server.write_file("page.html", PAGE)
    server.write_file("short.txt", SHORT_BODY)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def test_gzip_and_identity_variants_both_become_hits(apache_fresh, afpa_process):
    apache = apache_fresh
    p = afpa_process("--backend", apache.base_url)
    for _ in range(2):
        status, h, gz = one(p.port, get("/page.html", "Accept-Encoding: gzip, deflate"))
        assert h["content-encoding"] == "gzip" and gzip.decompress(gz) == PAGE
        status, h, body = one(p.port, get("/page.html"))
        assert body == PAGE and "content-encoding" not in h
        assert h["vary"] == "Accept-Encoding"
    assert h["cache-status"] == "afpa; hit"
    status, h, gz = one(p.port, get("/page.html", "Accept-Encoding: deflate, gzip"))
    assert h["cache-status"] == "afpa; hit" and gzip.decompress(gz) == PAGE
    apache.wait_access_log(2, contains="/page.html")
    assert len(apache.access_log_lines(contains="/page.html")) == 2


def test_stale_response_revalidated_apache_answers_304(apache_fresh, afpa_process):
    apache = apache_fresh
    p = afpa_process("--backend", apache.base_url)
    assert one(p.port, get("/short.txt"))[1]["cache-status"] == "afpa; fwd=uri-miss; fwd-status=200; stored"
    deadline = time.monotonic() + 10
    while True:  # until the stored copy is stale (max-age=1) and revalidated
        status, h, body = one(p.port, get("/short.txt"))
        if h["cache-status"] != "afpa; hit" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (status, body) == (200, SHORT_BODY)
    assert h["cache-status"] == "afpa; fwd=stale; fwd-status=304"
    lines = apache.wait_access_log(2, contains="/short.txt")
    assert [line.split('"')[2].split()[0] for line in lines] == ["200", "304"]


def test_stock_file_revalidated_after_its_heuristic_lifetime(apache, afpa_before_apache):
    """No expiry configured at all: a file modified 20 s ago is heuristically fresh
    for 10% of that (2 s); after it a conditional request reaches Apache, which
    answers 304, and afpa answers from its refreshed copy."""
    body_text = b"revalidated without any expiry configured\n" * 40
    path = apache.write_file("recent.txt", body_text)
    then = time.time() - 20
    os.utime(path, (then, then))
    p = afpa_before_apache
    assert one(p.port, get("/recent.txt"))[1]["cache-status"] == "afpa; fwd=uri-miss; fwd-status=200; stored"
    assert one(p.port, get("/recent.txt"))[1]["cache-status"] == "afpa; hit"
    deadline = time.monotonic() + 15
    while True:  # until the heuristic lifetime is over and the copy revalidated
        status, h, body = one(p.port, get("/recent.txt"))
        if h["cache-status"] != "afpa; hit" or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert (status, body) == (200, body_text)
    assert h["cache-status"] == "afpa; fwd=stale; fwd-status=304"
    lines = apache.wait_access_log(2, contains="/recent.txt")
    assert [line.split('"')[2].split()[0] for line in lines] == ["200", "304"]
