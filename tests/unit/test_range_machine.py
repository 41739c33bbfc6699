"""Range requests through the HTTP machine (in-memory transports, Clock)."""

from __future__ import annotations

import pytest

from protocols.http.policy import ranges
from tests.conftest import MemoryServer
from tests.httpclient import parse_responses
from tests.unit.test_remote_machine import Rig

BIG = bytes(i * 7 % 256 for i in range(200_000))  # four fragments when cached


def ask(mem, data: bytes, head_only=()):
    proto, t = mem.connect()
    proto.dataReceived(data)
    for _ in range(1000):  # the pull producer sends a large body a window at a time
        if t.producer is None:
            break
        t.producer.resumeProducing()
    return parse_responses(t.value(), head_only)


def get(path: str, *headers: str, method="GET") -> bytes:
    extra = "".join(h + "\r\n" for h in headers)
    return f"{method} {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()


def parts_of(h: dict, body: bytes) -> list[tuple[str, bytes]]:
    """(Content-Range, data) of each part of a multipart/byteranges body."""
    ctype = h["content-type"]
    assert ctype.startswith("multipart/byteranges; boundary=")
    boundary = ctype.split("=", 1)[1].encode()
    assert body.endswith(b"\r\n--" + boundary + b"--\r\n")
    out = []
    for chunk in body[:-len(boundary) - 8].split(b"--" + boundary + b"\r\n")[1:]:
        fields, _, data = chunk.partition(b"\r\n\r\n")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        lines = dict(line.split(b": ", 1) for line in fields.split(b"\r\n"))
        out.append((lines[b"Content-Range"].decode(), data))
    return out


@pytest.fixture
def big(docroot):
    (docroot / "big.bin").write_bytes(BIG)
    return docroot


def test_full_answers_say_accept_ranges(mem):
    [(status, h, _)] = ask(mem, get("/hello.txt"))
    assert status == 200 and h["accept-ranges"] == "bytes"
    [(status, h, _)] = ask(mem, get("/hello.txt"))
    assert h["cache-status"] == "afpa; hit" and h["accept-ranges"] == "bytes"


def test_single_range_on_miss_and_on_hit(mem):
    for cache_status in ("afpa; fwd=uri-miss; stored", "afpa; hit"):
        [(status, h, body)] = ask(mem, get("/hello.txt", "Range: bytes=6-10"))
        assert (status, body) == (206, b"world")
        assert h["content-range"] == "bytes 6-10/12" and h["content-length"] == "5"
        assert h["cache-status"] == cache_status and "etag" in h and "date" in h


def test_suffix_range_on_hit_of_a_large_object(big):
    mem = MemoryServer(str(big))
    ask(mem, get("/big.bin"))
    [(status, h, body)] = ask(mem, get("/big.bin", "Range: bytes=-70000"))
    assert (status, h["cache-status"], h["content-range"]) == (206, "afpa; hit", "bytes 130000-199999/200000")
    assert body == BIG[130000:]


def test_multipart_ranges(big):
    mem = MemoryServer(str(big))
    ask(mem, get("/big.bin"))
    [(status, h, body)] = ask(mem, get("/big.bin", "Range: bytes=100000-100009, 0-9, -5"))
    assert status == 206 and int(h["content-length"]) == len(body)
    assert "content-range" not in h
    assert parts_of(h, body) == [("bytes 100000-100009/200000", BIG[100000:100010]),
                                 ("bytes 0-9/200000", BIG[:10]),
                                 ("bytes 199995-199999/200000", BIG[-5:])]
    assert body.count(b"Content-Type: application/octet-stream\r\n") == 3


def test_overlapping_ranges_are_sent_once(big):
    mem = MemoryServer(str(big))
    ask(mem, get("/big.bin"))
    many = ",".join(["0-199999"] * 16)
    [(status, h, body)] = ask(mem, get("/big.bin", "Range: bytes=" + many))
    assert (status, h["content-range"], body) == (206, "bytes 0-199999/200000", BIG)
    too_many = ",".join(f"{i}-{i}" for i in range(0, 3400, 200))  # 17 ranges: ignored
    [(status, h, body)] = ask(mem, get("/big.bin", "Range: bytes=" + too_many))
    assert (status, len(body)) == (200, len(BIG))


def test_unsatisfiable_is_416(mem):
    for _ in range(2):  # miss, then hit
        [(status, h, _)] = ask(mem, get("/hello.txt", "Range: bytes=12-"))
        assert status == 416 and h["content-range"] == "bytes */12"


@pytest.mark.parametrize("value", ["bytes=5-1", "items=0-1", "bytes=x"])
def test_invalid_range_is_ignored(mem, value):
    [(status, _, body)] = ask(mem, get("/hello.txt", "Range: " + value))
    assert (status, body) == (200, b"hello world\n")


