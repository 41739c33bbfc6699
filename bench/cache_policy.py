#!/usr/bin/env python3
"""Hit ratio of the memory cache's eviction policy (GDSF) beside plain LRU.

Run from the checkout (stdlib only plus ``afpa.cache.store``, Python 3.11+):

    python bench/cache_policy.py
    python bench/cache_policy.py --alpha 0.7,0.9,1.1 --shift
    python bench/cache_policy.py --quick

It builds a reproducible synthetic web trace (seeded ``random.Random``):

  * ``--objects`` distinct objects whose sizes are lognormal (median
    ``--median``, sigma ``--sigma``), clamped to [64 B, ``--max-size``];
  * ``--requests`` requests drawn from a Zipf-like popularity
    (P(rank r) ~ 1 / r**alpha); ranks are mapped to objects by a random
    permutation, so popularity is independent of size;
  * with ``--shift``, a fresh permutation is used for the second half of the
    trace: the popular set moves and old popularity has to age out.

Then, for every alpha and every budget (a fraction of the total distinct
bytes), it replays the trace through two caches with the same interface and
the same accounting (``CacheObject.cost`` = head + size + OBJECT_OVERHEAD):

  * ``gdsf``: ``afpa.cache.store.CacheStore`` itself (Greedy-Dual-Size-Frequency
    with lazy priority updates);
  * ``lru``: an ``OrderedDict`` under the same byte budget.

Each request is a ``get(key, now)``; a miss builds a ``CacheObject`` (no
payload: ``fragments=()`` with ``size`` set, the store only accounts
``cost``) and ``put``s it.  ``now`` grows by one per request and
``fresh_until`` is infinite, so freshness never interferes.  The first
``--warmup`` fraction of requests fills the cache and is not counted.  With
``--shift`` an extra column gives the object hit ratio over the second half
alone, i.e. how fast each policy recovers once the popular set has moved.

Printed per row: object hit ratio, byte hit ratio, and simulated requests per
second of wall time (a rough cost of each policy's hit/miss path, including
the shared loop and CacheObject construction).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from afpa.cache.store import CacheObject, CacheStore  # noqa: E402

INF = float("inf")
MIN_SIZE = 64
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" \
       b"Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT\r\nETag: \"0123456789abcdef\"\r\n" \
       b"Content-Length: 12345\r\nCache-Control: max-age=3600\r\n"  # shared, ~200 B


# ---------------------------------------------------------------- trace

def make_sizes(rng: random.Random, n: int, median: int, sigma: float, cap: int) -> list[int]:
    mu = math.log(median)
    return [min(cap, max(MIN_SIZE, int(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def make_requests(rng: random.Random, n_objects: int, n_requests: int, alpha: float,
                  shift: bool) -> list[int]:
    """Object ids; rank r (0-based) has weight 1 / (r + 1)**alpha."""
    cum, total = [], 0.0
    for r in range(n_objects):
        total += 1.0 / (r + 1) ** alpha
        cum.append(total)
    ranks = range(n_objects)
    perm = list(ranks)
    rng.shuffle(perm)
    if not shift:
        return [perm[r] for r in rng.choices(ranks, cum_weights=cum, k=n_requests)]
    half = n_requests // 2
    first = [perm[r] for r in rng.choices(ranks, cum_weights=cum, k=half)]
    rng.shuffle(perm)
    second = [perm[r] for r in rng.choices(ranks, cum_weights=cum, k=n_requests - half)]
    return first + second


# ---------------------------------------------------------------- LRU

class LRUStore:
    """Plain LRU under a byte budget, with CacheStore's interface and accounting."""

    def __init__(self, budget: int, max_object: int):
        self.budget = budget
        self.max_object = max_object
        self._index: OrderedDict = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.stored = self.evicted = self.rejected = 0

    def __len__(self) -> int:
        return len(self._index)

    def get(self, key, now: float):
        obj = self._index.get(key)
        if obj is None:
            self.misses += 1
        else:
            self.hits += 1
            obj.hits += 1
            self._index.move_to_end(key)
        return obj

    def put(self, obj: CacheObject) -> bool:
        if obj.size > self.max_object or obj.cost > self.budget:
            self.rejected += 1
            return False
        old = self._index.pop(obj.key, None)
        if old is not None:
            self.bytes -= old.cost
        index = self._index
        while self.bytes + obj.cost > self.budget and index:
            _, victim = index.popitem(last=False)
            self.bytes -= victim.cost
            self.evicted += 1
        index[obj.key] = obj
        self.bytes += obj.cost
        self.stored += 1
        return True


POLICIES = {"gdsf": CacheStore, "lru": LRUStore}


# ---------------------------------------------------------------- replay

def _segment(store, requests: list[int], sizes: list[int], start: int, stop: int,
             counted: bool) -> tuple[int, int, int]:
    """Replay requests[start:stop]; returns (hits, hit bytes, requested bytes)."""
    get, put = store.get, store.put
    hits = hit_bytes = req_bytes = 0
    for now in range(start, stop):
        key = requests[now]
        obj = get(key, now)
        if obj is None:
            put(CacheObject(key, HEAD, (), sizes[key], now, INF))
            if counted:
                req_bytes += sizes[key]
        elif counted:
            hits += 1
            size = sizes[key]
            hit_bytes += size
            req_bytes += size
    return hits, hit_bytes, req_bytes


