#!/usr/bin/env python3
"""Cache-hit throughput of afpa beside nginx serving the same files.

Run from the checkout (stdlib only, Python 3.11+; needs wrk, nginx optional):

    python bench/throughput.py --duration 10
    python bench/throughput.py --duration 5 --sizes 1k,1m --only afpa --json out.json

For every file size it runs wrk twice against each server: once with
keep-alive (wrk's default) and once with a new connection per request
(``Connection: close``), then prints req/s for both servers and the ratio
afpa/nginx.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"
NGINX = "/usr/sbin/nginx"
START_TIMEOUT = 20.0   # seconds a server gets to accept connections
STOP_TIMEOUT = 5.0     # seconds between SIGTERM and SIGKILL
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


def run_wrk(url: str, close: bool, args: argparse.Namespace, cpu: int | None) -> dict:
    cmd = pin(cpu) + ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    cmd.append(url)
    # wrk stops itself after --duration; the margin only guards against a hang.
    # subprocess.run kills wrk if we are interrupted.
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 30)
    r = parse_wrk(p.stdout)
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


def bench_server(name: str, args: argparse.Namespace, tmp: Path, root: Path, files: dict[str, int],
                 cpus: tuple[int | None, int | None]) -> tuple[dict, str | None]:
    """Start one server, warm up, run every wrk case, stop.  Returns (results, failure)."""
    port = free_port()
    log = tmp / f"{name}.log"
    cmd = pin(cpus[0]) + server_cmd(name, args, tmp, root, port)
    print(f"== {name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    results: dict = {}
    proc = None
    try:
        proc = start(cmd, log)
        if not wait_listening(proc, port):
            status = proc.poll()
            extra = tail(tmp / "nginx" / "error.log") if name == "nginx" else ""
            why = (f"exited with status {status} before listening" if status is not None
                   else f"not listening within {START_TIMEOUT:.0f}s")
            return results, (f"{name} on {HOST}:{port}: {why}\n--- output ---\n{tail(log)}\n{extra}").rstrip()
        problems = warm_up(port, files)
        if problems:
            return results, f"{name} warm-up failed:\n  " + "\n  ".join(problems)
        for fname in files:
            for mode in ("keep-alive", "close"):
                url = f"http://{HOST}:{port}/{fname}"
                print(f"   wrk {fname} {mode} ...", file=sys.stderr, flush=True)
                r = run_wrk(url, mode == "close", args, cpus[1])
                results[(fname, mode)] = r
                if proc.poll() is not None:
                    return results, f"{name} exited during the run (status {proc.returncode})\n{tail(log)}"
        return results, None
    finally:
        stop(proc)


# ---------------------------------------------------------------- report

def fmt_rate(r: dict | None) -> str:
    return f"{r['req_per_s']:,.0f}" if r else "-"


def fmt_mib(r: dict | None) -> str:
    return f"{r['bytes_per_s'] / (1 << 20):,.1f}" if r else "-"


def fmt_err(name: str, r: dict | None) -> str:
    if not r:
        return ""
    if "wrk_failed" in r:
        return f"{name}: wrk failed"
    if not r["errors"]:
        return ""
    parts = [f"non2xx={r['non_2xx_3xx']}"] if r["non_2xx_3xx"] else []
    parts += [f"{k}={v}" for k, v in r["socket_errors"].items() if v]
    return f"{name}: " + ",".join(parts)


def print_table(labels: list[str], all_results: dict[str, dict]) -> None:
    a, n = all_results.get("afpa", {}), all_results.get("nginx", {})
    head = ("size", "mode", "afpa req/s", "nginx req/s", "afpa/nginx", "afpa MiB/s", "nginx MiB/s", "errors")
    rows = []
    for label in labels:
        for mode in ("keep-alive", "close"):
            ra, rn = a.get((f"{label}.bin", mode)), n.get((f"{label}.bin", mode))
            ratio = (f"{ra['req_per_s'] / rn['req_per_s']:.2f}"
                     if ra and rn and rn["req_per_s"] else "-")
            errs = "; ".join(e for e in (fmt_err("afpa", ra), fmt_err("nginx", rn)) if e)
            rows.append((label, mode, fmt_rate(ra), fmt_rate(rn), ratio, fmt_mib(ra), fmt_mib(rn), errs))
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).rjust(w) if 2 <= i <= 6 else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


# ---------------------------------------------------------------- main

def print_problems(all_results: dict[str, dict], failures: dict[str, str]) -> None:
    """wrk runs that failed and servers that failed, after the table."""
    for name, results in all_results.items():
        for (label, mode), r in results.items():
            if "wrk_failed" in r:
                print(f"\n{name} {label} {mode}: wrk output:\n{r['wrk_failed']}")
    for name, failure in failures.items():
        print(f"\n{name} FAILED: {failure}")


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
    args = p.parse_args(argv)
    if args.duration <= 0 or args.connections <= 0:
        p.error("--duration and --connections must be positive")
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

    all_results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    tmp = Path(tempfile.mkdtemp(prefix="afpa-bench-"))
    try:
        # nginx workers drop to an unprivileged user when run as root: they
        # must be able to traverse the temp dir and read the files.
        tmp.chmod(0o755)
        root, files = make_files(tmp, sizes)
        for name in servers:
            results, failure = bench_server(name, args, tmp, root, files, cpus)
            all_results[name] = results
            if failure:
                failures[name] = failure
                print(f"\n!! {failure}\n", file=sys.stderr, flush=True)
            time.sleep(1)  # let the previous server's sockets drain before the next one
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"wrk -t1 -c{args.connections} -d{args.duration}s; server on CPU {cpus[0]}, wrk on CPU {cpus[1]}; "
          f"req/s and MiB/s as reported by wrk")
    print_table(labels, all_results)
    print_problems(all_results, failures)

    if args.json:
        doc = {
            "duration_s": args.duration, "connections": args.connections, "threads": 1,
            "server_cpu": cpus[0], "wrk_cpu": cpus[1], "afpa_cmd": args.afpa_cmd,
            "failures": failures,
            "results": [{"server": name, "file": fname, "size": files[fname], "mode": mode, **r}
                        for name, results in all_results.items()
                        for (fname, mode), r in results.items()],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
