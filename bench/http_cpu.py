#!/usr/bin/env python3
"""Issue 10's benchmark: afpa's HTTP server CPU per request beside nginx and Varnish, one run, one table.

Run from the checkout (stdlib only, Python 3.11+; needs wrk and nginx, Varnish
optional):

    python bench/http_cpu.py --duration 10 --repeat 3
    python bench/http_cpu.py --duration 5 --only afpa,varnish --cases 1k,pass --json out.json

Servers (each started by this script from configs it writes to a temp dir):

  * ``afpa-root``     ``afpa serve --root DIR``  beside
  * ``nginx-static``  nginx serving the same DIR (as bench/throughput.py);
  * ``afpa-backend``  ``afpa serve --backend ORIGIN``  beside
  * ``nginx-proxy``   nginx proxy_cache (``proxy_pass`` for no-store answers) and
  * ``varnish``       varnishd, both as in bench/proxy.py, all three in front of
    one origin nginx that serves DIR with ``max-age=3600`` and, under
    ``/pass/``, ``no-store``.

Cases: ``1k`` 1 KiB keep-alive hit, ``1k-close`` 1 KiB with a new connection
per request, ``128k`` and ``1m`` keep-alive hits (all five servers), ``pass``
1 KiB keep-alive pass-through miss of the no-store URL (the three proxies).

Each server in turn is pinned to CPU 0, warmed up (and checked: 200, right
length, a cache hit exactly where one is due), measured with ``wrk -t1`` on
CPU 1 for each case, and stopped; ``--repeat N`` runs N interleaved rounds
(server order rotated each round) and reports medians.  Server CPU per request
is utime+stime of the server's process tree over the wrk run ÷ requests
(bench/throughput.py).  The origin is unpinned, runs in a session of its own,
and its CPU is measured apart and never counted in a proxy's figure.

The table has one row per case and kind of afpa (--root against nginx static,
--backend against nginx proxy_cache/proxy_pass and Varnish), with each one's
µs CPU/req, the efficiency ratios (peer CPU/req ÷ afpa CPU/req, higher is
better for afpa), issue 10's target for that row and whether it is met, req/s,
and on the pass row the origin's µs CPU/req behind each proxy.

Exit status: 0 ok, 1 a server failed to start or serve, 2 wrk or nginx is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The helpers live beside this file (see proxy.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy  # noqa: E402
import throughput as tp  # noqa: E402

CHECKOUT = Path(__file__).resolve().parent.parent
SIZES = {"1k": 1 << 10, "128k": 128 << 10, "1m": 1 << 20}
PASS_FILE = "1k.bin"

# Case name on the command line -> (case key in the results, file, URL path, Connection: close?).
# Keys are (label, mode) like proxy.py's, so throughput's print_problems reads them.
CASES: dict[str, tuple[tuple[str, str], str, str, bool]] = {
    "1k": (("hit 1k", "keep-alive"), "1k.bin", "/1k.bin", False),
    "1k-close": (("hit 1k", "close"), "1k.bin", "/1k.bin", True),
    "128k": (("hit 128k", "keep-alive"), "128k.bin", "/128k.bin", False),
    "1m": (("hit 1m", "keep-alive"), "1m.bin", "/1m.bin", False),
    "pass": (("pass 1k", "keep-alive"), PASS_FILE, "/pass/" + PASS_FILE, False),
}

# Server -> kind: "static" serves the files itself, "proxy" sits in front of the origin.
SERVERS = {"afpa-root": "static", "nginx-static": "static",
           "afpa-backend": "proxy", "nginx-proxy": "proxy", "varnish": "proxy"}
ALIASES = {"afpa": ("afpa-root", "afpa-backend"), "nginx": ("nginx-static", "nginx-proxy")}
# proxy.py's name of each proxy (its proxy_cmd and hit check).
PROXY_NAME = {"afpa-backend": "afpa", "nginx-proxy": "nginx", "varnish": "varnish"}

# Table rows: (case, afpa server, afpa's label, nginx peer, nginx's label, Varnish peer or None,
# issue 10's targets as [(peer column, least efficiency)]).
ROWS = [
    ("1k", "afpa-root", "--root", "nginx-static", "static", None, [("nginx", 0.85)]),
    ("1k", "afpa-backend", "--backend", "nginx-proxy", "proxy_cache", "varnish", [("nginx", 0.85)]),
    ("1k-close", "afpa-root", "--root", "nginx-static", "static", None, [("nginx", 0.5)]),
    ("1k-close", "afpa-backend", "--backend", "nginx-proxy", "proxy_cache", "varnish",
     [("nginx", 0.5), ("varnish", 1.0)]),
    ("128k", "afpa-root", "--root", "nginx-static", "static", None, [("nginx", 0.85)]),
    ("128k", "afpa-backend", "--backend", "nginx-proxy", "proxy_cache", "varnish", [("nginx", 0.85)]),
    ("1m", "afpa-root", "--root", "nginx-static", "static", None, []),
    ("1m", "afpa-backend", "--backend", "nginx-proxy", "proxy_cache", "varnish", [("varnish", 1.0)]),
    ("pass", "afpa-backend", "--backend", "nginx-proxy", "proxy_pass", "varnish",
     [("varnish", 1.0), ("nginx", 0.5)]),
]


# ---------------------------------------------------------------- servers

def server_cases(server: str, case_names: list[str]) -> list[str]:
    """The selected cases this server runs (no pass-through on a static server)."""
    return [c for c in case_names if c != "pass" or SERVERS[server] == "proxy"]


def bench_server(server: str, args: argparse.Namespace, tmp: Path, root: Path, files: dict[str, int],
                 origin, origin_port: int | None, cpus: tuple[int | None, int | None]) -> tuple[dict, str | None]:
    """Start one server, warm up, run its cases, stop.  Returns (results by case key, failure)."""
    names = server_cases(server, args.cases)
    runs = [(CASES[c][0], CASES[c][2], CASES[c][3]) for c in names]
    port = tp.free_port()
    log = tmp / f"{server}.log"
    if SERVERS[server] == "static":
        cmd = tp.server_cmd("afpa" if server == "afpa-root" else "nginx", args, tmp, root, port)
        needed = {CASES[c][1]: files[CASES[c][1]] for c in names}
        extra_log = tmp / "nginx" / "error.log" if server == "nginx-static" else None
        return tp.bench_one(server, tp.pin(cpus[0]) + cmd, port, log, lambda p: tp.warm_up(p, needed),
                            runs, args, cpus[1], extra_log=extra_log)
    name = PROXY_NAME[server]
    cmd, extra_log = proxy.proxy_cmd(name, args, tmp, port, origin_port)
    # path -> (size, cacheable): warm-up checks a hit exactly where one is due.
    urls = {CASES[c][2]: (files[CASES[c][1]], c != "pass") for c in names}
    return tp.bench_one(server, tp.pin(cpus[0]) + cmd, port, log, lambda p: proxy.warm_up(name, p, urls),
                        runs, args, cpus[1], also_cpu={"origin_": origin.pid}, extra_log=extra_log)


# ---------------------------------------------------------------- report

def ratio(afpa: dict | None, peer: dict | None) -> float | None:
    """Efficiency: peer CPU/req ÷ afpa CPU/req (higher is better for afpa)."""
    key = "cpu_us_per_req"
    if tp._has(afpa, key) and tp._has(peer, key) and afpa[key]:
        return peer[key] / afpa[key]
    return None


def row_figures(row: tuple, res: dict[str, dict]) -> dict:
    """The results and ratios of one table row, and whether its targets are met."""
    case, a, _, n, _, v, targets = row
    key = CASES[case][0]
    ra, rn = res.get(a, {}).get(key), res.get(n, {}).get(key)
    rv = res.get(v, {}).get(key) if v else None
    eff = {"nginx": ratio(ra, rn), "varnish": ratio(ra, rv) if v else None}
    # Judged on the ratio as printed (2 decimals), so the table never shows 0.85 beside "no".
    checks = [None if eff[peer] is None else round(eff[peer], 2) >= least for peer, least in targets]
    met = None if not targets or None in checks and False not in checks else all(checks)
    return {"ra": ra, "rn": rn, "rv": rv, "eff": eff, "checks": checks, "met": met}


def target_text(targets: list[tuple[str, float]]) -> str:
    return ", ".join(f"≥ {least:.2f}× {peer}" for peer, least in targets)


def met_text(targets: list, f: dict) -> str:
    if not targets:
        return ""
    if f["met"] is None:
        return "-"
    return "yes" if f["met"] else "no"


def print_table(res: dict[str, dict], case_names: list[str]) -> None:
    head = ("case", "afpa", "afpa µs CPU/req", "nginx", "nginx µs CPU/req", "varnish µs CPU/req",
            "efficiency vs nginx", "efficiency vs varnish", "target", "met",
            "afpa req/s", "nginx req/s", "varnish req/s", "origin µs CPU/req afpa / nginx / varnish", "errors")
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    rows = []
    for row in ROWS:
        case, a, alabel, n, nlabel, v, targets = row
        if case not in case_names:
            continue
        f = row_figures(row, res)
        ra, rn, rv = f["ra"], f["rn"], f["rv"]
        label, mode = CASES[case][0]
        errs = "; ".join(e for e in (tp.fmt_err(a, ra), tp.fmt_err(n, rn), tp.fmt_err(v or "", rv)) if e)
        # The origin is idle during cache hits; its figure matters for pass-through only.
        origin = (" / ".join(tp.fmt_cpu(r, "origin_cpu_us_per_req") for r in (ra, rn, rv))
                  if case == "pass" else "")
        rows.append((f"{label} {mode}", alabel, tp.fmt_cpu(ra), nlabel, tp.fmt_cpu(rn),
                     tp.fmt_cpu(rv) if v else "", fmt(f["eff"]["nginx"]), fmt(f["eff"]["varnish"]) if v else "",
                     target_text(targets), met_text(targets, f),
                     tp.fmt_rate(ra), tp.fmt_rate(rn), tp.fmt_rate(rv) if v else "", origin, errs))
    tp.print_markdown(head, rows, text_cols={0, 1, 3, 8, 9, len(head) - 1})


# ---------------------------------------------------------------- main

def checkout_rev() -> str:
    """This checkout's commit (with "+changes" when the tree is dirty), for the report."""
    try:
        rev = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(CHECKOUT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (rev or "?") + ("+changes" if dirty else "")


def parse_only(text: str) -> list[str]:
    names: set[str] = set()
    for s in (s.strip().lower() for s in text.split(",") if s.strip()):
        if s in ALIASES:
            names.update(ALIASES[s])
        elif s in SERVERS:
            names.add(s)
        else:
            raise argparse.ArgumentTypeError(f"choose from {','.join([*ALIASES, *SERVERS])}: {text!r}")
    if not names:
        raise argparse.ArgumentTypeError("no server given")
    return [s for s in SERVERS if s in names]


def parse_cases(text: str) -> list[str]:
    names = {s.strip().lower() for s in text.split(",") if s.strip()}
    bad = names - CASES.keys()
    if bad or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(CASES)}: {text!r}")
    return [c for c in CASES if c in names]


