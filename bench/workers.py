#!/usr/bin/env python3
"""afpa with 1 worker process vs 2 (``--workers 2``), cache hits of a 1 KiB file.

Run from the checkout (stdlib only, Python 3.11+; needs wrk):

    python bench/workers.py --duration 10
    python bench/workers.py --duration 5 --repeat 3 --json out.json
    python bench/workers.py --backend        # hits of a backend route (nginx origin)

For each setup (``--workers 1``: one process, no supervisor; ``--workers 2``:
a supervisor and two workers) it starts afpa, warms the cache, and runs wrk
twice: keep-alive, and a new connection per request (``Connection: close``).
It prints a markdown table of req/s and server CPU time per request.

Nothing is pinned: two workers need both cores, and wrk runs on the same two
cores (the machine has no third), so req/s says what the box does as a whole
and µs CPU/req says what each request costs afpa: the utime+stime of every
afpa process (supervisor and workers, from /proc) during the run / requests
wrk completed.  The helpers (wrk parsing, CPU accounting, process start/stop)
are bench/throughput.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy  # noqa: E402  (its nginx origin)
import throughput as tp  # noqa: E402  (the shared bench helpers)

SETUPS = (1, 2)
MODES = ("keep-alive", "close")


def bench_setup(n: int, args: argparse.Namespace, tmp: Path, root: Path, files: dict[str, int]) -> tuple[dict, str | None]:
    """Start afpa with ``--workers n``, warm up, run both wrk cases, stop."""
    port = tp.free_port()
    log = tmp / f"afpa-w{n}.log"
    source = ["--backend", args.origin_url] if args.origin_url else ["--root", str(root)]
    cmd = args.afpa_cmd + ["serve", *source, "--listen", f"{tp.HOST}:{port}", "--quiet",
                           "--workers", str(n)]
    print(f"== {n} worker(s): {shlex.join(cmd)}", file=sys.stderr, flush=True)
    results: dict = {}
    proc = None
    try:
        proc = tp.start(cmd, log)
        if not tp.wait_listening(proc, port):
            return results, f"--workers {n}: not listening\n{tp.tail(log)}"
        # Every worker must have the file cached: each has its own cache, and the
        # kernel decides which worker accepts, so warm up with many connections.
        problems = tp.warm_up(port, files, rounds=10 * n)
        if problems:
            return results, f"--workers {n} warm-up failed:\n  " + "\n  ".join(problems)
        for fname in files:
            for mode in MODES:
                print(f"   wrk {fname} {mode} ...", file=sys.stderr, flush=True)
                url = f"http://{tp.HOST}:{port}/{fname}"
                results[mode] = tp.run_wrk(url, mode == "close", args, None, cpu_of={"": proc.pid})
                if proc.poll() is not None:
                    return results, f"--workers {n} exited during the run (status {proc.returncode})\n{tp.tail(log)}"
        return results, None
    finally:
        tp.stop(proc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run each (setup, mode) N times and report the medians (default 1)")
    p.add_argument("--afpa-cmd", type=shlex.split, default=None,
                   help="command that runs afpa (default: `python -m afpa` of this checkout)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--backend", action="store_true",
                   help="hits of a backend route (an nginx origin) instead of a document root: with "
                        "2 workers the one that does not own the URL asks its owner (README, Workers)")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.connections <= 0 or args.repeat <= 0:
        p.error("--duration, --connections and --repeat must be positive")
    if args.afpa_cmd is None:
        args.afpa_cmd = [sys.executable, "-m", "afpa"]
        checkout = str(Path(__file__).resolve().parent.parent)
        os.environ["PYTHONPATH"] = checkout + (os.pathsep + os.environ["PYTHONPATH"]
                                               if os.environ.get("PYTHONPATH") else "")
    if shutil.which("wrk") is None:
        print("wrk not found; install it with: apt-get install -y wrk", file=sys.stderr)
        return 2

    runs: dict[int, dict[str, list[dict]]] = {n: {} for n in SETUPS}
    failures: dict[int, str] = {}
    tmp = Path(tempfile.mkdtemp(prefix="afpa-bench-workers-"))
    origin = None
    args.origin_url = None
    try:
        root, files = tp.make_files(tmp, {"1k": 1024})
        if args.backend:
            tmp.chmod(0o755)  # nginx workers drop to an unprivileged user when run as root
            oport = tp.free_port()
            conf, _ = proxy.origin_conf(tmp, root, oport)
            origin = tp.start(["nginx", "-c", str(conf)], tmp / "origin.out")
            if not tp.wait_listening(origin, oport):
                print("the nginx origin did not start", file=sys.stderr)
                return 1
            args.origin_url = f"http://{tp.HOST}:{oport}"
        for i in range(args.repeat):
            # Alternate the order so slow drifts of the host load fall on both.
            for n in (SETUPS if i % 2 == 0 else SETUPS[::-1]):
                if n in failures:
                    continue
                results, failure = bench_setup(n, args, tmp, root, files)
                for mode, r in results.items():
                    runs[n].setdefault(mode, []).append(r)
                if failure:
                    failures[n] = failure
                    print(f"\n!! {failure}\n", file=sys.stderr, flush=True)
                time.sleep(1)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        tp.stop(origin)
        shutil.rmtree(tmp, ignore_errors=True)

    res = {n: {mode: tp.median_result(rs) for mode, rs in by_mode.items()} for n, by_mode in runs.items()}
    print()
    print(("1 KiB cache hits of a backend route" if args.backend else "1 KiB cache hits") + f"; wrk -t1 -c{args.connections} -d{args.duration}s sharing the "
          f"{len(os.sched_getaffinity(0))} CPUs with afpa (nothing pinned)"
          + (f"; medians of {args.repeat} runs" if args.repeat > 1 else ""))
    print("µs CPU/req = utime+stime of the supervisor and every worker (from /proc/PID/stat) "
          "during the run / requests wrk completed")
    print()
    head = ("mode", "1 worker req/s", "1 worker µs CPU/req", "2 workers req/s", "2 workers µs CPU/req",
            "2/1 req/s", "2/1 CPU/req", "errors")
    rows = []
    for mode in MODES:
        one, two = res[1].get(mode), res[2].get(mode)
        cpu_ratio = (f"{two['cpu_us_per_req'] / one['cpu_us_per_req']:.2f}"
                     if tp._has(one, "cpu_us_per_req") and tp._has(two, "cpu_us_per_req") else "-")
        errs = "; ".join(e for e in (tp.fmt_err("1w", one), tp.fmt_err("2w", two)) if e)
        rows.append((mode, tp.fmt_rate(one), tp.fmt_cpu(one), tp.fmt_rate(two), tp.fmt_cpu(two),
                     tp.rate_ratio(two, one), cpu_ratio, errs))
    tp.print_markdown(head, rows, text_cols={0, len(head) - 1})
    for n, failure in failures.items():
        print(f"\n--workers {n} FAILED: {failure}")
    if args.json:
        doc = {"duration_s": args.duration, "connections": args.connections, "repeat": args.repeat,
               "clk_tck": tp.CLK_TCK, "afpa_cmd": args.afpa_cmd,
               "failures": {str(n): f for n, f in failures.items()},
               "results": [{"workers": n, "mode": mode, **r} for n, by_mode in res.items()
                           for mode, r in by_mode.items()]}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
