#!/usr/bin/env python3
"""The floor of the DNS benchmark (bench/dns.py): the least a Twisted UDP server
can do per query.

    python bench/dns_floor.py --listen 127.0.0.1:5300 --upstream 127.0.0.1:5301

A query whose bytes after the ID were seen before is answered from a dict of
reply bytes (the ID copied in): one dict lookup and one write, no parsing, no
TTL countdown, no checks.  Any other query is relayed to the upstream under a
new ID from one fixed socket, and the reply is stored in the dict and sent back.
bench/dns.py warms it with every hit query first, so during the hits run every
answer comes from the dict.  It is not a resolver (no validation of what comes
back, no timeouts, no random ports): it only shows what the reactor and one
Python call per datagram cost, the part of afpa's cost that afpa cannot remove.
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol


def host_port(text: str) -> tuple[str, int]:
    """'127.0.0.1:5300' -> ('127.0.0.1', 5300)."""
    host, _, port = text.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}") from None


class Floor(DatagramProtocol):
    """Answers clients from ``replies``; relays the rest through ``relay``."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.replies: dict[bytes, bytes] = {}          # query bytes after the ID -> reply after the ID
        self.pending: dict[int, tuple[tuple, bytes, bytes]] = {}  # upstream ID -> (client, client ID, key)
        self.next_id = 0
        self.relay: Relay | None = None

    def datagramReceived(self, data: bytes, addr: tuple) -> None:
        reply = self.replies.get(data[2:])
        if reply is not None:
            self.transport.write(data[:2] + reply, addr)
            return
        if len(data) < 12 or self.relay is None:
            return
        qid = self.next_id
        self.next_id = (qid + 1) & 0xFFFF
        self.pending[qid] = (addr, data[:2], data[2:])
        self.relay.transport.write(qid.to_bytes(2, "big") + data[2:], self.upstream)


class Relay(DatagramProtocol):
    """The upstream side: stores each reply and sends it to the client that asked."""

    def __init__(self, floor: Floor) -> None:
        self.floor = floor

    def datagramReceived(self, data: bytes, addr: tuple) -> None:
        if addr != self.floor.upstream or len(data) < 12:
            return
        entry = self.floor.pending.pop(int.from_bytes(data[:2], "big"), None)
        if entry is None:
            return
        client, client_id, key = entry
        self.floor.replies[key] = data[2:]
        self.floor.transport.write(client_id + data[2:], client)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=host_port, required=True, metavar="HOST:PORT")
    p.add_argument("--upstream", type=host_port, required=True, metavar="HOST:PORT")
    args = p.parse_args(argv)
    floor = Floor(args.upstream)
    floor.relay = Relay(floor)
    try:
        reactor.listenUDP(args.listen[1], floor, interface=args.listen[0])
        reactor.listenUDP(0, floor.relay, interface=args.upstream[0])
    except Exception as exc:  # a port in use: one line, not a traceback
        print(f"dns_floor: {exc}", file=sys.stderr)
        return 1
    reactor.run()   # SIGTERM/SIGINT stop it (Twisted's default handlers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