def _sigterm(signum, frame):
    # A plain SIGTERM would end us without the finally blocks that stop the servers.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="N interleaved rounds; every figure is the median over them (default 1)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--only", type=parse_only, default=list(SERVERS), metavar="NAMES",
                   help="servers, comma-separated from " + ",".join(SERVERS)
                        + " (afpa = both afpa, nginx = both nginx)")
    p.add_argument("--cases", type=parse_cases, default=list(CASES), metavar="NAMES",
                   help="cases, comma-separated from " + ",".join(CASES) + " (default all)")
    p.add_argument("--afpa-cmd", type=shlex.split, default=None,
                   help="command that runs afpa (default: `python -m afpa` of this checkout)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--no-install", action="store_true",
                   help="do not try `apt-get install -y varnish` when varnishd is missing")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.connections <= 0 or args.repeat <= 0:
        p.error("--duration, --connections and --repeat must be positive")
    if args.afpa_cmd is None:
        # This checkout's afpa, not whatever `afpa` on PATH imports (an
        # editable install may point at another checkout).
        args.afpa_cmd = [sys.executable, "-m", "afpa"]
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(CHECKOUT)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])

    if shutil.which("wrk") is None:
        print("wrk not found; install it with: apt-get install -y wrk", file=sys.stderr)
        return 2
    servers = [s for s in args.only if server_cases(s, args.cases)]
    if not servers:
        p.error("no selected server runs any selected case")
    if any(s != "afpa-root" for s in servers) and not os.access(tp.NGINX, os.X_OK):
        print(f"nginx not found at {tp.NGINX} (a peer and the origin); install it with: apt-get install -y nginx",
              file=sys.stderr)
        return 2
    skipped: dict[str, str] = {}
    args.varnishd = None
    if "varnish" in servers:
        args.varnishd = proxy.find_varnishd(auto_install=not args.no_install)
        if args.varnishd is None:
            skipped["varnish"] = "varnishd not found (apt-get install -y varnish)"
            print(f"skipping Varnish: {skipped['varnish']}", file=sys.stderr, flush=True)
            servers.remove("varnish")
            if not servers:
                return 1
    cpus = tp.choose_cpus()

    all_runs: dict[str, dict[tuple, list[dict]]] = {s: {} for s in servers}
    failures: dict[str, str] = {}
    origin = origin_port = None
    old_term = signal.signal(signal.SIGTERM, _sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="afpa-bench-http-"))
    try:
        # nginx workers and the Varnish child drop to unprivileged users when
        # run as root: they must be able to traverse the temp dir.
        tmp.chmod(0o755)
        root, files = tp.make_files(tmp, SIZES)
        if any(SERVERS[s] == "proxy" for s in servers):
            origin, origin_port, err = proxy.start_origin(tmp, root)
            if not tp.wait_listening(origin, origin_port):
                print(f"origin nginx failed to start:\n{tp.tail(tmp / 'origin.log')}\n{tp.tail(err)}",
                      file=sys.stderr)
                return 1
        for i, server in tp.rounds(servers, args.repeat):
            if server in failures:
                continue
            if args.repeat > 1:
                print(f"-- round {i}/{args.repeat}", file=sys.stderr, flush=True)
            results, failure = bench_server(server, args, tmp, root, files, origin, origin_port, cpus)
            for case, r in results.items():
                all_runs[server].setdefault(case, []).append(r)
            if failure:
                failures[server] = failure
                print(f"\n!! {failure}\n", file=sys.stderr, flush=True)
            time.sleep(1)  # let the previous server's sockets drain before the next one
            if origin is not None and origin.poll() is not None:
                failures["origin"] = f"origin nginx exited (status {origin.returncode})\n{tp.tail(err)}"
                break
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        tp.stop_all(origin)
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGTERM, old_term)

    res = tp.medians(all_runs)
    rev = checkout_rev()
    print()
    print(f"wrk -t1 -c{args.connections} -d{args.duration}s; server on CPU {cpus[0]}, wrk on CPU {cpus[1]}"
          + (", origin (nginx, 1 worker) unpinned" if origin_port else "") + "; req/s as reported by wrk"
          + (f"; medians of {args.repeat} interleaved rounds" if args.repeat > 1 else ""))
    print(f"afpa: {shlex.join(args.afpa_cmd)} (checkout {CHECKOUT}, {rev})")
    print("hit = every measured request a cache hit (afpa --root: a hit of its file cache); "
          "pass = no-store URL, every request forwarded to the origin, whose CPU is not in the proxy's figure")
    print(tp.cpu_note() + "; target = issue 10's, met = every efficiency in it at least the target")
    print()
    print_table(res, args.cases)
    for name, reason in skipped.items():
        print(f"\n{name} skipped: {reason}")
    tp.print_problems(res, failures)

    if args.json:
        doc = {
            "duration_s": args.duration, "connections": args.connections, "threads": 1,
            "repeat": args.repeat, "clk_tck": tp.CLK_TCK,
            "server_cpu": cpus[0], "wrk_cpu": cpus[1], "origin_cpu": None, "afpa_cmd": args.afpa_cmd,
            "checkout": str(CHECKOUT), "commit": rev, "varnishd": args.varnishd, "cases": args.cases, "skipped": skipped, "failures": failures,
            "results": [{"server": s, "case": c, "label": CASES[c][0][0], "mode": CASES[c][0][1],
                         "path": CASES[c][2], "size": files[CASES[c][1]], **res[s][CASES[c][0]]}
                        for s in res for c in args.cases if CASES[c][0] in res[s]],
            "rows": [],
        }
        for row in ROWS:
            case, a, alabel, n, nlabel, v, targets = row
            if case not in args.cases:
                continue
            f = row_figures(row, res)
            doc["rows"].append({
                "case": case, "afpa": a, "nginx": n, "nginx_as": nlabel, "varnish": v,
                "afpa_efficiency_vs_nginx": f["eff"]["nginx"], "afpa_efficiency_vs_varnish": f["eff"]["varnish"],
                "targets": [{"peer": peer, "least": least, "met": ok}
                            for (peer, least), ok in zip(targets, f["checks"])],
                "met": f["met"],
            })
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
