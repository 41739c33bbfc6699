#!/usr/bin/env python3
"""DNS cache hits and misses with dnsperf: afpa beside dnsmasq, unbound and a bare
Twisted floor, in one run.

    python bench/dns.py                       # all four, 10 s per run, about 1.5 min
    python bench/dns.py --repeat 3 --servers dnsmasq,unbound,floor

What it does.  It writes every config to a temp dir and starts, on 127.0.0.1
ephemeral ports only: an *upstream* (a dnsmasq answering for bench.test from
--address/--txt-record, TTL 3600), then one server under test at a time:

- afpa:    ``afpa serve --module dns --upstream UP`` (see afpa_command());
           skipped with a note while this checkout has no ``--module``;
- dnsmasq: a second dnsmasq, a caching forwarder to UP (cache 10^6 names,
           so a run never evicts: see DNSMASQ_CACHE);
- unbound: a caching forwarder (forward-zone "." to UP, 1 thread, iterator only,
           no prefetch, large caches);
- floor:   bench/dns_floor.py, a bare Twisted UDP responder answering from a
           dict of reply bytes (misses relayed to UP): the least Python on
           Twisted can do per query.

The server under test is pinned to CPU 0 (taskset); dnsperf and the upstream
share CPU 1, so the upstream's work on misses is not charged to the server.
For each server: check it answers (every hit name asked once to fill its cache,
then asked again and compared with the expected A/AAAA/TXT data; one fresh
miss name too) -- a server that fails this is reported in one line and skipped;
then

- hits:   dnsperf for --duration s over --names names (80 % A, 15 % AAAA,
          5 % TXT), all in the cache;
- misses: dnsperf over names never asked before (random labels under
          bench.test, new ones for every run, each sent once: ``-n 1``),
          so every query goes upstream; ``--miss-qps`` bounds the rate.

How to read the table.  dnsperf on one core cannot saturate a C server, so
q/s mostly shows dnsperf's limit; the figure to compare is **µs CPU/query** =
(utime+stime of the server's processes from /proc/PID/stat, children included,
after - before the dnsperf run) / queries dnsperf reports completed.  Lower is
better.  /proc counts in 10 ms ticks, so runs under a few seconds are rough.
``lost`` is dnsperf's lost queries (no answer within --timeout) for hits /
misses; answers other than NOERROR are listed under the table.  With
``--repeat K`` every figure is the median of K runs; each round starts the
servers in a rotated order so host noise spreads over all of them.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import throughput as tp  # noqa: E402  (process start/stop, CPU accounting)

HOST = "127.0.0.1"
DOMAIN = "bench.test"
A_ADDR = "192.0.2.1"           # what the upstream answers for every A under bench.test
AAAA_ADDR = "2001:db8::1"
UPSTREAM_TTL = 3600            # long enough that nothing expires during a run
SERVERS = ("afpa", "dnsmasq", "unbound", "floor")
QTYPES = {"A": 1, "AAAA": 28, "TXT": 16}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
START_TIMEOUT = 20.0
# dnsmasq's cache in names.  Big enough that a misses run never evicts: with
# 10000, once full of unexpired names dnsmasq 2.90 spends ~3x the CPU per miss
# (88 against 30 µs here) in a scan on each insertion, which is its eviction and
# not its forwarding.  unbound's caches are as generous (msg 128m, rrset 256m).
DNSMASQ_CACHE = 1_000_000


# ---------------------------------------------------------------- afpa

def afpa_command(base: list[str], port: int, upstream_port: int) -> list[str]:
    """The afpa under test: adjust here when `afpa serve --module dns` changes.

    ``base`` is how afpa is run (``python -m afpa`` of this checkout, or --afpa-cmd).
    """
    return base + ["serve", "--module", "dns", "--listen", f"{HOST}:{port}",
                   "--upstream", f"{HOST}:{upstream_port}", "--quiet"]


def afpa_missing(base: list[str]) -> str | None:
    """Why `afpa serve --module dns` cannot run here yet, or None when it can."""
    try:
        out = subprocess.run(base + ["serve", "--help"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{shlex.join(base)} serve --help` failed: {exc}"
    # Module flags (--upstream of dns) show in `serve --help` once the module is installed.
    if "--module" not in out or "--upstream" not in out:
        return "`afpa serve --module dns --upstream` is not in this checkout yet"
    return None


# ---------------------------------------------------------------- queries

def hit_queries(n: int) -> list[tuple[str, str, str]]:
    """(name, type, expected answer) of the n names the hits run asks."""
    out = []
    for i in range(n):
        name = f"h{i}.{DOMAIN}"
        k = i % 20
        if k == 0:
            out.append((name, "TXT", f"afpa bench {i}"))
        elif k <= 3:
            out.append((name, "AAAA", AAAA_ADDR))
        else:
            out.append((name, "A", A_ADDR))
    return out


def miss_names(count: int, rng: random.Random) -> list[str]:
    """count distinct random names under DOMAIN (12 hex digits: never repeated in practice)."""
    seen: set[str] = set()
    while len(seen) < count:
        seen.add(f"m{rng.getrandbits(48):012x}.{DOMAIN}")
    return list(seen)


def encode_query(qid: int, name: str, qtype: str) -> bytes:
    """A query as dnsperf sends it: RD set, one question, no EDNS."""
    wire = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + wire + b"\0" + struct.pack("!HH", QTYPES[qtype], 1)


def _skip_name(msg: bytes, pos: int) -> int:
    while True:
        length = msg[pos]
        if length >= 0xC0:
            return pos + 2
        if length == 0:
            return pos + 1
        pos += 1 + length


def decode_answer(msg: bytes, qid: int, qtype: str) -> tuple[str, list[str]]:
    """(rcode name, [rdata of answers of qtype as text]) of a reply; ValueError if malformed."""
    try:
        rid, flags, qd, an = struct.unpack("!HHHH", msg[:8])
        if rid != qid or not flags & 0x8000:
            raise ValueError("not a reply to our query")
        pos = 12
        for _ in range(qd):
            pos = _skip_name(msg, pos) + 4
        found = []
        for _ in range(an):
            pos = _skip_name(msg, pos)
            rtype, _, _, rdlen = struct.unpack("!HHIH", msg[pos:pos + 10])
            rdata = msg[pos + 10:pos + 10 + rdlen]
            pos += 10 + rdlen
            if rtype != QTYPES[qtype]:
                continue
            if qtype == "A":
                found.append(str(ipaddress.IPv4Address(rdata)))
            elif qtype == "AAAA":
                found.append(str(ipaddress.IPv6Address(rdata)))
            else:
                texts, i = [], 0
                while i < len(rdata):
                    texts.append(rdata[i + 1:i + 1 + rdata[i]].decode(errors="replace"))
                    i += 1 + rdata[i]
                found.append("".join(texts))
        return RCODES.get(flags & 0xF, str(flags & 0xF)), found
    except (struct.error, IndexError, ipaddress.AddressValueError) as exc:
        raise ValueError(f"malformed reply: {exc}") from None


def ask(port: int, name: str, qtype: str, timeout: float = 1.0) -> tuple[str, list[str]] | None:
    """One UDP query to HOST:port (like `dig +short`); None when nothing came back in time."""
    qid = random.getrandbits(16)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(encode_query(qid, name, qtype), (HOST, port))
        deadline = time.monotonic() + timeout
        while True:
            try:
                data, _ = s.recvfrom(4096)
            except (socket.timeout, ConnectionRefusedError):
                return None
            try:
                return decode_answer(data, qid, qtype)
            except ValueError:
                if time.monotonic() > deadline:
                    return None


def wait_answering(proc: subprocess.Popen, port: int, name: str, qtype: str) -> bool:
    """True once HOST:port answers a query; False if the process exits or START_TIMEOUT passes."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ask(port, name, qtype, timeout=0.3) is not None:
            return True
    return False


