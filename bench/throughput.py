#!/usr/bin/env python3
"""Cache-hit throughput of afpa beside nginx serving the same files.

Run from the checkout (stdlib only, Python 3.11+; needs wrk, nginx optional):

    python bench/throughput.py --duration 10
    python bench/throughput.py --duration 5 --sizes 1k,1m --only afpa --json out.json

For every file size it runs wrk twice against each server: once with
keep-alive (wrk's default) and once with a new connection per request
(``Connection: close``), then prints a markdown table: req/s and server CPU
time per request for both servers, the ratio afpa/nginx of req/s, and "afpa
efficiency vs nginx" = nginx CPU/req / afpa CPU/req (higher is better for
afpa).  ``--repeat N`` runs every (server, case) N times and reports medians.

Server CPU per request: before and after each wrk run the script sums
utime+stime (plus cutime+cstime, i.e. reaped children) from /proc/PID/stat of
every process whose session id or process group is the server's (it is
started in its own session), and of their descendants, and divides the
difference by the number of requests wrk completed.  On a shared host req/s
swings with whatever else runs; CPU time per request moves much less.

Setup, and why:
  * The server is pinned to CPU 0 and wrk to CPU 1 (taskset), so the load
    generator never steals cycles from the server being measured.
  * Only one server runs at a time (start, warm up, measure, stop), so the
    two never compete for the core.
  * A few warm-up requests per file make every measured request a cache hit
    (afpa's first request for a file is a miss).
  * nginx runs with ``-p TMP -c TMP/nginx.conf -e TMP/...`` and every path in
    the temp dir, so it works as root without touching /etc or /var.
  * Everything listens on 127.0.0.1 on ports picked by binding port 0.

Exit status: 0 ok, 1 a server failed to start or serve, 2 wrk is missing.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"
NGINX = "/usr/sbin/nginx"
START_TIMEOUT = 20.0   # seconds a server gets to accept connections
STOP_TIMEOUT = 5.0     # seconds between SIGTERM and SIGKILL
CLK_TCK = os.sysconf("SC_CLK_TCK")   # units of the CPU times in /proc/PID/stat
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


# ---------------------------------------------------------------- helpers

def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)i?b?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1k, 128k, 1m)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def free_port() -> int:
    # Binding port 0 lets the kernel pick an unused ephemeral port; the tiny
    # race between close() and the server's bind() is acceptable here.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pin(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def choose_cpus() -> tuple[int | None, int | None]:
    """(server cpu, wrk cpu), or (None, None) when pinning is impossible."""
    cpus = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") is None:
        print("warning: taskset not found; server and wrk are NOT pinned", file=sys.stderr)
        return None, None
    if len(cpus) < 2:
        print("warning: fewer than 2 CPUs available; server and wrk share a CPU "
              "and figures will be low", file=sys.stderr)
        return None, None
    return cpus[0], cpus[1]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    # Own session: Ctrl-C in the terminal does not race our orderly stop, and
    # killpg() also reaches children (nginx workers, pyenv shim -> python).
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_all(proc: subprocess.Popen | None) -> None:
    """stop() the process, then SIGKILL whatever is left of its process group.

    Each server was started in its own session (start()), so its group holds
    exactly its own children: nginx workers, the Varnish child, shims.
    """
    if proc is None:
        return
    stop(proc)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = START_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def warm_up(port: int, files: dict[str, int], rounds: int = 3) -> list[str]:
    """GET each file a few times (first one fills afpa's cache); return problems."""
    problems = []
    for name, size in files.items():
        for _ in range(rounds):
            conn = http.client.HTTPConnection(HOST, port, timeout=10)
            try:
                conn.request("GET", "/" + name)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200 or len(body) != size:
                    problems.append(f"GET /{name}: status {resp.status}, {len(body)} bytes (want 200, {size})")
                    break
            except OSError as exc:
                problems.append(f"GET /{name}: {exc!r}")
                break
            finally:
                conn.close()
    return problems


# ---------------------------------------------------------------- CPU time

def _read_procs() -> dict[int, tuple[int, int, int, int]]:
    """{pid: (ppid, pgrp, session, CPU clock ticks)} of every process in /proc.

    CPU ticks = utime + stime + cutime + cstime (fields 14-17 of proc(5)).
    The stat file of a process covers all its threads.  cutime/cstime hold the
    CPU of children it has reaped, so a child that exits during a run is still
    counted (its own entry disappears, its parent's cutime grows by as much).
    """
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:  # exited meanwhile
            continue
        # Field 2 (comm) may hold spaces and parentheses: split after the last ')'.
        # fields[i] is field i + 3: 4 ppid, 5 pgrp, 6 session, 14-17 CPU times.
        fields = data[data.rindex(b")") + 2:].split()
        procs[int(name)] = (int(fields[1]), int(fields[2]), int(fields[3]),
                            int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14]))
    return procs


