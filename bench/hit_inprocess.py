#!/usr/bin/env python3
"""The 1 KiB docroot hit path in-process, without the network: parse, lookup and
the Send Engine's write to a socket that takes everything.

    python bench/hit_inprocess.py                     # microseconds per hit (best of 7)
    N=20000 R=1 valgrind --tool=callgrind python3 bench/hit_inprocess.py
    N=40000 R=1 valgrind --tool=callgrind python3 bench/hit_inprocess.py
        # (total instructions of the second - the first) / 20000 = instructions per hit,
        # repeatable whatever else the host is doing; run it in two checkouts to compare.

Run from the checkout to measure (it imports the code from the current directory).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())

from tests.conftest import MemoryServer  # noqa: E402


class _Socket:
    """Takes every byte at once, as an idle loopback socket does for 1 KiB."""

    def send(self, data: bytes) -> int:
        return len(data)

    def sendmsg(self, bufs: list) -> int:
        return sum(len(b) for b in bufs)


def main() -> None:
    root = tempfile.mkdtemp()
    with open(os.path.join(root, "1k.bin"), "wb") as f:
        f.write(os.urandom(1024))
    mem = MemoryServer(root, keepalive_requests=10**9)
    proto, t = mem.connect()
    t._tempDataLen, t.dataBuffer, t.offset, t.connected, t.disconnecting = 0, b"", 0, True, False
    req = b"GET /1k.bin HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n"
    proto.dataReceived(req)  # the miss that stores it
    proto.dataReceived(req)
    proto.conn.sock = _Socket()
    n, rounds = int(os.environ.get("N", "100000")), int(os.environ.get("R", "7"))
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            proto.dataReceived(req)
        best = min(best, (time.perf_counter() - t0) / n)
    print(f"{os.getcwd()}: {best * 1e6:.2f} µs per hit (in-process, best of {rounds} x {n})")


if __name__ == "__main__":
    main()