def check_answers(port: int, queries: list[tuple[str, str, str]], miss: str) -> str | None:
    """Warm the cache with every hit query, then check each answer; None when all are right."""
    for name, qtype, _ in queries:
        ask(port, name, qtype, timeout=2.0)
    for name, qtype, want in queries + [(miss, "A", A_ADDR)]:
        got = ask(port, name, qtype, timeout=2.0)
        if got is None:
            return f"no answer to {name} {qtype}"
        if got != ("NOERROR", [want]):
            return f"{name} {qtype}: got {got[0]} {got[1]}, want NOERROR [{want!r}]"
    return None


# ---------------------------------------------------------------- servers

def upstream_cmd(tmp: Path, port: int, queries: list[tuple[str, str, str]]) -> list[str]:
    """The authoritative the forwarders ask: dnsmasq with local data only."""
    cmd = _dnsmasq_base(port) + [
        f"--local-ttl={UPSTREAM_TTL}", f"--address=/{DOMAIN}/{A_ADDR}", f"--address=/{DOMAIN}/{AAAA_ADDR}"]
    cmd += [f"--txt-record={name},{want}" for name, qtype, want in queries if qtype == "TXT"]
    return cmd


def _dnsmasq_base(port: int) -> list[str]:
    # No /etc/dnsmasq.conf, /etc/hosts, resolv.conf or pid file; stay in the
    # foreground as the current user, logging to our log file.
    return ["dnsmasq", "-k", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--bind-interfaces", f"--listen-address={HOST}", f"--port={port}", "--pid-file=",
            f"--user={pwd.getpwuid(os.getuid()).pw_name}", "--log-facility=-"]


