#!/usr/bin/env python3
"""Hit ratio of one afpa beside N sibling afpas sharing the same total cache budget.

Run from the checkout (stdlib only, Python 3.11+):

    python bench/zipf_hits.py
    python bench/zipf_hits.py --quick
    python bench/zipf_hits.py --workers-cmd "python -m afpa serve --workers 2"

A Zipf-skewed workload (P(rank r) ~ 1 / r**s, default s = 1.0, over 20,000
URLs, ranks mapped to URLs by a seeded permutation) of GETs for cacheable
origin responses (``Cache-Control: max-age=3600``, bodies of 1-8 KiB, fixed
per URL) is replayed against:

  * ``single``: one afpa with the whole budget;
  * ``siblings``: ``--siblings`` separately started afpa processes configured
    as siblings of each other (``[siblings]`` in a config file each, token in
    ``$AFPA_SIBLING_TOKEN``), each with budget / N, every request sent to one
    of them at random (seeded), as a kernel spreading connections over
    workers would;
  * ``independent``: the same N processes with budget / N each but not
    siblings (each caches what it is asked for): what siblings save;
  * ``workers`` (only with ``--workers-cmd CMD``): ``CMD --listen ... --backend
    ... --cache-size BUDGET`` once, with the whole budget (the supervisor gives
    each worker its share), all requests to its one port.

The budget is ``--budget`` (default 0.10) of the working set, the bytes the
cache would charge for every URL at once (body + head + afpa.cache.store's
per-object overhead).  The origin (a small asyncio server this script starts)
counts the requests it gets; after the first ``--warmup`` fraction of the
trace (not counted) the hit ratio is 1 - origin requests / requests.  The
trace, sizes and instance choice are the same for every setup.  Printed: a
markdown table and the ratio of each setup's hit ratio to ``single``'s (the
target of issue 9 is >= 0.95).

``--afpa CMD`` is the command that starts one afpa (default ``python -m afpa
serve``, run from the checkout).  Exit status: 0 ok, 1 a server failed or a
request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import itertools
import os
import random
import secrets
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from afpa.cache.store import OBJECT_OVERHEAD  # noqa: E402
from throughput import HOST, free_port, start, stop, wait_listening  # noqa: E402

HEAD_ESTIMATE = 300  # bytes of a stored response head (status line, Date, Via, Content-Length, ...)


# -- the origin -------------------------------------------------------------------

def body_size(i: int, seed: int) -> int:
    """The body length of URL ``i`` (1-8 KiB, fixed by the seed)."""
    return 1024 + random.Random(seed * 1_000_003 + i).randrange(7 * 1024)


def run_origin(port: int, seed: int) -> None:
    """An origin answering ``/obj/<i>`` with a cacheable body; ``/__count`` says
    how many object requests it answered."""
    count = 0
    blob = bytes(range(256)) * 40

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1]
                if target == b"/__count":
                    body = str(count).encode()
                    extra = b"Cache-Control: no-store\r\n"
                else:
                    count += 1
                    i = int(target.rsplit(b"/", 1)[1])
                    body = blob[:body_size(i, seed)]
                    extra = b"Cache-Control: max-age=3600\r\nContent-Type: application/octet-stream\r\n"
                writer.write(b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, HOST, port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def origin_count(port: int) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", "/__count")
        return int(conn.getresponse().read())
    finally:
        conn.close()


# -- the workload -------------------------------------------------------------------

def make_trace(urls: int, requests: int, s: float, seed: int) -> list[int]:
    """URL indices of the requests: Zipf(s) ranks through a seeded permutation."""
    rng = random.Random(seed)
    weights = list(itertools.accumulate(1.0 / (r ** s) for r in range(1, urls + 1)))
    perm = list(range(urls))
    rng.shuffle(perm)
    return [perm[r] for r in rng.choices(range(urls), cum_weights=weights, k=requests)]


def replay(ports: list[int], trace: list[int], choice: list[int], seed: int, clients: int) -> int:
    """Send every request of ``trace`` (request k to ``ports[choice[k]]``) from
    ``clients`` threads over keep-alive connections; returns the failures."""
    failures = [0]
    lock = threading.Lock()

    def worker(part: int) -> None:
        conns = [http.client.HTTPConnection(HOST, p, timeout=60) for p in ports]
        bad = 0
        for k in range(part, len(trace), clients):
            i = trace[k]
            conn = conns[choice[k]]
            try:
                conn.request("GET", f"/obj/{i}", headers={"Host": "zipf.test"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200 or len(body) != body_size(i, seed):
                    bad += 1
            except (OSError, http.client.HTTPException):
                bad += 1
                conn.close()
        for c in conns:
            c.close()
        with lock:
            failures[0] += bad

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures[0]


# -- the setups -----------------------------------------------------------------------

def start_afpas(setup: str, args: argparse.Namespace, origin: str, budget: int, tmp: Path,
                procs: list) -> list[int] | None:
    """Start the afpa processes of ``setup``; their client ports (None: failed)."""
    base = shlex.split(args.afpa)
    common = ["--backend", origin, "--quiet"]
    env = {**os.environ, "AFPA_SIBLING_TOKEN": secrets.token_hex(32)}
    if setup == "single":
        cmds = [(base, budget)]
        configs: list[str | None] = [None]
    elif setup == "workers":
        cmds = [(shlex.split(args.workers_cmd), budget)]
        configs = [None]
    elif setup == "independent":
        cmds = [(base, budget // args.siblings)] * args.siblings
        configs = [None] * args.siblings
    else:
        n = args.siblings
        members = [f"{HOST}:{free_port()}" for _ in range(n)]
        cmds, configs = [], []
        for i in range(n):
            conf = tmp / f"sibling{i}.toml"
            conf.write_text("[siblings]\nmembers = [%s]\nself_index = %d\n"
                            % (", ".join(f'"{m}"' for m in members), i))
            cmds.append((base, budget // n))  # the same total budget
            configs.append(str(conf))
    ports = []
    for i, ((cmd, size), conf) in enumerate(zip(cmds, configs)):
        port = free_port()
        full = [*cmd, "--listen", f"{HOST}:{port}", "--cache-size", str(size), *common]
        if conf:
            full += ["--config", conf]
        proc = start_env(full, tmp / f"{setup}{i}.log", env)
        procs.append(proc)
        if not wait_listening(proc, port):
            print(f"zipf_hits: {setup}: {' '.join(full)} did not start; log:\n"
                  + (tmp / f"{setup}{i}.log").read_text(errors="replace")[-2000:], file=sys.stderr)
            return None
        ports.append(port)
    return ports


def start_env(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    # As throughput.start, plus the sibling token in the environment.
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=REPO, env=env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--urls", type=int, default=20000)
    p.add_argument("--requests", type=int, default=60000)
    p.add_argument("--warmup", type=float, default=0.25, help="fraction of the trace not counted")
    p.add_argument("--s", type=float, default=1.0, help="Zipf exponent")
    p.add_argument("--budget", type=float, default=0.10, help="cache budget as a fraction of the working set")
    p.add_argument("--siblings", type=int, default=2, help="members of the siblings setup")
    p.add_argument("--clients", type=int, default=8, help="client threads (keep-alive connections each)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--afpa", default=f"{shlex.quote(sys.executable)} -m afpa serve",
                   help="command that starts one afpa (listen, backend, cache size and config are added)")
    p.add_argument("--workers-cmd", metavar="CMD",
                   help='also run CMD with the whole budget as setup "workers", e.g. '
                        '"python -m afpa serve --workers 2"')
    p.add_argument("--setups", default="single,siblings,independent",
                   help="comma-separated: single, siblings, independent")
    p.add_argument("--quick", action="store_true", help="5,000 URLs, 15,000 requests")
    p.add_argument("--origin", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.origin is not None:
        run_origin(args.origin, args.seed)
        return 0
    if args.quick:
        args.urls, args.requests = 5000, 15000
    trace = make_trace(args.urls, args.requests, args.s, args.seed)
    working_set = sum(body_size(i, args.seed) + HEAD_ESTIMATE + OBJECT_OVERHEAD for i in range(args.urls))
    budget = int(working_set * args.budget)
    warm = int(len(trace) * args.warmup)
    setups = args.setups.split(",") + (["workers"] if args.workers_cmd else [])
    rows = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="afpa-zipf-") as tmpdir:
        tmp = Path(tmpdir)
        oport = free_port()
        origin = start([sys.executable, __file__, "--origin", str(oport), "--seed", str(args.seed)], tmp / "origin.log")
        try:
            if not wait_listening(origin, oport):
                print("zipf_hits: the origin did not start", file=sys.stderr)
                return 1
            for setup in setups:
                procs: list = []
                try:
                    ports = start_afpas(setup, args, f"http://{HOST}:{oport}", budget, tmp, procs)
                    if ports is None:
                        failed = True
                        continue
                    rng = random.Random(args.seed + 7)
                    choice = [rng.randrange(len(ports)) for _ in trace]
                    t0 = time.monotonic()
                    bad = replay(ports, trace[:warm], choice[:warm], args.seed, args.clients)
                    before = origin_count(oport)
                    bad += replay(ports, trace[warm:], choice[warm:], args.seed, args.clients)
                    fetched = origin_count(oport) - before
                    measured = len(trace) - warm
                    # "workers": one command (a supervisor) given the whole budget, which
                    # it splits among its workers itself.
                    rows.append((setup, "1 command" if setup == "workers" else len(ports),
                                 budget if setup == "workers" else budget // len(ports),
                                 measured, fetched, 1 - fetched / measured, bad, time.monotonic() - t0))
                    failed = failed or bad > 0
                finally:
                    for proc in procs:
                        stop(proc)
        finally:
            stop(origin)
    print(f"Zipf s={args.s} over {args.urls} URLs (1-8 KiB bodies), {args.requests} requests "
          f"({warm} warm-up not counted), budget {budget / 2**20:.1f} MiB = {args.budget:.0%} of the "
          f"working set ({working_set / 2**20:.1f} MiB)\n")
    print("| setup | processes | cache budget given each | requests | origin requests | hit ratio | vs single "
          "| failed | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    single = next((r[5] for r in rows if r[0] == "single"), None)
    for setup, n, each, measured, fetched, ratio, bad, secs in rows:
        vs = f"{ratio / single:.3f}" if single else "-"
        print(f"| {setup} | {n} | {each / 2**20:.2f} MiB | {measured} | {fetched} | {ratio:.4f} | {vs} "
              f"| {bad} | {secs:.1f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
