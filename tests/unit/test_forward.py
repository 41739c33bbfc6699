"""What afpa changes in forwarded messages, and which responses it may store."""

from __future__ import annotations

import attrs
import pytest

from protocols.http.settings import HttpSettings
from afpa.machine.trust import TrustedProxies
from protocols.http.policy import forward
from protocols.http.wire.parser import parse_head, parse_response_head
from protocols.http.scopes import HttpRequest
from protocols.http.wire.errors import HttpError


def request(raw: bytes) -> HttpRequest:
    req = HttpRequest()
    assert parse_head(raw, 0, 0, HttpSettings(), req) == len(raw)
    return req


@attrs.define
class Resp:
    version: int = 11
    status: int = 0
    reason: bytes = b""
    headers: list | None = None
    lnames: list | None = None
    content_length: int = -1
    chunked: bool = False
    codings: bytes = b""
    keep_alive: bool = True


def response(raw: bytes) -> Resp:
    resp = Resp()
    assert parse_response_head(raw, 0, 65536, resp) == len(raw)
    return resp


def test_request_head_rewrites():
    req = request(b"POST http://Example.com/p?q HTTP/1.1\r\nHost: ignored\r\nConnection: keep-alive, X-Hop\r\n"
                  b"X-Hop: 1\r\nTE: trailers\r\nProxy-Authorization: x\r\nX-Forwarded-For: 6.6.6.6\r\n"
                  b"Content-Length: 3\r\nExpect: 100-continue\r\nAccept: */*\r\n\r\n")
    head = forward.request_head(req, "10.0.0.7", tls=True, trusted_peer=False, body="length").decode()
    assert head.startswith("POST /p?q HTTP/1.1\r\nHost: example.com\r\n")
    for gone in ("X-Hop", "TE:", "Proxy-Authorization", "6.6.6.6", "Expect", "keep-alive"):
        assert gone not in head
    assert "Accept: */*\r\n" in head and "Via: 1.1 afpa\r\n" in head
    assert "X-Forwarded-For: 10.0.0.7\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: example.com\r\n" in head
    assert head.endswith("Content-Length: 3\r\n\r\n")


CLAIMS = (b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\nX-Forwarded-Proto: https\r\n"
          b"X-Forwarded-Host: evil.example\r\nX-Forwarded-Port: 443\r\nForwarded: for=6.6.6.6;proto=https\r\n"
          b"X-Real-IP: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\nCF-Connecting-IP: 6.6.6.6\r\n"
          b"X-Client-IP: 6.6.6.6\r\nX-Cluster-Client-IP: 6.6.6.6\r\n")


def fields(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode().split("\r\n")[1:]
    return [(n.lower(), v) for n, _, v in (line.partition(": ") for line in lines if line)]


def test_untrusted_peer_claims_are_removed():
    req = request(b"GET / HTTP/1.1\r\nHost: site\r\n" + CLAIMS + b"Accept: */*\r\n\r\n")
    head = forward.request_head(req, "192.0.2.9", tls=False, trusted_peer=False, body="none")
    assert b"6.6.6.6" not in head and b"7.7.7.7" not in head and b"evil" not in head
    got = fields(head)
    assert [f for f in got if f[0] not in ("host", "via", "accept")] == [
        ("x-forwarded-for", "192.0.2.9"), ("x-forwarded-proto", "http"), ("x-forwarded-host", "site")]


def test_trusted_peer_appended_exactly_once():
    req = request(b"GET / HTTP/1.1\r\nHost: site\r\n" + CLAIMS + b"\r\n")
    head = forward.request_head(req, "10.0.0.2", tls=False, trusted_peer=True, body="none")
    got = fields(head)
    assert [v for n, v in got if n == "x-forwarded-for"] == ["6.6.6.6, 7.7.7.7, 10.0.0.2"]
    assert [v for n, v in got if n == "x-forwarded-proto"] == ["https"]
    assert [v for n, v in got if n == "x-forwarded-host"] == ["evil.example"]
    for kept in ("forwarded", "x-real-ip", "true-client-ip", "x-forwarded-port"):
        assert [n for n, _ in got].count(kept) == 1


def test_trusted_peer_without_prior_fields_gets_its_own():
    req = request(b"GET / HTTP/1.1\r\nHost: site\r\n\r\n")
    got = fields(forward.request_head(req, "10.0.0.2", tls=True, trusted_peer=True, body="none"))
    assert ("x-forwarded-for", "10.0.0.2") in got and ("x-forwarded-proto", "https") in got
    assert ("x-forwarded-host", "site") in got


@pytest.mark.parametrize("entries,host,trusted", [
    ((), "127.0.0.1", False),
    (("127.0.0.1",), "127.0.0.1", True),
    (("127.0.0.1",), "127.0.0.2", False),
    (("10.0.0.0/8",), "10.200.3.4", True),
    (("10.0.0.0/8",), "11.0.0.1", False),
    (("10.0.0.0/8",), "::ffff:10.1.2.3", True),   # IPv4 client on a dual-stack socket
    (("::1",), "::1", True),
    (("::1",), "0:0:0:0:0:0:0:1", True),
    (("2001:db8::/32",), "2001:db8:1::5", True),
    (("2001:db8::/32",), "10.0.0.1", False),
    (("10.0.0.0/8",), "not-an-address", False),
])
def test_trusted_proxies_match_addresses_and_networks(entries, host, trusted):
    assert TrustedProxies(entries).trusts(host) is trusted


def test_response_lines_drop_hop_by_hop_and_add_via():
    resp = response(b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\n"
                    b"Transfer-Encoding: chunked\r\nVia: 1.0 origin\r\nETag: \"e\"\r\n\r\n")
    lines = b"".join(forward.response_lines(resp))
    assert lines == b'ETag: "e"\r\nVia: 1.0 origin, 1.1 afpa\r\n'


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gz ip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip,,chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
    b"HTTP/2 200 OK\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
])
def test_malformed_backend_heads(raw):
    with pytest.raises(HttpError) as info:
        parse_response_head(raw, 0, 65536, Resp())
    assert info.value.status == 502


def test_chunked_framing():
    assert forward.frame([b"abc"], chunked=True, last=True) == [b"3\r\n", b"abc", b"\r\n", b"0\r\n\r\n"]
    assert forward.frame([b"abc"], chunked=False, last=True) == [b"abc"]