def dnsmasq_cmd(tmp: Path, port: int, up: int) -> list[str]:
    return _dnsmasq_base(port) + [f"--server={HOST}#{up}", f"--cache-size={DNSMASQ_CACHE}"]


def unbound_cmd(tmp: Path, port: int, up: int) -> list[str]:
    conf = tmp / f"unbound-{port}.conf"
    conf.write_text(f"""\
server:
    interface: {HOST}@{port}
    port: {port}
    do-ip6: no
    num-threads: 1
    so-reuseport: no
    chroot: ""
    username: ""
    directory: "{tmp}"
    pidfile: ""
    do-daemonize: no
    use-syslog: no
    logfile: ""
    verbosity: 0
    # A plain caching forwarder, like the others: no DNSSEC validation.
    module-config: "iterator"
    do-not-query-localhost: no
    qname-minimisation: no
    prefetch: no
    msg-cache-size: 128m
    rrset-cache-size: 256m
    num-queries-per-thread: 4096
    # test. is one of unbound's built-in empty zones; let it through.
    local-zone: "test." nodefault
    access-control: 127.0.0.0/8 allow
remote-control:
    control-enable: no
forward-zone:
    name: "."
    forward-addr: {HOST}@{up}
""")
    return ["unbound", "-d", "-c", str(conf)]


def floor_cmd(tmp: Path, port: int, up: int) -> list[str]:
    return [sys.executable, str(HERE / "dns_floor.py"), "--listen", f"{HOST}:{port}",
            "--upstream", f"{HOST}:{up}"]


def free_udp_port() -> int:
    """A port free for both UDP and TCP (the servers bind both); the race until
    the server binds it is acceptable."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((HOST, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise OSError("no port free for both UDP and TCP")


def versions() -> str:
    out = []
    for cmd, pattern in ((["dnsmasq", "--version"], r"version (\S+)"), (["unbound", "-V"], r"Version (\S+)"),
                         (["dnsperf", "-h"], r"Version (\S+)")):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            m = re.search(pattern, p.stdout + p.stderr)
            out.append(f"{cmd[0]} {m.group(1) if m else '?'}")
        except OSError:
            out.append(f"{cmd[0]} missing")
    return ", ".join(out)


# ---------------------------------------------------------------- dnsperf

def parse_dnsperf(out: str) -> dict:
    """dnsperf's statistics as numbers; raises ValueError when it printed none."""
    def num(pattern: str) -> float:
        m = re.search(pattern, out)
        if not m:
            raise ValueError(f"no {pattern!r} in dnsperf output")
        return float(m.group(1))
    r = {"sent": int(num(r"Queries sent:\s+(\d+)")),
         "completed": int(num(r"Queries completed:\s+(\d+)")),
         "lost": int(num(r"Queries lost:\s+(\d+)")),
         "qps": num(r"Queries per second:\s+([\d.]+)"),
         "run_s": num(r"Run time \(s\):\s+([\d.]+)")}
    m = re.search(r"Response codes:\s*(.*)", out)
    r["rcodes"] = {code: int(n) for code, n in re.findall(r"([A-Z]+) (\d+) \(", m.group(1) if m else "")}
    r["ran_out"] = "end of file" in out   # -n 1 used up every name before the time limit
    return r


def run_dnsperf(port: int, qfile: Path, args: argparse.Namespace, once: bool, qps: int,
                load_cpu: int | None, leader: int) -> dict:
    """One dnsperf run against HOST:port with the server's CPU time around it."""
    cmd = tp.pin(load_cpu) + ["dnsperf", "-s", HOST, "-p", str(port), "-d", str(qfile),
                              "-l", str(args.duration), "-q", str(args.outstanding),
                              "-t", str(args.timeout)]
    if once:
        cmd += ["-n", "1"]
    if qps:
        cmd += ["-Q", str(qps)]
    before = tp.tree_cpu({"s": leader})["s"][0]
    p = subprocess.run(cmd, capture_output=True, text=True)
    after = tp.tree_cpu({"s": leader})["s"][0]
    r = parse_dnsperf(p.stdout + p.stderr)
    r["cpu_s"] = (after - before) / tp.CLK_TCK
    r["cpu_us_per_query"] = r["cpu_s"] * 1e6 / r["completed"] if r["completed"] else None
    r["lost_pct"] = 100.0 * r["lost"] / r["sent"] if r["sent"] else None
    return r


