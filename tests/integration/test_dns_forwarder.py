"""``afpa serve --module dns`` as a process in front of a real (test) upstream on
loopback, asked with ``dig`` and with Python sockets."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from importlib.metadata import entry_points

import pytest
from twisted.names import dns

from tests import dnsmsg as m
from tests.conftest import REPO, AfpaProcess, free_port, wait_port
from tests.integration.dnsupstream import SPOOF_ADDRESS, DnsUpstream

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def dns_entry_point(tmp_path_factory):
    """A PYTHONPATH on which ``afpa.modules`` has ``dns`` (until the checkout is
    reinstalled with its pyproject, its entry point is not in the installed metadata)."""
    if any(ep.name == "dns" for ep in entry_points(group="afpa.modules")):
        return ""
    shim = tmp_path_factory.mktemp("shim")
    info = shim / "afpa_dns_shim-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: afpa-dns-shim\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[afpa.modules]\ndns = protocols.dns.module:MODULE\n")
    return str(shim)


class DnsProcess(AfpaProcess):
    """``afpa serve --module dns`` on ephemeral loopback ports (UDP and TCP on one)."""

    def __init__(self, *extra: str):
        self.port = free_port()
        self.admin_port = free_port()
        cmd = [sys.executable, "-m", "afpa", "serve", "--module", "dns", "--listen", f"127.0.0.1:{self.port}",
               "--admin", f"127.0.0.1:{self.admin_port}", *extra]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # The datagram listener is bound before the stream one: TCP open means UDP is too.
        wait_port(self.port, self.proc)
        wait_port(self.admin_port, self.proc)


@pytest.fixture
def upstream():
    up = DnsUpstream()
    yield up
    up.close()


@pytest.fixture
def forwarder(dns_entry_point, upstream, monkeypatch):
    if dns_entry_point:
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (dns_entry_point, str(REPO)) if p))
    procs = []

    def start(*extra):
        p = DnsProcess("--upstream", f"127.0.0.1:{upstream.port}", *extra)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.proc.poll() is None:
            p.stop()


def ask_udp(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(data, ("127.0.0.1", port))
        return s.recv(65535)


def ask_tcp(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(m.frame(data))
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
            chunk = s.recv(65535)
            if not chunk:
                break
            buf += chunk
        return m.unframe(buf)[0]


def dig(port: int, *args: str) -> str:
    if shutil.which("dig") is None:
        pytest.skip("dig is not installed")
    out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+tries=1", "+time=5", *args],
                         capture_output=True, text=True, timeout=30)
    return out.stdout


def dig_answers(port: int, name: str, qtype: str = "A") -> list[list[str]]:
    """``dig +noall +answer``: [[name, ttl, class, type, data], ...]."""
    return [line.split(None, 4) for line in dig(port, name, qtype, "+noall", "+answer").splitlines() if line]


def test_second_query_is_a_hit_with_a_lower_ttl(forwarder, upstream):
    afpa = forwarder()
    [first] = dig_answers(afpa.port, "www.ok.test")
    assert first[0] == "www.ok.test." and first[1] == "300" and first[4] == "192.0.2.1"
    time.sleep(1.1)
    [second] = dig_answers(afpa.port, "www.ok.test")
    assert second[4] == "192.0.2.1" and int(second[1]) < 300
    assert upstream.count("www.ok.test") == 1


def test_nxdomain_is_cached(forwarder, upstream):
    afpa = forwarder()
    for _ in range(2):
        out = dig(afpa.port, "missing.test", "+noall", "+comments", "+authority")
        assert "status: NXDOMAIN" in out and "SOA" in out
    assert upstream.count("missing.test") == 1


def test_large_answer_tcp_fallback_and_truncation(forwarder, upstream):
    afpa = forwarder()
    try:
        whole = m.parse(ask_udp(afpa.port, m.query("big.test", dns.TXT, qid=5, edns=4096)))
    except TimeoutError:
        raise AssertionError(f"no answer; upstream saw {upstream.queries}; afpa said {afpa.stop()}") from None
    assert whole.id == 5 and len(whole.answers) == 20 and not whole.trunc
    assert upstream.count("big.test", "udp") == 1 and upstream.count("big.test", "tcp") == 1
    small = m.parse(ask_udp(afpa.port, m.query("big.test", dns.TXT, qid=6)))  # 512 octets
    assert small.trunc and small.answers == []
    over_tcp = m.parse(ask_tcp(afpa.port, m.query("big.test", dns.TXT, qid=7)))
    assert over_tcp.id == 7 and len(over_tcp.answers) == 20
    assert upstream.count("big.test") == 2  # both later answers came from the cache


def test_spoofed_answers_are_ignored(forwarder, upstream):
    upstream.spoof = True
    afpa = forwarder()
    [answer] = dig_answers(afpa.port, "bank.ok.test")
    assert answer[4] == "192.0.2.1" != SPOOF_ADDRESS


def test_upstream_silent_gives_servfail(forwarder, upstream):
    upstream.silent = True
    afpa = forwarder("--dns-timeout", "0.3", "--dns-tries", "2")
    r = m.parse(ask_udp(afpa.port, m.query("www.ok.test", qid=9)))
    assert r.id == 9 and r.rCode == dns.ESERVER
    assert upstream.count("www.ok.test") == 2


def test_upstream_down_gives_servfail(forwarder, upstream):
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there: the kernel refuses
    afpa = forwarder("--upstream", f"127.0.0.1:{port}", "--dns-timeout", "0.5", "--dns-tries", "1")
    upstream.silent = True
    r = m.parse(ask_udp(afpa.port, m.query("x.ok.test", qid=10)))
    assert r.rCode == dns.ESERVER


def test_stale_answer_when_upstream_fails(forwarder, upstream, tmp_path):
    cfg = tmp_path / "dns.toml"
    cfg.write_text('module = "dns"\n[dns]\nserve_stale = true\nmax_ttl = 1\ntimeout = 0.3\ntries = 1\n')
    afpa = forwarder("--config", str(cfg))
    first = m.parse(ask_udp(afpa.port, m.query("old.ok.test", qid=11)))
    assert [rr.ttl for rr in first.answers] == [1]
    time.sleep(1.5)  # expired
    upstream.silent = True
    stale = m.parse(ask_udp(afpa.port, m.query("old.ok.test", qid=12)))
    assert stale.id == 12 and stale.rCode == 0
    assert [(rr.ttl, rr.payload.dottedQuad()) for rr in stale.answers] == [(30, "192.0.2.1")]


def test_concurrent_identical_queries_reach_upstream_once(forwarder, upstream):
    upstream.delay = 0.5
    afpa = forwarder()
    socks = []
    for i in range(20):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(m.query("same.ok.test", qid=100 + i), ("127.0.0.1", afpa.port))
        socks.append(s)
    ids = []
    for s in socks:
        ids.append(m.parse(s.recv(65535)).id)
        s.close()
    assert sorted(ids) == list(range(100, 120))
    assert upstream.count("same.ok.test") == 1


def test_malformed_input_never_stops_it(forwarder, upstream):
    afpa = forwarder()
    rnd = random.Random(1)
    bad = [b"", b"\x00", os.urandom(11), b"\x12\x34\x81\x80" + bytes(8),  # QR=1
           m.query("www.ok.test")[:-2],
           b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",  # pointer loop
           b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x3f" + b"a" * 63 * 5 + b"\x00\x00\x01\x00\x01"]
    bad += [bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 120))) for _ in range(100)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for data in bad:
            if data:
                s.sendto(data, ("127.0.0.1", afpa.port))
    for data in bad[:20]:
        with socket.create_connection(("127.0.0.1", afpa.port), timeout=5) as c:
            c.sendall(m.frame(data) + data)
    with socket.create_connection(("127.0.0.1", afpa.port), timeout=5) as c:
        c.sendall(b"\xff")  # half a length, then gone
    good = m.parse(ask_udp(afpa.port, m.query("www.ok.test", qid=77)))
    assert good.id == 77 and good.answers[0].payload.dottedQuad() == "192.0.2.1"
    good = m.parse(ask_tcp(afpa.port, m.query("www.ok.test", qid=78)))
    assert good.id == 78
    assert afpa.proc.poll() is None
    assert "Traceback" not in afpa.stop()


def test_workers_answer_udp_and_tcp(forwarder, upstream):
    """With --workers 2 the supervisor shares the TCP listener and each worker
    binds the UDP address itself; every query is answered, over both."""
    afpa = forwarder("--workers", "2")
    answered = None
    for attempt in range(100):  # the workers bind UDP once they have started
        try:
            answered = m.parse(ask_udp(afpa.port, m.query("www.ok.test", qid=attempt), timeout=0.2))
            break
        except OSError:
            continue
    assert answered is not None and answered.answers[0].payload.dottedQuad() == "192.0.2.1"
    for qid in range(200, 230):  # each from a new source port: the kernel spreads them
        reply = m.parse(ask_udp(afpa.port, m.query("www.ok.test", qid=qid)))
        assert reply.id == qid and reply.answers[0].payload.dottedQuad() == "192.0.2.1"
    assert m.parse(ask_tcp(afpa.port, m.query("www.ok.test", qid=7))).id == 7
    assert "Traceback" not in afpa.stop()