def tree_cpu(leaders: dict[str, int]) -> dict[str, tuple[int, int]]:
    """{key: (CPU clock ticks, process count)} for each server given by the
    pid of the process start() created.

    A server's processes are those whose session id or process group is that
    pid (start() makes it a session leader), plus their descendants (in case
    one of them calls setsid()).  Servers started separately, like the proxy
    benchmark's origin, are in their own sessions and are not counted.
    """
    procs = _read_procs()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    for key, leader in leaders.items():
        members = {pid for pid, (_, pgrp, sid, _) in procs.items()
                   if pid == leader or pgrp == leader or sid == leader}
        todo = list(members)
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in members:
                    members.add(child)
                    todo.append(child)
        out[key] = (sum(procs[pid][3] for pid in members), len(members))
    return out


# ---------------------------------------------------------------- wrk

_BYTES = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def _num(pattern: str, text: str, default: float = 0.0) -> float:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else default


def _latency_ms(text: str, pct: str) -> float | None:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    if not m:
        return None
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]


def parse_wrk(out: str) -> dict:
    m = re.search(r"Transfer/sec:\s*([\d.]+)\s*([KMGT]?B)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests": int(_num(r"(\d+) requests in", out)),
        "req_per_s": _num(r"Requests/sec:\s*([\d.]+)", out),
        "bytes_per_s": float(m.group(1)) * _BYTES[m.group(2)] if m else 0.0,
        "p50_ms": _latency_ms(out, "50"),
        "p99_ms": _latency_ms(out, "99"),
        "non_2xx_3xx": int(_num(r"Non-2xx or 3xx responses:\s*(\d+)", out)),
        "socket_errors": dict(zip(("connect", "read", "write", "timeout"),
                                  map(int, sock.groups()))) if sock else {},
    }


def run_wrk(url: str, close: bool, args: argparse.Namespace, cpu: int | None,
            cpu_of: dict[str, int] | None = None) -> dict:
    """One wrk run.  cpu_of maps a key prefix to a server's leader pid: for
    each, the result gets PREFIXcpu_s (CPU seconds its process tree used during
    the run), PREFIXcpu_us_per_req (that / requests completed, in µs) and
    PREFIXcpu_procs (how many processes were counted)."""
    cmd = pin(cpu) + ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    cmd.append(url)
    cpu_of = cpu_of or {}
    before = tree_cpu(cpu_of)
    # wrk stops itself after --duration; the margin only guards against a hang.
    # subprocess.run kills wrk if we are interrupted.
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 30)
    after = tree_cpu(cpu_of)
    r = parse_wrk(p.stdout)
    for key in cpu_of:
        seconds = (after[key][0] - before[key][0]) / CLK_TCK
        r[f"{key}cpu_s"] = seconds
        r[f"{key}cpu_us_per_req"] = seconds / r["requests"] * 1e6 if r["requests"] else None
        r[f"{key}cpu_procs"] = after[key][1]
    r["errors"] = r["non_2xx_3xx"] + sum(r["socket_errors"].values())
    if p.returncode != 0 or "Requests/sec" not in p.stdout:
        r["wrk_failed"] = (p.stdout + p.stderr).strip()
    return r


# ---------------------------------------------------------------- servers

def nginx_conf(tmp: Path, root: Path, port: int) -> Path:
    # Every path lives in tmp so nginx runs as root without touching /etc or /var.
    t = tmp / "nginx"
    conf = tmp / "nginx.conf"
    conf.write_text(f"""\
worker_processes 1;
daemon off;
pid {t}/nginx.pid;
error_log {t}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    open_file_cache max=1000 inactive=60s;
    keepalive_requests 100000;
    client_body_temp_path {t}/client_body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    server {{
        listen {HOST}:{port};
        root {root};
    }}
}}
""")
    t.mkdir(exist_ok=True)
    return conf


