#!/usr/bin/env python3
"""afpa as a caching reverse proxy beside nginx proxy_cache and Varnish.

Run from the checkout (stdlib only, Python 3.11+; needs wrk and nginx, Varnish
optional):

    python bench/proxy.py --duration 10
    python bench/proxy.py --duration 5 --sizes 1k,1m --only afpa,varnish --json out.json

All three proxies sit in front of the same origin, an nginx serving a temp dir
of random files:

  * ``/NAME``        with ``Cache-Control: max-age=3600`` (cacheable), and
  * ``/pass/NAME``   the same files with ``Cache-Control: no-store``.

For every file size it runs wrk against each proxy on the cacheable URL (every
measured request is a cache hit) with keep-alive and with a new connection per
request (``Connection: close``), plus one keep-alive run on the ``/pass/`` URL
of the smallest size (every request goes to the origin), then prints a
markdown table: req/s and CPU time per request of each proxy, the req/s ratios
afpa/nginx and afpa/varnish, and "afpa efficiency vs nginx/varnish" = peer
CPU/req / afpa CPU/req (higher is better for afpa); for the pass-through row
also the origin's CPU per request.  ``--repeat N`` runs every (proxy, case) N
times and reports medians.

CPU per request is measured as in throughput.py: utime+stime from
/proc/PID/stat of the proxy's whole process tree (its session / process
group: nginx master and worker, varnishd manager and child, afpa's python),
after minus before each wrk run, divided by the requests wrk completed.  The
origin runs in a session of its own, so it is never counted in a proxy's
figure; it is measured the same way, separately.

Setup, and why:
  * The proxy is pinned to CPU 0 and wrk to CPU 1 (taskset).  The origin is
    left unpinned: it is idle during the cache-hit runs, and during the
    pass-through run pinning it to either CPU would steal from the proxy or
    from wrk; unpinned, the scheduler puts it where there is room.  So the
    pass-through figures measure proxy + origin together on a 2-CPU box.
  * Only one proxy runs at a time (start, warm up, measure, stop); the origin
    runs throughout.
  * Warm-up GETs each URL a few times and checks the last answer is a 200 of
    the right length and a cache hit (afpa: ``Cache-Status: afpa; hit``;
    nginx: ``X-Cache-Status: HIT``; Varnish: two ids in ``X-Varnish``), or,
    for ``/pass/``, not a hit.
  * nginx (origin and proxy) runs with ``-p TMP -c CONF -e LOG`` and every
    path in the temp dir; Varnish gets ``-n TMP/varnish``: nothing in /etc or
    /var is touched, also as root.
  * Everything listens on 127.0.0.1 on ports picked by binding port 0.

Exit status: 0 ok, 1 a server failed to start or serve, 2 wrk or nginx is missing.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The helpers live beside this file; running ``python bench/proxy.py`` puts
# bench/ on sys.path, this also covers ``python -m`` and imports from elsewhere.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (  # noqa: E402
    CLK_TCK, HOST, NGINX, bench_one, choose_cpus, comparisons, cpu_note, efficiency, fmt_cpu, fmt_err, fmt_rate,
    free_port, make_files, medians, parse_size, pin, print_markdown, print_problems, rate_ratio, rounds, start,
    stop_all, tail, wait_listening,
)

PROXIES = ("afpa", "nginx", "varnish")
VARNISHD = "varnishd"
MODES = ("keep-alive", "close")


# ---------------------------------------------------------------- configs

def _nginx_common(t: Path) -> str:
    return f"""\
worker_processes 1;
daemon off;
pid {t}/nginx.pid;
error_log {t}/error.log warn;
events {{ worker_connections 4096; }}
"""


def _nginx_http_common(t: Path) -> str:
    return f"""\
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {t}/client_body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
"""


def origin_conf(tmp: Path, root: Path, port: int) -> tuple[Path, Path]:
    """(config, error log) of the origin nginx."""
    t = tmp / "origin"
    t.mkdir(exist_ok=True)
    conf = t / "nginx.conf"
    conf.write_text(_nginx_common(t) + f"""\
