"""A small authoritative DNS server for the tests: fixed records over UDP and
TCP on an ephemeral loopback port, in a thread.

Zone ``test.``:
- ``<anything>.ok.test`` A 192.0.2.1, TTL 300 (``ok.test`` itself too);
- ``big.test`` TXT: 20 strings of 100 octets (over 1232 octets: truncated on UDP);
- any other name: NXDOMAIN with the zone's SOA (TTL 3600, minimum 60).

It counts the queries it received (``count(name)``, over both transports), and
can be told to stay silent (``silent = True``: UDP and TCP queries get no
answer), or to send spoofed answers before the real one (``spoof = True``:
a wrong ID, a wrong question, and a right ID and question from another port,
all with address 6.6.6.6).  ``delay`` holds every answer back that many seconds
(so concurrent queries overlap).
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time

from twisted.names import dns

ZONE = b"test"
SPOOF_ADDRESS = "6.6.6.6"


class DnsUpstream:
    def __init__(self) -> None:
        self.udp, self.tcp = _bind_pair()
        self.port = self.udp.getsockname()[1]
        self.other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # spoofs from another port
        self.other.bind(("127.0.0.1", 0))
        self.silent = False
        self.spoof = False
        self.delay = 0.0
        self.queries: list[tuple[str, bytes, int]] = []  # (transport, lowercased name, type)
        self._lock = threading.Lock()
        self._stop = False
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.udp, selectors.EVENT_READ, "udp")
        self._sel.register(self.tcp, selectors.EVENT_READ, "accept")
        self._bufs: dict[socket.socket, bytes] = {}
        self._later: list[tuple[float, object]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    # -- what the tests look at ---------------------------------------------

    def count(self, name: str | None = None, transport: str | None = None) -> int:
        with self._lock:
            return sum(1 for t, n, _ in self.queries
                       if (name is None or n == name.lower().encode()) and (transport is None or t == transport))

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        for s in list(self._bufs) + [self.udp, self.tcp, self.other]:
            s.close()

    # -- serving ---------------------------------------------------------------

    def answer(self, data: bytes, udp: bool) -> bytes | None:
        q = dns.Message()
        try:
            q.fromStr(data)
        except Exception:  # noqa: BLE001 - a test upstream ignores garbage
            return None
        if not q.queries:
            return None
        question = q.queries[0]
        name = question.name.name
        with self._lock:
            self.queries.append(("udp" if udp else "tcp", name.lower(), question.type))
        r = dns.Message(id=q.id, answer=1, auth=1, recDes=q.recDes, maxSize=65535)
        r.queries = [question]  # its case as received (0x20)
        lname = name.lower()
        if lname == b"ok.test" or lname.endswith(b".ok.test"):
            if question.type == dns.A:
                r.answers = [dns.RRHeader(name, dns.A, dns.IN, 300, dns.Record_A("192.0.2.1", 300))]
        elif lname == b"big.test":
            if question.type == dns.TXT:
                r.answers = [dns.RRHeader(name, dns.TXT, dns.IN, 300, dns.Record_TXT(bytes([97 + i]) * 100, ttl=300))
                             for i in range(20)]
        else:
            r.rCode = dns.ENAME
            r.authority = [dns.RRHeader(ZONE, dns.SOA, dns.IN, 3600, dns.Record_SOA(
                b"ns.test", b"admin.test", 1, 3600, 600, 86400, 60, 3600))]
        wire = r.toStr()
        if udp and len(wire) > 1232:
            r.answers, r.authority, r.trunc = [], [], 1
            wire = r.toStr()
        return wire

    def spoofs(self, data: bytes) -> list[tuple[socket.socket, bytes]]:
        q = dns.Message()
        q.fromStr(data)
        question = q.queries[0]

        def fake(qid: int, name: bytes) -> bytes:
            r = dns.Message(id=qid, answer=1, recDes=q.recDes)
            r.queries = [dns.Query(name, question.type, question.cls)]
            r.answers = [dns.RRHeader(name, dns.A, dns.IN, 300, dns.Record_A(SPOOF_ADDRESS, 300))]
            return r.toStr()

        name = question.name.name
        flipped = name.swapcase() if name.swapcase() != name else b"x" + name
        return [(self.udp, fake((q.id + 1) % 65536, name)),   # wrong ID
                (self.udp, fake(q.id, flipped)),               # wrong question (case)
                (self.other, fake(q.id, name))]                # right, but from another port

    def _run(self) -> None:
        while not self._stop:
            now = time.monotonic()
            due = [item for item in self._later if item[0] <= now]
            self._later = [item for item in self._later if item[0] > now]
            for _, send in due:
                send()  # type: ignore[operator]
            for key, _ in self._sel.select(timeout=0.02):
                kind = key.data
                if kind == "udp":
                    try:
                        data, addr = self.udp.recvfrom(65535)
                    except OSError:
                        continue
                    self._on_udp(data, addr)
                elif kind == "accept":
                    conn, _ = self.tcp.accept()
                    conn.setblocking(False)
                    self._bufs[conn] = b""
                    self._sel.register(conn, selectors.EVENT_READ, "tcp")
                else:
                    self._on_tcp(key.fileobj)

    def _on_udp(self, data: bytes, addr: tuple) -> None:
        if self.silent:
            self.answer(data, True)  # counted, not answered
            return
        wire = self.answer(data, True)
        if wire is None:
            return
        sends = (self.spoofs(data) if self.spoof else []) + [(self.udp, wire)]

        def send() -> None:
            for sock, msg in sends:
                try:
                    sock.sendto(msg, addr)
                except OSError:
                    pass
        self._schedule(send)

    def _on_tcp(self, conn: socket.socket) -> None:
        try:
            chunk = conn.recv(65535)
        except OSError:
            chunk = b""
        if not chunk:
            self._sel.unregister(conn)
            self._bufs.pop(conn, None)
            conn.close()
            return
        buf = self._bufs[conn] + chunk
        while len(buf) >= 2 and len(buf) >= 2 + struct.unpack_from(">H", buf)[0]:
            n = struct.unpack_from(">H", buf)[0]
            msg, buf = buf[2:2 + n], buf[2 + n:]
            wire = self.answer(msg, False)
            if wire is not None and not self.silent:
                framed = struct.pack(">H", len(wire)) + wire
                self._schedule(lambda c=conn, f=framed: _send_all(c, f))
        self._bufs[conn] = buf

    def _schedule(self, send: object) -> None:
        if self.delay:
            self._later.append((time.monotonic() + self.delay, send))
        else:
            send()  # type: ignore[operator]


def _bind_pair() -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same ephemeral loopback port (a few tries:
    the TCP side of a free UDP port may be taken)."""
    for _ in range(50):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind(("127.0.0.1", tcp.getsockname()[1]))
        except OSError:
            tcp.close()
            udp.close()
            continue
        tcp.listen(64)
        return udp, tcp
    raise RuntimeError("no free port for both UDP and TCP")


def _send_all(conn: socket.socket, data: bytes) -> None:
    try:
        conn.setblocking(True)
        conn.sendall(data)
        conn.setblocking(False)
    except OSError:
        pass