def replay(store, requests: list[int], sizes: list[int], warmup: int) -> dict:
    """Run the trace; count hits only after ``warmup`` requests.  ``late_hit_ratio``
    is the object hit ratio over the second half alone (after a ``--shift``)."""
    n = len(requests)
    mid = max(warmup, n // 2)
    t0 = time.perf_counter()
    _segment(store, requests, sizes, 0, warmup, False)
    h1, hb1, rb1 = _segment(store, requests, sizes, warmup, mid, True)
    h2, hb2, rb2 = _segment(store, requests, sizes, mid, n, True)
    elapsed = time.perf_counter() - t0
    counted = n - warmup
    hit_bytes, req_bytes = hb1 + hb2, rb1 + rb2
    return {
        "hit_ratio": (h1 + h2) / counted if counted else 0.0,
        "byte_hit_ratio": hit_bytes / req_bytes if req_bytes else 0.0,
        "late_hit_ratio": h2 / (n - mid) if n > mid else 0.0,
        "rps": n / elapsed if elapsed else 0.0,
        "objects": len(store),
        "bytes": store.bytes,
        "evicted": store.evicted,
    }


def check_store(store, name: str) -> None:
    """Invariants: bytes equals the sum of the resident objects' costs and fits the budget."""
    resident = sum(o.cost for o in store._index.values())
    if resident != store.bytes or store.bytes > store.budget:
        raise SystemExit(f"{name}: accounting broken: bytes={store.bytes} "
                         f"resident={resident} budget={store.budget}")


# ---------------------------------------------------------------- main

def parse_list(text: str, kind=float) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_percent_list(text: str) -> list[float]:
    return [float(x.strip().rstrip("%")) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objects", type=int, default=20_000, help="distinct objects (20000)")
    p.add_argument("--requests", type=int, default=500_000, help="requests (500000)")
    p.add_argument("--alpha", type=parse_list, default=[0.9],
                   help="Zipf exponent(s), comma-separated (0.9); e.g. 0.7,0.9,1.1")
    p.add_argument("--budgets", type=parse_percent_list, default=[1, 5, 10, 25],
                   help="cache sizes in %% of total distinct bytes (1,5,10,25)")
    p.add_argument("--median", type=int, default=8 * 1024, help="median object size (8192)")
    p.add_argument("--sigma", type=float, default=1.5, help="lognormal sigma (1.5)")
    p.add_argument("--max-size", type=int, default=4 << 20, help="size cap (4 MiB)")
    p.add_argument("--shift", action="store_true",
                   help="move the popular set halfway through the trace")
    p.add_argument("--warmup", type=float, default=0.1,
                   help="fraction of requests not counted (0.1)")
    p.add_argument("--policies", default="gdsf,lru", help="subset of gdsf,lru")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small smoke run (50000 requests)")
    a = p.parse_args(argv)
    if a.quick:
        a.requests = min(a.requests, 50_000)
        a.objects = min(a.objects, 5_000)
    policies = [x.strip() for x in a.policies.split(",") if x.strip()]
    for name in policies:
        if name not in POLICIES:
            p.error(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})")

    sizes = make_sizes(random.Random(a.seed), a.objects, a.median, a.sigma, a.max_size)
    total = sum(sizes)
    ordered = sorted(sizes)
    print(f"objects {a.objects}, requests {a.requests}, seed {a.seed}, "
          f"shift {'yes' if a.shift else 'no'}, warm-up {a.warmup:.0%} not counted")
    print(f"sizes: lognormal median {a.median} B sigma {a.sigma}, cap {a.max_size} B; "
          f"actual median {ordered[len(ordered) // 2]} B, mean {total / len(sizes):.0f} B, "
          f"max {ordered[-1]} B, total {total / 2**20:.1f} MiB")
    print()
    header = (f"{'alpha':>5}  {'budget':>6}  {'MiB':>7}  {'policy':<6}  {'hit%':>6}  "
              f"{'bytehit%':>8}  " + (f"{'2nd-half hit%':>13}  " if a.shift else "")
              + f"{'req/s':>9}  {'resident':>8}")
    print(header)
    print("-" * len(header))
    t_all = time.perf_counter()
    for alpha in a.alpha:
        # One trace per alpha, seeded from (seed, alpha), shared by all budgets and policies.
        requests = make_requests(random.Random(f"{a.seed}/{alpha}"), a.objects, a.requests,
                                 alpha, a.shift)
        warmup = int(len(requests) * a.warmup)
        for pct in a.budgets:
            budget = int(total * pct / 100)
            for name in policies:
                store = POLICIES[name](budget, a.max_size)
                r = replay(store, requests, sizes, warmup)
                check_store(store, name)
                print(f"{alpha:>5.2f}  {pct:>5g}%  {budget / 2**20:>7.1f}  {name:<6}  "
                      f"{100 * r['hit_ratio']:>6.2f}  {100 * r['byte_hit_ratio']:>8.2f}  "
                      + (f"{100 * r['late_hit_ratio']:>13.2f}  " if a.shift else "")
                      + f"{r['rps']:>9.0f}  {r['objects']:>8}", flush=True)
        print()
    print(f"total wall time {time.perf_counter() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