def test_if_range(mem):
    [(_, h, _)] = ask(mem, get("/hello.txt"))
    etag, lm = h["etag"], h["last-modified"]
    for if_range, status in [(etag, 206), ('"other"', 200), ("W/" + etag, 200), (lm, 206),
                             ("Mon, 01 Jan 2001 00:00:00 GMT", 200)]:
        [(got, h, body)] = ask(mem, get("/hello.txt", "Range: bytes=0-4", "If-Range: " + if_range))
        assert got == status, if_range
        assert body == (b"hello" if status == 206 else b"hello world\n")
    # If-Range without Range is ignored.
    [(status, _, _)] = ask(mem, get("/hello.txt", 'If-Range: "other"'))
    assert status == 200


def test_head_with_range_gets_the_full_head(mem):
    for _ in range(2):  # miss, then hit
        [(status, h, body)] = ask(mem, get("/hello.txt", "Range: bytes=0-4", method="HEAD"), (True,))
        assert (status, h["content-length"], h["accept-ranges"], body) == (200, "12", "bytes", b"")
        assert "content-range" not in h


def test_conditionals_win_over_range(mem):
    [(_, h, _)] = ask(mem, get("/hello.txt"))
    etag = h["etag"]
    [(status, h, body)] = ask(mem, get("/hello.txt", "Range: bytes=0-4", "If-None-Match: " + etag))
    assert (status, body) == (304, b"") and "content-range" not in h
    [(status, _, _)] = ask(mem, get("/hello.txt", "Range: bytes=0-4", 'If-Match: "nope"'))
    assert status == 412
    [(status, _, body)] = ask(mem, get("/hello.txt", "Range: bytes=0-4", 'If-None-Match: "nope"'))
    assert (status, body) == (206, b"hello")


def test_pipelined_ranges_after_a_hit(mem):
    ask(mem, get("/hello.txt"))
    resps = ask(mem, get("/hello.txt", "Range: bytes=0-0") + get("/hello.txt") + get("/hello.txt", "Range: bytes=-1"))
    assert [(s, b) for s, _, b in resps] == [(206, b"h"), (200, b"hello world\n"), (206, b"\n")]


def test_streamed_file_single_range_from_an_offset(big):
    mem = MemoryServer(str(big), max_object_bytes=1000)
    [(status, h, body)] = ask(mem, get("/big.bin", "Range: bytes=150000-150099"))
    assert (status, h["content-range"], body) == (206, "bytes 150000-150099/200000", BIG[150000:150100])
    assert h["cache-status"] == "afpa; fwd=uri-miss; detail=too-large"
    [(status, h, body)] = ask(mem, get("/big.bin", "Range: bytes=100-"))
    assert (status, body) == (206, BIG[100:])
    # Several ranges of a streamed file: the whole file (documented).
    [(status, _, body)] = ask(mem, get("/big.bin", "Range: bytes=0-0,-1"))
    assert (status, body) == (200, BIG)
    [(status, h, _)] = ask(mem, get("/big.bin", "Range: bytes=200000-"))
    assert status == 416 and h["content-range"] == "bytes */200000"


def test_revalidated_object_answers_range(mem, docroot):
    mem.settings.module_settings.revalidate_after = 1
    ask(mem, get("/hello.txt"))
    mem.clock.advance(5)
    [(status, h, body)] = ask(mem, get("/hello.txt", "Range: bytes=0-4"))
    assert (status, body) == (206, b"hello") and "revalidated" in h["cache-status"]


# -- remote routes --------------------------------------------------------------

DIGITS = b"0123456789" * 20
STORABLE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: max-age=60\r\n"
            b'ETag: "v1"\r\nContent-Length: 200\r\n\r\n' + DIGITS)


def _exchange(rig, request: bytes, answer: bytes):
    client, ct = rig.client()
    client.dataReceived(request)
    backend, bt = rig.accept()
    sent = bt.value()
    backend.dataReceived(answer)
    return sent, parse_responses(ct.value())


def test_remote_206_is_relayed_never_stored(docroot):
    rig = Rig(docroot, range_miss="forward")
    req = b"GET /x HTTP/1.1\r\nHost: t\r\nRange: bytes=0-3\r\n\r\n"
    sent, [(status, h, body)] = _exchange(
        rig, req, b"HTTP/1.1 206 Partial Content\r\nCache-Control: max-age=60\r\n"
                  b"Content-Range: bytes 0-3/10\r\nContent-Length: 4\r\n\r\n0123")
    assert b"\r\nRange: bytes=0-3\r\n" in sent  # forwarded as is
    assert (status, body, h["content-range"]) == (206, b"0123", "bytes 0-3/10")
    assert "stored" not in h["cache-status"] and len(rig.server.g.cache) == 0