http {{
{_nginx_http_common(t)}\
    open_file_cache max=1000 inactive=60s;
    server {{
        listen {HOST}:{port};
        root {root};
        location / {{
            add_header Cache-Control "max-age=3600";
        }}
        location /pass/ {{
            alias {root}/;
            add_header Cache-Control "no-store";
        }}
    }}
}}
""")
    return conf, t / "error.log"


def start_origin(tmp: Path, root: Path) -> tuple[subprocess.Popen, int, Path]:
    """Start the origin nginx, unpinned, in a session of its own (so its CPU is
    never counted in a proxy's); returns (process, port, error log).  The
    caller waits for it to listen and stops it with stop_all()."""
    port = free_port()
    conf, err = origin_conf(tmp, root, port)
    cmd = [NGINX, "-p", str(conf.parent), "-c", str(conf), "-e", str(err)]
    print(f"== origin (unpinned): {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return start(cmd, tmp / "origin.log"), port, err


def nginx_proxy_conf(tmp: Path, port: int, origin_port: int) -> tuple[Path, Path]:
    """(config, error log) of nginx as a caching proxy in front of the origin."""
    t = tmp / "nginx-proxy"
    t.mkdir(exist_ok=True)
    conf = t / "nginx.conf"
    # No proxy_cache_valid: how long a response is kept comes from its
    # Cache-Control (max-age=3600 is cached, no-store is not), as for afpa.
    conf.write_text(_nginx_common(t) + f"""\
http {{
{_nginx_http_common(t)}\
    proxy_cache_path {t}/cache levels=1:2 keys_zone=bench:10m max_size=1g inactive=60m use_temp_path=off;
    upstream origin {{
        server {HOST}:{origin_port};
        keepalive 32;
    }}
    server {{
        listen {HOST}:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
}}
""")
    return conf, t / "error.log"


def varnish_jail() -> list[str]:
    # As root varnishd's default jail (-j unix) drops privileges to the users
    # "varnish" and "vcache" that the Debian package creates; without them,
    # run unjailed.
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("varnish")
        pwd.getpwnam("vcache")
        return []
    except KeyError:
        return ["-j", "none"]


def proxy_cmd(name: str, args: argparse.Namespace, tmp: Path, port: int,
              origin_port: int) -> tuple[list[str], Path | None]:
    """(command, extra log to show on failure) of one proxy."""
    if name == "afpa":
        return (args.afpa_cmd + ["serve", "--backend", f"http://{HOST}:{origin_port}",
                                 "--listen", f"{HOST}:{port}", "--quiet"], None)
    if name == "nginx":
        conf, err = nginx_proxy_conf(tmp, port, origin_port)
        return [NGINX, "-p", str(conf.parent), "-c", str(conf), "-e", str(err)], err
    # varnish: -F foreground, default VCL (-b) caches max-age responses and
    # passes no-store ones (hit-for-miss); -T none: no management port.
    return ([args.varnishd, "-F", "-a", f"{HOST}:{port}", "-b", f"{HOST}:{origin_port}",
             "-n", str(tmp / "varnish"), "-s", "malloc,256m", "-T", "none"] + varnish_jail(), None)


# ---------------------------------------------------------------- warm-up

def is_hit(name: str, headers: http.client.HTTPMessage) -> bool:
    if name == "afpa":
        return (headers.get("Cache-Status") or "").strip().lower() == "afpa; hit"
    if name == "nginx":
        return headers.get("X-Cache-Status") == "HIT"
    return len((headers.get("X-Varnish") or "").split()) == 2


def cache_info(name: str, headers: http.client.HTTPMessage) -> str:
    key = {"afpa": "Cache-Status", "nginx": "X-Cache-Status", "varnish": "X-Varnish"}[name]
    extra = f", Age: {headers.get('Age')}" if name == "varnish" else ""
    return f"{key}: {headers.get(key)!r}{extra}"


def warm_up(name: str, port: int, urls: dict[str, tuple[int, bool]], rounds: int = 3) -> list[str]:
    """GET each path a few times; the last answer must be 200, full, and a hit
    exactly when the path is cacheable.  Returns the problems found."""
    problems = []
    for path, (size, cacheable) in urls.items():
        for i in range(rounds):
            conn = http.client.HTTPConnection(HOST, port, timeout=10)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read()
            except OSError as exc:
                problems.append(f"GET {path}: {exc!r}")
                break
            finally:
                conn.close()
            if resp.status != 200 or len(body) != size:
                problems.append(f"GET {path}: status {resp.status}, {len(body)} bytes (want 200, {size})")
                break
            if i == rounds - 1 and is_hit(name, resp.headers) != cacheable:
                want = "a cache hit" if cacheable else "not a cache hit"
                problems.append(f"GET {path} #{i + 1}: want {want}; {cache_info(name, resp.headers)}")
    return problems


# ---------------------------------------------------------------- bench

def cases(files: dict[str, int]) -> list[tuple[str, str, str]]:
    """(case label, mode, URL path) in the order they run and print."""
    out = [(f"hit {f.removesuffix('.bin')}", mode, "/" + f) for f in files for mode in MODES]
    smallest = min(files, key=files.get)
    out.append((f"pass {smallest.removesuffix('.bin')}", "keep-alive", "/pass/" + smallest))
    return out


def bench_proxy(name: str, args: argparse.Namespace, tmp: Path, origin: subprocess.Popen, origin_port: int,
                files: dict[str, int], cpus: tuple[int | None, int | None]) -> tuple[dict, str | None]:
    """Start one proxy, warm up, run every wrk case, stop.  Returns (results, failure).

    Each run measures the CPU of the proxy's process tree (cpu_*) and, apart,
    of the origin's (origin_cpu_*)."""
    port = free_port()
    cmd, extra_log = proxy_cmd(name, args, tmp, port, origin_port)
    urls = {path: (files[path.rsplit("/", 1)[1]], not path.startswith("/pass/")) for _, _, path in cases(files)}
    runs = [((label, mode), path, mode == "close") for label, mode, path in cases(files)]
    return bench_one(name, pin(cpus[0]) + cmd, port, tmp / f"{name}.log", lambda port: warm_up(name, port, urls),
                     runs, args, cpus[1], also_cpu={"origin_": origin.pid}, extra_log=extra_log)


# ---------------------------------------------------------------- report

def print_table(files: dict[str, int], all_results: dict[str, dict]) -> None:
    a, n, v = (all_results.get(name, {}) for name in PROXIES)
    head = ("case", "mode", "afpa req/s", "afpa µs CPU/req", "nginx req/s", "nginx µs CPU/req",
            "varnish req/s", "varnish µs CPU/req", "afpa/nginx req/s", "afpa/varnish req/s",
            "afpa efficiency vs nginx", "afpa efficiency vs varnish",
            "origin µs CPU/req behind afpa / nginx / varnish", "errors")
    rows = []
    for label, mode, _ in cases(files):
        ra, rn, rv = a.get((label, mode)), n.get((label, mode)), v.get((label, mode))
        errs = "; ".join(e for e in (fmt_err("afpa", ra), fmt_err("nginx", rn), fmt_err("varnish", rv)) if e)
        # The origin is idle during cache hits; its figure matters for pass-through only.
        origin = (" / ".join(fmt_cpu(r, "origin_cpu_us_per_req") for r in (ra, rn, rv))
                  if label.startswith("pass") else "")
        rows.append((label, mode, fmt_rate(ra), fmt_cpu(ra), fmt_rate(rn), fmt_cpu(rn), fmt_rate(rv), fmt_cpu(rv),
                     rate_ratio(ra, rn), rate_ratio(ra, rv), efficiency(ra, rn), efficiency(ra, rv), origin, errs))
    print_markdown(head, rows, text_cols={0, 1, len(head) - 1})


# ---------------------------------------------------------------- main

def find_varnishd(auto_install: bool) -> str | None:
    exe = shutil.which(VARNISHD) or shutil.which(VARNISHD, path="/usr/sbin:/usr/local/sbin")
    if exe or not auto_install:
        return exe
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    print("varnishd not found; trying once: apt-get install -y varnish", file=sys.stderr, flush=True)
    try:
        p = subprocess.run(["apt-get", "install", "-y", "varnish"], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"apt-get failed: {exc!r}", file=sys.stderr)
        return None
    if p.returncode != 0:
        print("apt-get install varnish failed:\n" + "\n".join((p.stdout + p.stderr).splitlines()[-10:]),
              file=sys.stderr)
    return shutil.which(VARNISHD) or shutil.which(VARNISHD, path="/usr/sbin:/usr/local/sbin")


def parse_only(text: str) -> list[str]:
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in PROXIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(PROXIES)}: {text!r}")
    return [s for s in PROXIES if s in names]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--sizes", default="1k,128k,1m",
                   help="comma-separated file sizes (default 1k,128k,1m); the smallest one is also "
                        "used for the pass-through run")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--afpa-cmd", type=shlex.split, default=None,
                   help="command that runs afpa (default: `afpa` on PATH, else `python -m afpa`)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--only", type=parse_only, default=list(PROXIES), metavar="NAMES",
                   help="benchmark only these proxies, comma-separated from afpa,nginx,varnish")
    p.add_argument("--no-install", action="store_true",
                   help="do not try `apt-get install -y varnish` when varnishd is missing")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run each (proxy, case) N times and report the medians (default 1)")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.connections <= 0 or args.repeat <= 0:
        p.error("--duration, --connections and --repeat must be positive")
    if args.afpa_cmd is None:
        exe = shutil.which("afpa")
        args.afpa_cmd = [exe] if exe else [sys.executable, "-m", "afpa"]
    labels = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    if not labels:
        p.error("--sizes is empty")
    sizes = {label: parse_size(label) for label in labels}

    if shutil.which("wrk") is None:
        print("wrk not found; install it with: apt-get install -y wrk", file=sys.stderr)
        return 2
    if not os.access(NGINX, os.X_OK):
        print(f"nginx not found at {NGINX} (it is the origin); install it with: apt-get install -y nginx",
              file=sys.stderr)
        return 2
    proxies = list(args.only)
    skipped: dict[str, str] = {}
    args.varnishd = None
    if "varnish" in proxies:
        args.varnishd = find_varnishd(auto_install=not args.no_install)
        if args.varnishd is None:
            skipped["varnish"] = "varnishd not found (apt-get install -y varnish)"
            print(f"skipping Varnish: {skipped['varnish']}", file=sys.stderr, flush=True)
            proxies.remove("varnish")
            if not proxies:
                return 1
    cpus = choose_cpus()

    all_runs: dict[str, dict[tuple, list[dict]]] = {name: {} for name in proxies}
    failures: dict[str, str] = {}
    origin = None
    tmp = Path(tempfile.mkdtemp(prefix="afpa-bench-proxy-"))
    try:
        # nginx workers and the Varnish child drop to unprivileged users when
        # run as root: they must be able to traverse the temp dir.
        tmp.chmod(0o755)
        root, files = make_files(tmp, sizes)

        origin, origin_port, err = start_origin(tmp, root)
        if not wait_listening(origin, origin_port):
            print(f"origin nginx failed to start:\n{tail(tmp / 'origin.log')}\n{tail(err)}", file=sys.stderr)
            return 1

        for i, name in rounds(proxies, args.repeat):
            if name in failures:
                continue
            if args.repeat > 1:
                print(f"-- round {i}/{args.repeat}", file=sys.stderr, flush=True)
            results, failure = bench_proxy(name, args, tmp, origin, origin_port, files, cpus)
            for case, r in results.items():
                all_runs[name].setdefault(case, []).append(r)
            if failure:
                failures[name] = failure
                print(f"\n!! {failure}\n", file=sys.stderr, flush=True)
            time.sleep(1)  # let the previous proxy's sockets drain before the next one
            if origin.poll() is not None:
                failures["origin"] = f"origin nginx exited (status {origin.returncode})\n{tail(err)}"
                break
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        stop_all(origin)
        shutil.rmtree(tmp, ignore_errors=True)

    all_results = medians(all_runs)
    print()
    print(f"wrk -t1 -c{args.connections} -d{args.duration}s; proxy on CPU {cpus[0]}, wrk on CPU {cpus[1]}, "
          f"origin (nginx, 1 worker) unpinned; req/s as reported by wrk"
          + (f"; medians of {args.repeat} runs" if args.repeat > 1 else ""))
    print("hit = cacheable URL (max-age=3600), every measured request a cache hit; "
          "pass = no-store URL, every request forwarded to the origin")
    print(cpu_note().replace("server's", "proxy's") + "; the origin's CPU is not in the proxy's figure")
    print()
    print_table(files, all_results)
    for name, reason in skipped.items():
        print(f"\n{name} skipped: {reason}")
    print_problems(all_results, failures)

    if args.json:
        doc = {
            "duration_s": args.duration, "connections": args.connections, "threads": 1,
            "repeat": args.repeat, "clk_tck": CLK_TCK,
            "proxy_cpu": cpus[0], "wrk_cpu": cpus[1], "origin_cpu": None, "afpa_cmd": args.afpa_cmd,
            "varnishd": args.varnishd, "skipped": skipped, "failures": failures,
            "results": [{"proxy": name, "case": label, "mode": mode, **r}
                        for name, results in all_results.items()
                        for (label, mode), r in results.items()],
            "comparisons": [c for peer in ("nginx", "varnish")
                            for c in comparisons(all_results, peer, [(label, mode) for label, mode, _ in cases(files)])],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
