"""The pool of outbound UDP sockets (afpa.net.datagram.DatagramPool) and the
bulk-read random source: sockets reused at random, renewed after a number of
exchanges, never reused after an exchange that got no reply."""

from __future__ import annotations

import os
import random

from afpa.net.datagram import BufferedSystemRandom, DatagramPool

UP = ("10.0.0.1", 53)


class _Port:
    def __init__(self, number):
        self.number = number
        self.stopped = False

    def stopListening(self):  # noqa: N802
        self.stopped = True


class _Transport:
    def __init__(self, port):
        self.port = port
        self.sent = []

    def connect(self, host, port):
        self.peer = (host, port)

    def write(self, data):
        self.sent.append(data)

    def getHost(self):  # noqa: N802
        return self


class FakeReactor:
    """listenUDP hands out ports 40000, 40001, ... and connects the protocol."""

    def __init__(self):
        self.ports = []

    def listenUDP(self, port, proto, interface=""):  # noqa: N802
        p = _Port(40000 + len(self.ports))
        self.ports.append(p)
        proto.transport = _Transport(p.number)
        proto.startProtocol()
        return p


def exchange(pool, answer=True):
    """One exchange; returns (its source port, what it received)."""
    got = []
    lease = pool.open(*UP, got.append)
    lease.send(b"query")
    port = lease.local_port()
    if answer:
        lease.sock.datagramReceived(b"answer", UP)
    lease.close()
    return port, got


def test_sockets_are_reused_then_renewed_after_their_uses():
    reactor = FakeReactor()
    pool = DatagramPool(reactor, random.Random(1), uses=3)
    ports = [exchange(pool)[0] for _ in range(9)]
    assert len(reactor.ports) == 3  # three exchanges per socket
    assert all(ports.count(p) == 3 for p in set(ports))
    assert [p.stopped for p in reactor.ports] == [True, True, True]


def test_a_socket_whose_exchange_got_no_reply_is_closed_not_reused():
    reactor = FakeReactor()
    pool = DatagramPool(reactor, random.Random(1))
    first, _ = exchange(pool, answer=False)
    second, got = exchange(pool)
    assert first != second and reactor.ports[0].stopped and got == [b"answer"]
    third, _ = exchange(pool)
    assert third == second  # answered: back in the pool


def test_concurrent_exchanges_get_their_own_sockets_and_datagrams():
    reactor = FakeReactor()
    pool = DatagramPool(reactor, random.Random(1))
    a, b = [], []
    la, lb = pool.open(*UP, a.append), pool.open(*UP, b.append)
    assert la.sock is not lb.sock
    lb.sock.datagramReceived(b"for b", UP)
    la.sock.datagramReceived(b"spoof", ("10.6.6.6", 53))
    la.sock.datagramReceived(b"for a", UP)
    assert a == [b"for a"] and b == [b"for b"]
    la.close()
    la.sock.datagramReceived(b"late", UP)  # nobody holds it now: dropped
    assert a == [b"for a"]


def test_idle_sockets_are_picked_at_random():
    reactor = FakeReactor()
    pool = DatagramPool(reactor, random.Random(7), uses=10**6)
    leases = [pool.open(*UP, lambda d: None) for _ in range(8)]
    for lease in leases:
        lease.heard = True
        lease.close()
    picked = set()
    for _ in range(40):
        lease = pool.open(*UP, lambda d: None)
        picked.add(lease.local_port())
        lease.heard = True
        lease.close()
    assert len(reactor.ports) == 8 and len(picked) > 4


def test_a_refusal_fails_the_exchange_and_retires_its_socket():
    reactor = FakeReactor()
    pool = DatagramPool(reactor, random.Random(1))
    errors = []
    lease = pool.open(*UP, lambda d: None, errors.append)
    lease.sock.datagramReceived(b"answer", UP)
    lease.sock.connectionRefused()
    lease.close()
    assert errors == ["refused"] and reactor.ports[0].stopped


def test_buffered_random_is_kernel_random_and_forgotten_by_a_forked_child():
    r = BufferedSystemRandom()
    draws = {r.getrandbits(32) for _ in range(1000)}
    assert len(draws) > 990 and all(0 <= d < 2**32 for d in draws)
    assert 0 <= r.random() < 1 and r.randrange(5) in range(5) and r.getrandbits(0) == 0
    r.getrandbits(8)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child draws: it must not repeat what the parent draws next
        os.close(read)
        os.write(write, r.getrandbits(64).to_bytes(8, "big"))
        os._exit(0)
    os.close(write)
    child = int.from_bytes(os.read(read, 8), "big")
    os.close(read)
    os.waitpid(pid, 0)
    assert child != r.getrandbits(64)
