"""Range requests against ``afpa serve`` over real sockets (raw requests, as curl sends them)."""

from __future__ import annotations

import pytest

from tests.httpclient import parse_responses
from tests.integration.backends import RawBackend
from tests.integration.test_serve import exchange, get

pytestmark = pytest.mark.integration

CACHED = bytes(i * 13 % 251 for i in range(300_000))        # five fragments, cached whole
LARGE = bytes(i * 7 % 253 for i in range(4 * 1024 * 1024))  # over --max-object-size: streamed


def test_ranges_of_cached_and_streamed_files(afpa_process, docroot):
    (docroot / "cached.bin").write_bytes(CACHED)
    (docroot / "large.bin").write_bytes(LARGE)
    p = afpa_process("--max-object-size", "1M")

    # A cached file: stored by a full GET, then a range across fragment edges from the hit.
    [(status, h, body)] = parse_responses(exchange(p.port, get("/cached.bin")))
    assert (status, h["accept-ranges"], h["cache-status"]) == (200, "bytes", "afpa; fwd=uri-miss; stored")
    [(status, h, body)] = parse_responses(exchange(p.port, get("/cached.bin", "Range: bytes=65000-200000")))
    assert (status, h["cache-status"], h["content-range"]) == (206, "afpa; hit", "bytes 65000-200000/300000")
    assert body == CACHED[65000:200001]

    # Several ranges, pipelined with a plain hit on one connection.
    raw = exchange(p.port, get("/cached.bin", "Range: bytes=0-99,-100") + get("/cached.bin"), expect=2)
    [(s1, h1, b1), (s2, _, b2)] = parse_responses(raw)
    boundary = h1["content-type"].split("boundary=")[1].encode()
    assert s1 == 206 and int(h1["content-length"]) == len(b1)
    assert b1.count(b"--" + boundary) == 3
    assert b"Content-Range: bytes 0-99/300000\r\n\r\n" + CACHED[:100] in b1
    assert b"Content-Range: bytes 299900-299999/300000\r\n\r\n" + CACHED[-100:] in b1
    assert (s2, b2) == (200, CACHED)

    # A file too large to cache: one range streamed from its offset.
    [(status, h, body)] = parse_responses(exchange(p.port, get("/large.bin", "Range: bytes=3000000-3000099")))
    assert (status, h["content-range"], h["content-length"]) == (206, "bytes 3000000-3000099/4194304", "100")
    assert body == LARGE[3000000:3000100] and "too-large" in h["cache-status"]
    [(status, h, _)] = parse_responses(exchange(p.port, get("/large.bin", "Range: bytes=5000000-")))
    assert (status, h["content-range"]) == (416, "bytes */4194304")
    [(status, h, body)] = parse_responses(exchange(p.port, get("/large.bin", "Range: bytes=-1000000")))
    assert (status, body) == (206, LARGE[-1000000:])


def test_range_miss_on_a_backend_is_fetched_whole_once(afpa_process):
    body = bytes(i % 241 for i in range(150_000))
    b = RawBackend(lambda head, _: (b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nETag: \"r1\"\r\n"
                                    b"Content-Length: %d\r\n\r\n" % len(body) + body))
    try:
        p = afpa_process("--backend", b.url)
        raw = exchange(p.port, get("/v", "Range: bytes=100000-100099") + get("/v", "Range: bytes=-10"), expect=2)
        [(s1, h1, b1), (s2, h2, b2)] = parse_responses(raw)
        assert (s1, h1["content-range"], b1) == (206, "bytes 100000-100099/150000", body[100000:100100])
        assert h1["cache-status"] == "afpa; fwd=uri-miss; fwd-status=200; stored"
        assert (s2, h2["cache-status"], b2) == (206, "afpa; hit", body[-10:])
        assert len(b.requests) == 1 and b"range" not in b.requests[0].lower()
    finally:
        b.close()
