"""afpa in front of a real Apache httpd (installed by .ci/run with apt-get install -y apache2)."""

from __future__ import annotations

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
    assert first[1]["cache-status"] == "afpa; fwd=miss; fwd-status=200; stored"
    assert second[1]["cache-status"] == "afpa; hit"
    apache.wait_access_log(1, contains="/cacheable.txt")
    assert len(apache.access_log_lines(contains="/cacheable.txt")) == 1


def test_plain_static_without_freshness_passes_through(apache, afpa_before_apache):
    p = afpa_before_apache
    for _ in range(2):
        status, h, body = one(p.port, get("/static.txt"))
        assert (status, body) == (200, STATIC_BODY) and "stored" not in h["cache-status"]
    apache.wait_access_log(2, contains="/static.txt")


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
    assert one(p.port, get("/short.txt"))[1]["cache-status"] == "afpa; fwd=miss; fwd-status=200; stored"
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