# ---------------------------------------------------------------- one server, one round

def bench_one(name: str, args: argparse.Namespace, tmp: Path, up: int, hits_file: Path,
              queries: list[tuple[str, str, str]], rng: random.Random, round_no: int) -> tuple[dict, str | None]:
    """Start `name` on CPU 0, check it, run hits then misses, stop it: (results, failure)."""
    port = free_udp_port()
    if name == "afpa":
        cmd = afpa_command(args.afpa_cmd, port, up)
    else:
        cmd = {"dnsmasq": dnsmasq_cmd, "unbound": unbound_cmd, "floor": floor_cmd}[name](tmp, port, up)
    cmd = tp.pin(args.server_cpu) + cmd
    log = tmp / f"{name}-{round_no}.log"
    print(f"== {name} (round {round_no}): {shlex.join(cmd)}", file=sys.stderr, flush=True)
    proc = None
    try:
        proc = tp.start(cmd, log)
        if not wait_answering(proc, port, queries[-1][0], queries[-1][1]):
            why = f"exited with status {proc.returncode}" if proc.poll() is not None else \
                f"no answer on udp {HOST}:{port} within {START_TIMEOUT:.0f} s"
            last = tp.tail(log, 1).strip()
            return {}, why + (f" ({last})" if last and last != "(no log)" else "")
        # A miss name used once here, then never again.
        problem = check_answers(port, queries, miss_names(1, rng)[0])
        if problem:
            return {}, f"wrong answers: {problem}"
        results = {}
        print(f"   hits: dnsperf {args.duration} s ...", file=sys.stderr, flush=True)
        results["hits"] = run_dnsperf(port, hits_file, args, False, 0, args.load_cpu, proc.pid)
        miss_file = tmp / f"misses-{name}-{round_no}.txt"
        rate = args.miss_qps or args.miss_rate_guess
        miss_file.write_text("".join(f"{n} A\n" for n in miss_names(int(rate * args.duration * 1.1) + 100, rng)))
        print(f"   misses: dnsperf {args.duration} s ...", file=sys.stderr, flush=True)
        results["misses"] = run_dnsperf(port, miss_file, args, True, args.miss_qps, args.load_cpu, proc.pid)
        miss_file.unlink()
        if proc.poll() is not None:
            return results, f"exited during the run (status {proc.returncode}): {tp.tail(log, 1).strip()}"
        return results, None
    except (OSError, ValueError) as exc:
        return {}, f"{type(exc).__name__}: {exc}"
    finally:
        tp.stop(proc)


# ---------------------------------------------------------------- report

def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def report(command: str, servers: list[str], runs: dict[str, dict[str, list[dict]]],
           notes: list[str], args: argparse.Namespace) -> None:
    print(f"`{command}`\n")
    print(f"{args.duration} s per dnsperf run, median of {args.repeat}; server on CPU {args.server_cpu}, "
          f"dnsperf and upstream on CPU {args.load_cpu}; {versions()}\n")
    if any(runs[name] for name in servers):
        print("| server | hits q/s | hits µs CPU/query | misses q/s | misses µs CPU/query | lost % (hits / misses) |")
        print("|---|--:|--:|--:|--:|--:|")
    else:
        print("(no server was measured)")
    odd = []
    for name in servers:
        h, m = runs[name].get("hits", []), runs[name].get("misses", [])
        if not h and not m:
            continue
        print(f"| {name} | {fmt(median(h, 'qps'), 0)} | {fmt(median(h, 'cpu_us_per_query'), 1)} | "
              f"{fmt(median(m, 'qps'), 0)} | {fmt(median(m, 'cpu_us_per_query'), 1)} | "
              f"{fmt(median(h, 'lost_pct'), 2)} / {fmt(median(m, 'lost_pct'), 2)} |")
        for case, rs in (("hits", h), ("misses", m)):
            other: dict[str, int] = {}
            for r in rs:
                for code, n in r["rcodes"].items():
                    if code != "NOERROR":
                        other[code] = other.get(code, 0) + n
            if other:
                odd.append(f"answers other than NOERROR: {name} {case}: "
                           + ", ".join(f"{c} {n}" for c, n in sorted(other.items())))
        if any(r.get("ran_out") for r in m):
            odd.append(f"{name} misses used up the names before {args.duration} s (q/s is still right)")
    print()
    if args.miss_qps:
        notes.append(f"misses limited to {args.miss_qps} q/s (dnsperf -Q)")
    for line in odd:
        print(f"- {line}")
    for line in notes:
        print(f"- {line}")