def server_cmd(name: str, args: argparse.Namespace, tmp: Path, root: Path, port: int) -> list[str]:
    if name == "afpa":
        return args.afpa_cmd + ["serve", "--root", str(root), "--listen", f"{HOST}:{port}", "--quiet"]
    conf = nginx_conf(tmp, root, port)
    # -e: the startup error log, before the config is read (default is in /var/log).
    return [NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx" / "error.log")]


def bench_one(name: str, cmd: list[str], port: int, log: Path, warm, runs: list[tuple[tuple, str, bool]],
              args: argparse.Namespace, wrk_cpu: int | None, also_cpu: dict[str, int] | None = None,
              extra_log: Path | None = None) -> tuple[dict, str | None]:
    """Start one server, warm up, run wrk for each case, stop.  Returns
    ({case key: wrk result}, failure or None).

    cmd is the full command (pinned already) and must listen on port;
    warm(port) does the warm-up and returns a list of problems; runs holds
    (case key, URL path, Connection: close?) in run order.  Every result has
    the CPU of the server's process tree (cpu_*) and, for each PREFIX: pid of
    also_cpu, that process tree's (PREFIXcpu_*), e.g. a proxy's origin.  The
    server is stopped on every way out, Ctrl-C included.
    """
    print(f"== {name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    results: dict = {}
    proc = None
    try:
        proc = start(cmd, log)
        if not wait_listening(proc, port):
            status = proc.poll()
            why = (f"exited with status {status} before listening" if status is not None
                   else f"not listening within {START_TIMEOUT:.0f}s")
            extra = tail(extra_log) if extra_log else ""
            return results, f"{name} on {HOST}:{port}: {why}\n--- output ---\n{tail(log)}\n{extra}".rstrip()
        problems = warm(port)
        if problems:
            return results, f"{name} warm-up failed:\n  " + "\n  ".join(problems)
        for key, path, close in runs:
            print(f"   wrk {' '.join(key)} ...", file=sys.stderr, flush=True)
            results[key] = run_wrk(f"http://{HOST}:{port}{path}", close, args, wrk_cpu,
                                   cpu_of={"": proc.pid, **(also_cpu or {})})
            if proc.poll() is not None:
                return results, f"{name} exited during the run (status {proc.returncode})\n{tail(log)}"
        return results, None
    finally:
        stop_all(proc)


def bench_server(name: str, args: argparse.Namespace, tmp: Path, root: Path, files: dict[str, int],
                 cpus: tuple[int | None, int | None]) -> tuple[dict, str | None]:
    """Start one server, warm up, run every wrk case, stop.  Returns (results, failure)."""
    port = free_port()
    cmd = pin(cpus[0]) + server_cmd(name, args, tmp, root, port)
    runs = [((fname, mode), "/" + fname, mode == "close") for fname in files for mode in ("keep-alive", "close")]
    return bench_one(name, cmd, port, tmp / f"{name}.log", lambda port: warm_up(port, files), runs, args,
                     cpus[1], extra_log=tmp / "nginx" / "error.log" if name == "nginx" else None)


# ---------------------------------------------------------------- report

# Figures that --repeat reduces to their median (each on its own).
MEDIAN_KEYS = ("requests", "req_per_s", "bytes_per_s", "p50_ms", "p99_ms",
               "cpu_s", "cpu_us_per_req", "origin_cpu_s", "origin_cpu_us_per_req")


def median_result(runs: list[dict]) -> dict:
    """One record for the N runs of one (server, case): the median of each
    figure over the runs where wrk worked, error counts summed over all runs,
    and the runs themselves under "runs"."""
    ok = [r for r in runs if "wrk_failed" not in r]
    out: dict = {"repeat": len(runs), "runs_ok": len(ok)}
    for key in MEDIAN_KEYS:
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    for key in ("cpu_procs", "origin_cpu_procs"):
        values = [r[key] for r in runs if key in r]
        if values:
            out[key] = max(values)
    sock: dict[str, int] = {}
    for r in runs:
        for k, v in r.get("socket_errors", {}).items():
            sock[k] = sock.get(k, 0) + v
    out["non_2xx_3xx"] = sum(r.get("non_2xx_3xx", 0) for r in runs)
    out["socket_errors"] = sock
    out["errors"] = sum(r.get("errors", 0) for r in runs)
    if not ok:
        out["wrk_failed"] = runs[-1].get("wrk_failed", "")
    out["runs"] = runs
    return out


def medians(all_runs: dict[str, dict[tuple, list[dict]]]) -> dict[str, dict[tuple, dict]]:
    return {name: {case: median_result(runs) for case, runs in results.items()}
            for name, results in all_runs.items()}


def _has(r: dict | None, key: str) -> bool:
    return bool(r) and "wrk_failed" not in r and r.get(key) is not None


def fmt_rate(r: dict | None) -> str:
    return f"{r['req_per_s']:,.0f}" if _has(r, "req_per_s") else "-"


def fmt_mib(r: dict | None) -> str:
    return f"{r['bytes_per_s'] / (1 << 20):,.1f}" if _has(r, "bytes_per_s") else "-"


def fmt_cpu(r: dict | None, key: str = "cpu_us_per_req") -> str:
    return f"{r[key]:,.1f}" if _has(r, key) else "-"


def rate_ratio(a: dict | None, b: dict | None) -> str:
    """afpa req/s / peer req/s (higher is better for afpa)."""
    return (f"{a['req_per_s'] / b['req_per_s']:.2f}"
            if _has(a, "req_per_s") and _has(b, "req_per_s") and b["req_per_s"] else "-")


def efficiency(a: dict | None, b: dict | None) -> str:
    """peer CPU/req / afpa CPU/req (higher is better for afpa)."""
    key = "cpu_us_per_req"
    return f"{b[key] / a[key]:.2f}" if _has(a, key) and _has(b, key) and a[key] else "-"


def fmt_err(name: str, r: dict | None) -> str:
    if not r:
        return ""
    if "wrk_failed" in r:
        return f"{name}: wrk failed"
    failed = r.get("repeat", 1) - r.get("runs_ok", 1)
    parts = [f"wrk failed {failed}x"] if failed else []
    if r["non_2xx_3xx"]:
        parts.append(f"non2xx={r['non_2xx_3xx']}")
    parts += [f"{k}={v}" for k, v in r["socket_errors"].items() if v]
    return f"{name}: " + ",".join(parts) if parts else ""


def print_markdown(head: tuple[str, ...], rows: list[tuple], text_cols: set[int]) -> None:
    """A markdown table, padded so it also reads as plain text; columns not in
    text_cols are numbers and right-aligned."""
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    cell = lambda i, c: str(c).ljust(widths[i]) if i in text_cols else str(c).rjust(widths[i])
    print("| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(head)) + " |")
    print("|" + "|".join(("-" * (w + 2)) if i in text_cols else ("-" * (w + 1) + ":")
                         for i, w in enumerate(widths)) + "|")
    for r in rows:
        print("| " + " | ".join(cell(i, c) for i, c in enumerate(r)) + " |")


def comparisons(all_results: dict[str, dict], peer: str, cases: list[tuple]) -> list[dict]:
    """The table's ratio columns for the JSON output (unrounded)."""
    a, b = all_results.get("afpa", {}), all_results.get(peer, {})
    out = []
    for case in cases:
        ra, rb = a.get(case), b.get(case)
        if not (ra and rb):
            continue
        req = (ra["req_per_s"] / rb["req_per_s"]
               if _has(ra, "req_per_s") and _has(rb, "req_per_s") and rb["req_per_s"] else None)
        eff = (rb["cpu_us_per_req"] / ra["cpu_us_per_req"]
               if _has(ra, "cpu_us_per_req") and _has(rb, "cpu_us_per_req") and ra["cpu_us_per_req"] else None)
        out.append({"case": list(case), "peer": peer, "afpa_over_peer_req_per_s": req,
                    "afpa_efficiency_vs_peer": eff})
    return out


def print_table(labels: list[str], all_results: dict[str, dict]) -> None:
    a, n = all_results.get("afpa", {}), all_results.get("nginx", {})
    head = ("size", "mode", "afpa req/s", "afpa µs CPU/req", "nginx req/s", "nginx µs CPU/req",
            "afpa/nginx req/s", "afpa efficiency vs nginx", "afpa MiB/s", "nginx MiB/s", "errors")
    rows = []
    for label in labels:
        for mode in ("keep-alive", "close"):
            ra, rn = a.get((f"{label}.bin", mode)), n.get((f"{label}.bin", mode))
            errs = "; ".join(e for e in (fmt_err("afpa", ra), fmt_err("nginx", rn)) if e)
            rows.append((label, mode, fmt_rate(ra), fmt_cpu(ra), fmt_rate(rn), fmt_cpu(rn),
                         rate_ratio(ra, rn), efficiency(ra, rn), fmt_mib(ra), fmt_mib(rn), errs))
    print_markdown(head, rows, text_cols={0, 1, len(head) - 1})


# ---------------------------------------------------------------- main

def print_problems(all_results: dict[str, dict], failures: dict[str, str]) -> None:
    """wrk runs that failed and servers that failed, after the table."""
    for name, results in all_results.items():
        for (label, mode), r in results.items():
            runs = r.get("runs", [r])
            for i, run in enumerate(runs, 1):
                if "wrk_failed" in run:
                    which = f" (run {i}/{len(runs)})" if len(runs) > 1 else ""
                    print(f"\n{name} {label} {mode}{which}: wrk output:\n{run['wrk_failed']}")
    for name, failure in failures.items():
        print(f"\n{name} FAILED: {failure}")


def rounds(servers: list[str], repeat: int):
    """(round number, server) in run order: every round runs each server once,
    starting one later each round, so slow drifts in the host load fall on
    all servers alike."""
    for i in range(repeat):
        k = i % len(servers)
        for name in servers[k:] + servers[:k]:
            yield i + 1, name


def cpu_note() -> str:
    return ("µs CPU/req = (utime+stime of every process in the server's session/process group, "
            "from /proc/PID/stat, after - before the wrk run) / requests wrk completed; "
            "efficiency = peer CPU/req / afpa CPU/req (higher is better for afpa)")


def make_files(tmp: Path, sizes: dict[str, int]) -> tuple[Path, dict[str, int]]:
    """Write the benchmark's files into ``tmp/root`` (fixed seed: identical
    files on every run); returns the root and {file name: size}."""
    root = tmp / "root"
    root.mkdir(mode=0o755)
    rng = random.Random(1234)
    files = {}
    for label, size in sizes.items():
        (root / f"{label}.bin").write_bytes(rng.randbytes(size))
        files[f"{label}.bin"] = size
    return root, files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--sizes", default="1k,128k,1m", help="comma-separated file sizes (default 1k,128k,1m)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--afpa-cmd", type=shlex.split, default=None,
                   help="command that runs afpa (default: `afpa` on PATH, else `python -m afpa`)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--only", choices=("afpa", "nginx"), help="benchmark only this server")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run each (server, case) N times and report the medians (default 1)")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.connections <= 0 or args.repeat <= 0:
        p.error("--duration, --connections and --repeat must be positive")
    if args.afpa_cmd is None:
        exe = shutil.which("afpa")
        args.afpa_cmd = [exe] if exe else [sys.executable, "-m", "afpa"]
    labels = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    sizes = {label: parse_size(label) for label in labels}

    if shutil.which("wrk") is None:
        print("wrk not found; install it with: apt-get install -y wrk", file=sys.stderr)
        return 2
    servers = ["afpa", "nginx"] if args.only is None else [args.only]
    if "nginx" in servers and not os.access(NGINX, os.X_OK):
        print(f"nginx not found at {NGINX}; skipping nginx, afpa figures only", file=sys.stderr)
        servers.remove("nginx")
        if not servers:
            return 1
    cpus = choose_cpus()

    all_runs: dict[str, dict[tuple, list[dict]]] = {name: {} for name in servers}
    failures: dict[str, str] = {}
    tmp = Path(tempfile.mkdtemp(prefix="afpa-bench-"))
    try:
        # nginx workers drop to an unprivileged user when run as root: they
        # must be able to traverse the temp dir and read the files.
        tmp.chmod(0o755)
        root, files = make_files(tmp, sizes)
        for i, name in rounds(servers, args.repeat):
            if name in failures:
                continue
            if args.repeat > 1:
                print(f"-- round {i}/{args.repeat}", file=sys.stderr, flush=True)
            results, failure = bench_server(name, args, tmp, root, files, cpus)
            for case, r in results.items():
                all_runs[name].setdefault(case, []).append(r)
            if failure:
                failures[name] = failure
                print(f"\n!! {failure}\n", file=sys.stderr, flush=True)
            time.sleep(1)  # let the previous server's sockets drain before the next one
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    all_results = medians(all_runs)
    print()
    print(f"wrk -t1 -c{args.connections} -d{args.duration}s; server on CPU {cpus[0]}, wrk on CPU {cpus[1]}; "
          f"req/s and MiB/s as reported by wrk" + (f"; medians of {args.repeat} runs" if args.repeat > 1 else ""))
    print(cpu_note())
    print()
    print_table(labels, all_results)
    print_problems(all_results, failures)

    if args.json:
        doc = {
            "duration_s": args.duration, "connections": args.connections, "threads": 1,
            "repeat": args.repeat, "clk_tck": CLK_TCK,
            "server_cpu": cpus[0], "wrk_cpu": cpus[1], "afpa_cmd": args.afpa_cmd,
            "failures": failures,
            "results": [{"server": name, "file": fname, "size": files[fname], "mode": mode, **r}
                        for name, results in all_results.items()
                        for (fname, mode), r in results.items()],
            "comparisons": comparisons(all_results, "nginx",
                                       [(f"{label}.bin", mode) for label in labels
                                        for mode in ("keep-alive", "close")]),
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
