#!/usr/bin/env python3
"""The DNS hit and miss paths in-process, without the network: the datagram
listener fed datagrams directly, its replies written to a transport that takes
everything, upstream sockets that answer at once.

    python bench/dns_inprocess.py                  # µs per hit and per miss (best of R)
    python bench/dns_inprocess.py --profile hit    # cProfile of the hit loop (top 25)
    python bench/dns_inprocess.py --profile miss
    N=20000 R=1 MODE=hit valgrind --tool=callgrind python3 bench/dns_inprocess.py
    N=40000 R=1 MODE=hit valgrind --tool=callgrind python3 bench/dns_inprocess.py
        # (total instructions of the second - the first) / 20000 = instructions per hit,
        # repeatable whatever else the host is doing; run it in two checkouts to compare.

The miss figure is the Python side of a miss (parse, flight, upstream query,
checking and storing the answer, the reply); the outbound verb is a fake here,
so the cost of opening a real socket per try is not in it (bench/dns.py shows
the whole).  Run from the checkout to measure (it imports from the current
directory).
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time

sys.path.insert(0, os.getcwd())

from twisted.internet.task import Clock  # noqa: E402

from afpa.config import Settings  # noqa: E402
from afpa.machine.modules import Registry  # noqa: E402
from afpa.net.datagram import DatagramEndpoint  # noqa: E402
from afpa.net.helpers import InlineHelpers  # noqa: E402
from afpa.net.intrinsics import INTRINSICS  # noqa: E402
from afpa.server import Server  # noqa: E402
from protocols.dns.module import MODULE  # noqa: E402
from protocols.dns.settings import SETTINGS  # noqa: E402

CLIENT = ("127.0.0.1", 40000)
UP = ("127.0.0.2", 53)


def query(name: str, qid: int = 0x1234, qtype: int = 1) -> bytes:
    """What dnsperf sends: RD, one question, one OPT (EDNS, 4096)."""
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return (struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 1) + qname + struct.pack(">HH", qtype, 1)
            + b"\x00" + struct.pack(">HHIH", 41, 4096, 0, 0))


def answer_to(q: bytes) -> bytes:
    """The upstream's answer to ``q`` as sent (its ID and question): one A record."""
    end = 12
    while q[end]:
        end += q[end] + 1
    end += 5
    return (struct.pack(">HHHHHH", struct.unpack_from(">H", q)[0], 0x8180, 1, 1, 0, 0) + q[12:end]
            + b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 3600, 4) + bytes([192, 0, 2, 1]))


class _UDP:
    """The listening port's transport: takes every datagram."""

    sent = 0

    def write(self, data: bytes, addr: tuple) -> None:
        self.sent += 1


class _Sock:
    """An upstream socket whose peer's answer arrives once the query has parked
    (``answer()``, as the next reactor event would deliver it)."""

    __slots__ = ("on_data", "reply")
    sent: list = []

    def __init__(self, on_data):
        self.on_data = on_data

    def send(self, data: bytes) -> bool:
        self.reply = answer_to(data)
        _Sock.sent.append(self)
        return True

    def answer(self) -> None:
        self.on_data(self.reply)

    def close(self) -> None:
        pass


def build():
    clock = Clock()
    clock.advance(1_800_000_000)
    reg = Registry(intrinsics=dict(INTRINSICS))
    reg.register(MODULE)
    settings = Settings(module="dns", module_settings=SETTINGS.build({"upstreams": (UP,)}),
                        cache_bytes=1 << 30)
    server = Server(settings, reactor=clock, registry=reg, helpers=InlineHelpers())
    server.g.open_datagram = lambda host, port, on_data, on_error: _Sock(on_data)
    endpoint = DatagramEndpoint(server)
    endpoint.transport = _UDP()
    return server, endpoint


def hit_loop(endpoint, n: int) -> None:
    q = query("www.bench.test")
    endpoint.datagramReceived(q, CLIENT)  # the miss that stores it
    while _Sock.sent:
        _Sock.sent.pop().answer()
    received = endpoint.datagramReceived
    for _ in range(n):
        received(q, CLIENT)


def miss_loop(endpoint, n: int, start: int) -> None:
    qs = [query(f"n{i}.bench.test") for i in range(start, start + n)]
    received = endpoint.datagramReceived
    sent = _Sock.sent
    for q in qs:
        received(q, CLIENT)
        while sent:
            sent.pop().answer()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", choices=("hit", "miss"))
    args = p.parse_args()
    n, rounds = int(os.environ.get("N", "100000")), int(os.environ.get("R", "7"))
    mode = os.environ.get("MODE", "")
    server, endpoint = build()
    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        (hit_loop(endpoint, n) if args.profile == "hit" else miss_loop(endpoint, n // 4, 0))
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    if mode in ("", "hit"):
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            hit_loop(endpoint, n)
            best = min(best, (time.perf_counter() - t0) / n)
        sent = endpoint.transport.sent
        print(f"{os.getcwd()}: {best * 1e6:.2f} µs per hit (in-process, best of {rounds} x {n}; {sent} replies)")
    if mode in ("", "miss"):
        m = max(1, n // 10)
        best = float("inf")
        for r in range(rounds):
            t0 = time.perf_counter()
            miss_loop(endpoint, m, r * m)
            best = min(best, (time.perf_counter() - t0) / m)
        print(f"{os.getcwd()}: {best * 1e6:.2f} µs per miss (in-process, upstream faked, best of {rounds} x {m})")


if __name__ == "__main__":
    main()