def test_remote_stored_200_answers_ranges(docroot):
    rig = Rig(docroot)
    _, [(status, h, _)] = _exchange(rig, b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n", STORABLE)
    assert status == 200 and h["cache-status"].endswith("stored")
    client, ct = rig.client()
    client.dataReceived(b"GET /x HTTP/1.1\r\nHost: t\r\nRange: bytes=2-4,180-\r\n\r\n"
                        b"GET /x HTTP/1.1\r\nHost: t\r\nRange: bytes=-3\r\n\r\n"
                        b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
    for _ in range(100):
        if ct.producer is None:
            break
        ct.producer.resumeProducing()
    [(s1, h1, b1), (s2, h2, b2), (s3, h3, b3)] = parse_responses(ct.value())
    assert s1 == 206 and parts_of(h1, b1) == [("bytes 2-4/200", b"234"), ("bytes 180-199/200", DIGITS[180:])]
    assert (s2, h2["content-range"], b2, h2["etag"]) == (206, "bytes 197-199/200", b"789", '"v1"')
    assert (s3, b3, h3["accept-ranges"], h3["cache-status"]) == (200, DIGITS, "bytes", "afpa; hit")
    assert rig.pending() == 0  # all from the cache


def _pump(t):
    for _ in range(100):
        if t.producer is None:
            break
        t.producer.resumeProducing()


def test_range_miss_fetches_the_whole_object_once(docroot):
    """cache.range_miss = "whole" (default): Range and If-Range are not forwarded;
    the storable 200 is stored and the ranges answered from it."""
    rig = Rig(docroot)
    req = b"GET /x HTTP/1.1\r\nHost: t\r\nRange: bytes=2-4,180-\r\nIf-Range: \"v1\"\r\n\r\n"
    client, ct = rig.client()
    client.dataReceived(req)
    backend, bt = rig.accept()
    assert b"Range" not in bt.value() and b"If-Range" not in bt.value()
    backend.dataReceived(STORABLE[:-150])
    assert ct.value() == b""  # held until the object is complete
    backend.dataReceived(STORABLE[-150:])
    _pump(ct)
    [(status, h, body)] = parse_responses(ct.value())
    assert status == 206 and parts_of(h, body) == [("bytes 2-4/200", b"234"), ("bytes 180-199/200", DIGITS[180:])]
    assert h["cache-status"] == "afpa; fwd=uri-miss; fwd-status=200; stored"
    client.dataReceived(b"GET /x HTTP/1.1\r\nHost: t\r\nRange: bytes=-1\r\n\r\n")
    [_, (status, h, body)] = parse_responses(ct.value())
    assert (status, body, h["cache-status"]) == (206, b"9", "afpa; hit")
    assert rig.pending() == 0
    # Keep-alive on both sides: the backend connection went back to the pool.
    client.dataReceived(b"GET /y HTTP/1.1\r\nHost: t\r\nRange: bytes=0-0\r\n\r\n")
    assert rig.pending() == 0 and bt.value().count(b"GET /y") == 1


def test_range_miss_whole_answers_416_and_conditionals_from_the_stored_object(docroot):
    rig = Rig(docroot)
    _, [(status, h, _)] = _exchange(rig, b"GET /x HTTP/1.1\r\nHost: t\r\nRange: bytes=500-\r\n\r\n", STORABLE)
    assert status == 416 and h["content-range"] == "bytes */200"
    assert len(rig.server.g.cache) == 1


def test_range_miss_not_stored_relays_one_range_cut_from_the_200(docroot):
    rig = Rig(docroot)
    uncacheable = b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\nETag: \"v1\"\r\n\r\n" + DIGITS
    _, [(status, h, body)] = _exchange(rig, b"GET /x HTTP/1.1\r\nHost: t\r\nRange: bytes=15-24\r\n\r\n",
                                       uncacheable[:-170])
    assert (status, h["content-range"], body) == (206, "bytes 15-24/200", DIGITS[15:25])
    assert len(rig.server.g.cache) == 0
    # The rest of that body was not read: that connection is closed, not reused.
    assert rig.server.g.pools.pools and all(not p.idle for p in rig.server.g.pools.pools.values())
    client, ct = rig.client()
    client.dataReceived(b"GET /x HTTP/1.1\r\nHost: t\r\nRange: bytes=0-0,-1\r\n\r\n")
    backend, bt = rig.accept()
    backend.dataReceived(uncacheable)
    [(status, _, body)] = parse_responses(ct.value())
    assert (status, body) == (200, DIGITS)  # several ranges of a 200 not kept: the whole 200
    client.dataReceived(b"GET /x HTTP/1.1\r\nHost: t\r\nRange: bytes=0-0\r\nIf-Range: \"v0\"\r\n\r\n")
    backend.dataReceived(uncacheable)
    [_, (status, _, body)] = parse_responses(ct.value())
    assert (status, body) == (200, DIGITS)  # If-Range does not match the backend's ETag


def test_range_miss_whole_backend_dies_before_the_end_is_502(docroot):
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure
    rig = Rig(docroot)
    client, ct = rig.client()
    client.dataReceived(b"GET /x HTTP/1.1\r\nHost: t\r\nRange: bytes=0-1\r\n\r\n")
    backend, bt = rig.accept()
    backend.dataReceived(STORABLE[:-100])
    backend.connectionLost(Failure(ConnectionLost()))
    [(status, _, _)] = parse_responses(ct.value())
    assert status == 502 and len(rig.server.g.cache) == 0 and not ct.disconnecting


def test_boundary_is_not_guessable_from_content():
    assert len(ranges.BOUNDARY) > 20
