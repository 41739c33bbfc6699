#!/usr/bin/env python3
"""The 1 KiB pass-through miss (a ``no-store`` origin) in-process, without the
network: the client's request, the backend machine's forwarded request on a
pooled connection, the origin's answer relayed to the client.

    python bench/pass_inprocess.py                    # microseconds per request (best of 7)
    N=5000 R=1 valgrind --tool=callgrind python3 bench/pass_inprocess.py
    N=10000 R=1 valgrind --tool=callgrind python3 bench/pass_inprocess.py
        # (total instructions of the second - the first) / 5000 = instructions per request

Run from the checkout to measure (it imports the code from the current directory).
It exits non-zero when a request did not reuse the one backend connection.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())

from twisted.internet.testing import MemoryReactorClock, StringTransport  # noqa: E402

from afpa.net.helpers import InlineHelpers  # noqa: E402
from afpa.server import Server  # noqa: E402
from protocols.http.settings import http_settings  # noqa: E402

BODY = os.urandom(1024)
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 19:30:21 GMT\r\n"
          b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
          b"Last-Modified: Mon, 23 Nov 2026 19:30:20 GMT\r\nConnection: keep-alive\r\n"
          b"ETag: \"6b04944c-400\"\r\nCache-Control: no-store\r\nAccept-Ranges: bytes\r\n\r\n" + BODY)
REQUEST = b"GET /pass/f1k HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"


def main() -> None:
    root = tempfile.mkdtemp()
    reactor = MemoryReactorClock()
    reactor.advance(1_800_000_000)
    server = Server(http_settings(root=root, backend="http://127.0.0.1:9", keepalive_requests=10**9), reactor=reactor,
                    helpers=InlineHelpers())
    client = server.factory().buildProtocol(None)
    ct = StringTransport()
    client.makeConnection(ct)
    client.dataReceived(REQUEST)
    factory = reactor.tcpClients[0][2]
    backend = factory.buildProtocol(None)
    bt = StringTransport()
    backend.makeConnection(bt)
    reactor.advance(0)

    def one() -> None:
        bt.clear()
        ct.clear()
        client.dataReceived(REQUEST)
        backend.dataReceived(ANSWER)

    backend.dataReceived(ANSWER)
    for _ in range(3):
        one()
    assert ct.value().endswith(BODY), ct.value()[:300]
    n, rounds = int(os.environ.get("N", "20000")), int(os.environ.get("R", "7"))
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            one()
        best = min(best, (time.perf_counter() - t0) / n)
    assert ct.value().endswith(BODY) and not ct.disconnecting, ct.value()[:300]
    if len(reactor.tcpClients) != 1:
        sys.exit(f"{len(reactor.tcpClients)} backend connections opened, want 1")
    print(f"{os.getcwd()}: {best * 1e6:.2f} µs per pass-through request (in-process, best of {rounds} x {n})")


if __name__ == "__main__":
    main()
