"""Siblings over real sockets: two separately started afpa processes share one
cache in front of one backend, each URL fetched and stored by its owner."""

from __future__ import annotations

import signal
import urllib.request

import pytest

from protocols.http.states.siblings import key_bytes
from routing.siblings import owner_index
from tests.conftest import free_port, wait_port
from tests.httpclient import parse_responses
from tests.integration.backends import response
from tests.integration.test_serve import exchange, get

pytestmark = pytest.mark.integration

TOKEN = "sibling-test-token-0123456789abcdef"


@pytest.fixture
def pair(afpa_process, backend, tmp_path):
    """``pair(respond)``: (backend, [afpa 0, afpa 1], members) configured as siblings."""

    def start(respond=None, extra=()):
        b = backend(respond or (lambda head, body: response(b"body of " + head.split(b" ")[1],
                                                             "Cache-Control: max-age=60")))
        token = tmp_path / "sibling.token"
        token.write_text(TOKEN + "\n")
        members = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
        procs = []
        for i in range(2):
            conf = tmp_path / f"afpa{i}.toml"
            conf.write_text(f'[siblings]\nmembers = {members!r}\nself_index = {i}\n'
                            f'token_file = "{token}"\nretry_after = 60\n'.replace("'", '"'))
            procs.append(afpa_process("--config", str(conf), "--backend", b.url, *extra))
        for m in members:
            wait_port(int(m.rsplit(":", 1)[1]))
        return b, procs, members

    return start


def owner(members: list[str], path: str) -> int:
    # get() sends Host: 127.0.0.1, whichever instance it goes to.
    return owner_index(tuple(m.encode() for m in members), key_bytes((b"127.0.0.1", path.encode())))


def fetch(port: int, path: str, *headers: str):
    [r] = parse_responses(exchange(port, get(path, *headers)))
    return r


def paths_owned(members, n=4):
    """``n`` paths owned by member 0 and ``n`` by member 1."""
    mine: dict[int, list[str]] = {0: [], 1: []}
    i = 0
    while min(len(v) for v in mine.values()) < n:
        path = f"/obj/{i}"
        if len(mine[owner(members, path)]) < n:
            mine[owner(members, path)].append(path)
        i += 1
    return mine


def test_each_url_reaches_the_origin_once_and_then_hits_through_either(pair):
    b, procs, members = pair()
    owned = paths_owned(members)
    for path in owned[0] + owned[1]:
        first = fetch(procs[0].port, path)
        assert first[0] == 200 and first[2] == b"body of " + path.encode()
        assert first[1]["cache-status"] == "afpa; fwd=uri-miss; fwd-status=200; stored"  # at its owner
        second = fetch(procs[1].port, path)
        third = fetch(procs[0].port, path)
        for status, h, body in (second, third):
            assert (status, body, h["cache-status"]) == (200, first[2], "afpa; hit")
            assert h["via"] == "1.1 afpa"  # one afpa, whichever answered
    assert sorted(h.split(b" ")[1].decode() for h in b.requests) == sorted(owned[0] + owned[1])


def test_the_origin_gets_what_a_single_afpa_sends(pair):
    b, procs, members = pair()
    owned = paths_owned(members, 1)
    claims = ("X-Forwarded-For: 6.6.6.6", "X-Real-IP: 6.6.6.6", "Via: 1.0 upstream",
              "Connection: X-Hop", "X-Hop: 1", "Afpa-Sibling: " + TOKEN + "; for=6.6.6.6; proto=https")
    fetch(procs[0].port, owned[0][0], *claims)   # to its owner directly
    fetch(procs[0].port, owned[1][0], *claims)   # through a sibling to its owner
    direct, through = b.requests
    assert direct.replace(owned[0][0].encode(), b"/X") == through.replace(owned[1][0].encode(), b"/X")
    lines = through.lower().split(b"\r\n")
    assert [x for x in lines if x.startswith(b"x-forwarded-for")] == [b"x-forwarded-for: 127.0.0.1"]
    assert b"x-forwarded-proto: http" in lines and b"via: 1.0 upstream, 1.1 afpa" in lines
    assert not [x for x in lines if x.startswith((b"afpa-sibling", b"x-real-ip", b"x-hop"))]


def test_a_trusted_proxys_chain_is_kept_once_through_a_sibling(pair):
    b, procs, members = pair(extra=("--trusted-proxy", "127.0.0.1"))
    path = paths_owned(members, 1)[1][0]
    fetch(procs[0].port, path, "X-Forwarded-For: 203.0.113.9")
    [head] = b.requests
    assert b"\r\nX-Forwarded-For: 203.0.113.9, 127.0.0.1\r\n" in head


def test_the_sibling_listener_refuses_a_wrong_or_missing_token(pair):
    b, procs, members = pair()
    port = int(members[0].rsplit(":", 1)[1])
    for field in ("Afpa-Sibling: wrong-token-0123456789; for=127.0.0.1; proto=http", None,
                  "Afpa-Sibling: " + TOKEN + "; for=nowhere; proto=http"):
        [(status, _, body)] = parse_responses(exchange(port, get("/obj/x", *([field] if field else []))))
        assert status == 403 and b"Afpa-Sibling" in body
    assert b.requests == []
    good = parse_responses(exchange(port, get("/obj/x", f"Afpa-Sibling: {TOKEN}; for=127.0.0.1; proto=http")))
    assert good[0][0] == 200 and len(b.requests) == 1


def test_a_killed_owner_falls_back_to_the_origin(pair):
    b, procs, members = pair()
    owned = paths_owned(members, 3)
    warm = owned[0][0]
    assert fetch(procs[1].port, warm)[0] == 200  # through 0, leaving a pooled connection to it
    procs[0].proc.send_signal(signal.SIGKILL)
    procs[0].proc.wait(timeout=10)
    for path in owned[0]:   # all owned by the dead one (the first on that pooled connection)
        status, h, body = fetch(procs[1].port, path)
        assert (status, body) == (200, b"body of " + path.encode())
    # Later requests for its URLs go to the origin and are stored here meanwhile.
    assert fetch(procs[1].port, owned[0][1])[1]["cache-status"] == "afpa; hit"
    for path in owned[1]:   # its own URLs are unaffected
        assert fetch(procs[1].port, path)[0] == 200
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{procs[1].admin_port}/metrics", timeout=5).read().decode()
    assert f'afpa_sibling_fallbacks_total{{member="{members[0]}"}} 1.0' in metrics
    assert f'afpa_sibling_requests_total{{member="{members[0]}"}} 2.0' in metrics


def test_a_sibling_never_forwards_a_siblings_request(pair):
    b, procs, members = pair()
    path = paths_owned(members, 1)[1][0]      # owned by 1, asked at 0's sibling listener
    port = int(members[0].rsplit(":", 1)[1])
    [(status, h, _)] = parse_responses(exchange(port, get(path, f"Afpa-Sibling: {TOKEN}; for=127.0.0.1; proto=http")))
    assert status == 200 and h["cache-status"].endswith("; stored")
    assert len(b.requests) == 1   # 0 fetched it itself, no hop to 1
