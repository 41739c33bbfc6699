"""Request coalescing over real sockets: concurrent misses for one URL make one
backend request when the answer is cacheable, and are never serialised when it
is not (hit-for-miss)."""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.httpclient import parse_responses
from tests.integration.backends import response
from tests.integration.test_serve import exchange, get

pytestmark = pytest.mark.integration

N = 50
BODY = bytes(range(256)) * 400  # 100 KiB: several reads on the way in


@pytest.fixture
def slow_backend(backend):
    def make(*headers):
        def respond(head, body):
            time.sleep(0.5)  # every client's miss arrives while the first is in flight
            return response(BODY, *headers)
        return backend(respond)

    return make


def _concurrent_gets(port: int, path: str) -> list[tuple[int, dict, bytes]]:
    def one(_):
        [r] = parse_responses(exchange(port, get(path), timeout=30))
        return r
    with ThreadPoolExecutor(N) as pool:
        return list(pool.map(one, range(N)))


def _metric(p, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_concurrent_misses_of_a_cacheable_url_make_one_backend_request(afpa_process, slow_backend):
    b = slow_backend("Cache-Control: max-age=60")
    p = afpa_process("--backend", b.url)
    results = _concurrent_gets(p.port, "/big")
    assert all(status == 200 and body == BODY for status, _, body in results)
    assert len(b.requests) == 1
    statuses = sorted(h["cache-status"] for _, h, _ in results)
    stored = [s for s in statuses if s.endswith("; stored")]
    collapsed = [s for s in statuses if s.endswith("; collapsed")]
    assert len(stored) == 1
    # Whoever arrived after the object was complete is an ordinary hit.
    assert len(collapsed) + statuses.count("afpa; hit") == N - 1
    assert _metric(p, "afpa_cache_collapsed_total") == len(collapsed)


def test_concurrent_misses_of_an_uncacheable_url_all_reach_the_backend(afpa_process, slow_backend):
    b = slow_backend("Cache-Control: max-age=60", "Set-Cookie: session=1")
    p = afpa_process("--backend", b.url)
    results = _concurrent_gets(p.port, "/private")
    assert all(status == 200 and body == BODY for status, _, body in results)
    assert len(b.requests) == N
    # Once the first answer said "not cacheable", new misses skip the wait.
    results = _concurrent_gets(p.port, "/private")
    assert len(b.requests) == 2 * N
    assert all("collapsed" not in h["cache-status"] for _, h, _ in results)
    assert _metric(p, "afpa_cache_hit_for_miss_total") == N