# ---------------------------------------------------------------- main

def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per dnsperf run (default 10)")
    p.add_argument("--repeat", type=int, default=1, metavar="K", help="rounds; figures are medians of K (default 1)")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"comma-separated, from {','.join(SERVERS)} (default: all)")
    p.add_argument("--names", type=int, default=100, help="names in the hits query file (default 100)")
    p.add_argument("--miss-qps", type=int, default=0,
                   help="dnsperf -Q for the misses run (default 0: unbounded)")
    p.add_argument("--outstanding", type=int, default=100, help="dnsperf -q (default 100)")
    p.add_argument("--timeout", type=int, default=2, help="dnsperf -t: seconds before a query counts as lost (default 2)")
    p.add_argument("--afpa-cmd", type=shlex.split, default=None,
                   help="command that runs afpa (default: `python -m afpa` of this checkout)")
    p.add_argument("--json", metavar="PATH", help="also write every run as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    command = "python " + shlex.join(sys.argv if argv is None else [sys.argv[0], *argv])
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in servers if s not in SERVERS]
    if bad or not servers:
        p.error(f"--servers: unknown {', '.join(bad) or '(none)'}; choose from {','.join(SERVERS)}")
    if args.duration <= 0 or args.repeat <= 0 or args.names <= 0 or args.outstanding <= 0 or args.miss_qps < 0:
        p.error("--duration, --repeat, --names, --outstanding must be positive, --miss-qps not negative")
    for tool in ("dnsperf", "dnsmasq") + (("unbound",) if "unbound" in servers else ()):
        if shutil.which(tool) is None:
            print(f"dns.py: {tool} not found (apt-get install -y {tool})", file=sys.stderr)
            return 2
    if args.afpa_cmd is None:
        args.afpa_cmd = [sys.executable, "-m", "afpa"]
        checkout = str(HERE.parent)
        os.environ["PYTHONPATH"] = checkout + (os.pathsep + os.environ["PYTHONPATH"]
                                               if os.environ.get("PYTHONPATH") else "")
    args.server_cpu, args.load_cpu = tp.choose_cpus()
    # How many miss names to write when the rate is unbounded: more than any
    # server here answers per second (dnsperf stops early, and says so, if they run out).
    args.miss_rate_guess = 60000

    notes: list[str] = []
    failures: dict[str, str] = {}
    if "afpa" in servers:
        missing = afpa_missing(args.afpa_cmd)
        if missing:
            notes.append(f"afpa: skipped ({missing})")
            servers.remove("afpa")
    runs: dict[str, dict[str, list[dict]]] = {s: {} for s in servers}
    tmp = Path(tempfile.mkdtemp(prefix="afpa-bench-dns-"))
    queries = hit_queries(args.names)
    hits_file = tmp / "hits.txt"
    hits_file.write_text("".join(f"{n} {t}\n" for n, t, _ in queries))
    rng = random.Random()
    upstream = None
    # Ctrl-C and SIGTERM both end in the finally below, which stops every server
    # (SIGINT is set explicitly: a shell starting us in the background ignores it).
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        up = free_udp_port()
        upstream = tp.start(tp.pin(args.load_cpu) + upstream_cmd(tmp, up, queries), tmp / "upstream.log")
        if not wait_answering(upstream, up, queries[0][0], queries[0][1]):
            print(f"dns.py: the upstream dnsmasq did not answer: {tp.tail(tmp / 'upstream.log', 1)}", file=sys.stderr)
            return 1
        problem = check_answers(up, queries, miss_names(1, rng)[0])
        if problem:
            print(f"dns.py: the upstream answers wrongly: {problem}", file=sys.stderr)
            return 1
        if servers:
            for round_no, name in tp.rounds(servers, args.repeat):
                if name in failures:
                    continue
                results, failure = bench_one(name, args, tmp, up, hits_file, queries, rng, round_no)
                for case, r in results.items():
                    runs[name].setdefault(case, []).append(r)
                if failure:
                    failures[name] = failure
                    print(f"   {name} FAILED: {failure}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("dns.py: interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        tp.stop(upstream)
        if args.keep:
            print(f"configs and logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    for name, failure in failures.items():
        notes.append(f"{name} FAILED: {failure}")
    report(command, servers, runs, notes, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "runs": runs, "notes": notes}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
