"""Responses reach a slow reader whole and in order, with and without the
Twisted-private fast path (afpa/net/twisted_private.py).

The fast path writes straight to the socket when the transport holds nothing.
The kernel takes a write well before it reports the socket writable again, so a
direct write made while the transport still held bytes would land ahead of them
and splice one response into another.  A client with a small receive buffer
that reads a little at a time asks for more than it reads (a burst that fills
the server's socket, then one request after every few reads): cached hits of
one and several fragments, a body streamed from disk, head-only answers and a
404 must arrive exactly once each, in request order.  (With push's "transport
holds nothing" check removed this test fails; it also found a hole the public
path's slower draining opened in file bodies, see test_sendengine.)
"""

from __future__ import annotations

import os
import socket
import time

import pytest

pytestmark = pytest.mark.integration

SMALL = os.urandom(1000)
TINY = b"0123456789"
HIT = os.urandom(60 * 1024)         # cached: one fragment, often more than the socket takes
# A burst of distinct hits: a response overtaking an identical one would go unseen.
BURST = [os.urandom(60 * 1024) for _ in range(50)]
MID = os.urandom(200 * 1024)        # cached: several fragments
BIG = os.urandom(3 * 1024 * 1024)   # over --max-object-size: streamed from disk


def _request(method: str, path: str, close: bool = False) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: t\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode()


Step = list[tuple[bytes, int, "bytes | None"]]  # requests sent together: (request, status, body)


def _plan() -> list[Step]:
    """Bursts that fill the server's socket (its kernel buffer takes megabytes
    before it refuses a write; the last one-fragment hits of the burst stay in
    the transport), each followed by requests sent one by one while those bytes
    are still queued: cached hits, a 404, head-only answers, a cached body of
    several fragments and one streamed from disk."""
    def r(method: str, path: str, status: int, body: bytes | None) -> tuple[bytes, int, bytes | None]:
        return _request(method, path), status, body

    burst = [r("GET", f"/h{i}.bin", 200, body) for i, body in enumerate(BURST)]
    others = [r("GET", "/small.bin", 200, SMALL), r("GET", "/tiny.txt", 200, TINY), r("HEAD", "/mid.bin", 200, None),
              r("GET", "/nothing-here", 404, b""), r("GET", "/small.bin", 200, SMALL),
              r("GET", "/mid.bin", 200, MID), r("GET", "/hit.bin", 200, HIT), r("HEAD", "/big.bin", 200, None)]
    steps: list[Step] = [burst]
    for i, hit in enumerate(burst):
        # More asked for than the client reads meanwhile: the socket stays full
        # and each hit leaves bytes in the transport for the next request to meet.
        steps += [[hit], [others[i % len(others)]]]
        if i == len(burst) // 2:
            steps.append([r("GET", "/big.bin", 200, BIG)])
    steps.append([(_request("GET", "/tiny.txt", close=True), 200, TINY)])
    return steps


def _slow_client(s: socket.socket, steps: list[Step], deadline: float) -> bytes:
    """Send each step's requests together, the next step right after reading a
    little, and read to EOF in odd-sized pieces, pausing after each.  A request
    then reaches the server in the same reactor turn as the room the client's
    read made in its socket, while its transport may still hold bytes: the
    moment where a direct write could overtake them."""
    sizes = (1, 700, 4096, 17, 8192, 333, 16384)
    todo = [b"".join(req for req, _, _ in step) for step in steps]
    s.sendall(todo.pop(0))
    got = bytearray()
    n = 0
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(sizes[n % len(sizes)])
        except socket.timeout:
            chunk = None  # everything asked for is answered: ask the next
        if chunk == b"":
            break
        if chunk:
            got += chunk
            n += 1
        if todo and (chunk is None or n % 8 == 0):
            s.sendall(todo.pop(0))
        time.sleep(0.001)
    return bytes(got)


def _check(raw: bytes, plan: list[tuple[bytes, int, bytes | None]]) -> None:
    pos = 0
    for i, (req, status, body) in enumerate(plan):
        end = raw.find(b"\r\n\r\n", pos)
        assert end >= 0, f"response {i} ({req.split(b' ')[:2]}) missing"
        lines = raw[pos:end].split(b"\r\n")
        assert lines[0].startswith(b"HTTP/1.1 %d " % status), f"response {i}: {lines[0]!r}"
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        length = int(fields[b"content-length"])
        pos = end + 4
        if body is None:
            continue
        if status == 404:
            body = raw[pos:pos + length]  # the error page: only its place in the stream matters
        assert length == len(body), f"response {i}: Content-Length {length}, expected {len(body)}"
        assert raw[pos:pos + length] == body, f"response {i} ({req.split(b' ')[:2]}): body differs"
        pos += length
    assert pos == len(raw), f"{len(raw) - pos} bytes after the last response"


@pytest.mark.parametrize("privates", ["on", "off"])
def test_pipelined_mixed_responses_reach_a_slow_reader_in_order(afpa_process, docroot, monkeypatch, privates):
    (docroot / "small.bin").write_bytes(SMALL)
    (docroot / "tiny.txt").write_bytes(TINY)
    (docroot / "mid.bin").write_bytes(MID)
    (docroot / "hit.bin").write_bytes(HIT)
    for i, body in enumerate(BURST):
        (docroot / f"h{i}.bin").write_bytes(body)
    (docroot / "big.bin").write_bytes(BIG)
    if privates == "off":
        monkeypatch.setenv("AFPA_NO_TWISTED_PRIVATES", "1")
    else:
        monkeypatch.delenv("AFPA_NO_TWISTED_PRIVATES", raising=False)
    p = afpa_process("--max-object-size", "1M")
    plan = _plan()
    # Store the cacheable files first, so the pipeline below answers them as hits.
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"".join(_request("GET", f"/h{i}.bin") for i in range(len(BURST)))
                  + _request("GET", "/small.bin") + _request("GET", "/tiny.txt")
                  + _request("GET", "/hit.bin") + _request("GET", "/mid.bin", close=True))
        while s.recv(65536):
            pass

    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(0.05)
    s.connect(("127.0.0.1", p.port))
    try:
        raw = _slow_client(s, plan, time.monotonic() + 60)
    finally:
        s.close()
    _check(raw, [one for step in plan for one in step])
    err = p.stop()
    wanted = "Twisted privates" if privates == "on" else "Twisted public API only"
    assert "afpa: send path: " in err and wanted in err, err
