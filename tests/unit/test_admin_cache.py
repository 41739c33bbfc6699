"""The admin API's cache writes (purge, ban, tag) on in-memory connections:
token checks, methods, bodies and the JSON answers."""

from __future__ import annotations

import json

import pytest
from twisted.internet.testing import StringTransport

from afpa.ops import admin

from afpa import config
from afpa.cache.store import CacheObject
from afpa.config import Settings
from tests.conftest import MemoryServer
from tests.httpclient import parse_responses

TOKEN = "s3cret-token-0123456789"


@pytest.fixture
def token_file(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    return str(f)


@pytest.fixture
def mem_token(docroot, token_file):
    m = MemoryServer(str(docroot), admin_token_file=token_file)
    now = m.clock.seconds()
    for path, tags in ((b"/static/a.css", (b"css",)), (b"/static/b.js", ()), (b"/page", (b"page", b"css"))):
        o = CacheObject((b"example.com", path), b"HTTP/1.1 200 OK\r\n", (b"x",), 1, now, now + 60)
        o.set_tags(tags)
        m.server.runtime.cache.put(o)
    return m


def call(mem, method, path, body=None, token=TOKEN, raw_body=None):
    site = admin.admin_site(mem.server)
    channel = site.buildProtocol(None)
    channel.callLater = mem.clock.callLater
    t = StringTransport()
    channel.makeConnection(t)
    data = raw_body if raw_body is not None else (b"" if body is None else json.dumps(body).encode())
    head = f"{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: {len(data)}\r\nConnection: close\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    channel.dataReceived(head.encode() + b"\r\n" + data)
    [(status, headers, out)] = parse_responses(t.value())
    assert out.endswith(b"\n") and out.count(b"\n") == 1  # one line
    return status, headers, json.loads(out)


def test_purge_by_url_with_the_token(mem_token):
    status, h, result = call(mem_token, "POST", "/cache/purge", {"url": "http://example.com/page"})
    assert status == 200 and h["content-type"] == "application/json"
    assert result == {"purged": 1, "url": "http://example.com/page", "soft": False}
    assert (b"example.com", b"/page") not in mem_token.server.runtime.cache
    _, _, result = call(mem_token, "POST", "/cache/purge", {"host": "example.com", "path": "/page"})
    assert result["purged"] == 0


def test_ban_and_tag(mem_token):
    cache = mem_token.server.runtime.cache
    status, _, result = call(mem_token, "POST", "/cache/tag", {"tags": ["css", "none"]})
    assert status == 200 and result == {"purged": 2, "tags": {"css": 2, "none": 0}, "soft": False}
    status, _, result = call(mem_token, "POST", "/cache/ban", {"prefix": "/static/", "host": "example.com"})
    assert status == 200 and result["purged"] == 1 and len(cache) == 0
    assert cache.purged == {"purge": 0, "ban": 1, "tag": 2}


def test_ban_by_regex_and_soft_purge(mem_token):
    cache = mem_token.server.runtime.cache
    _, _, result = call(mem_token, "POST", "/cache/ban", {"regex": r"\.(css|js)$", "soft": True})
    assert result["purged"] == 2 and len(cache) == 3  # kept, but stale
    now = mem_token.clock.seconds()
    assert cache.get((b"example.com", b"/static/a.css"), now).fresh_until < now
    assert cache.get((b"example.com", b"/page"), now).fresh_until > now


def test_purged_objects_are_counted_in_metrics(mem_token):
    call(mem_token, "POST", "/cache/tag", {"tags": ["page"]})
    site = admin.admin_site(mem_token.server)
    text = site.resource.children[b"metrics"].render_GET(_FakeRequest()).decode()
    assert 'afpa_cache_purged_total{how="tag"} 1.0' in text
    assert 'afpa_cache_purged_total{how="ban"} 0.0' in text


class _FakeRequest:
    def setHeader(self, *_):
        pass


def test_without_a_token_header_401_with_a_wrong_one_403(mem_token):
    status, h, result = call(mem_token, "POST", "/cache/tag", {"tags": ["css"]}, token=None)
    assert status == 401 and "Bearer" in result["error"] and h["www-authenticate"].startswith("Bearer")
    status, _, result = call(mem_token, "POST", "/cache/tag", {"tags": ["css"]}, token=TOKEN + "x")
    assert status == 403 and result == {"error": "wrong admin token"}
    assert len(mem_token.server.runtime.cache) == 3  # nothing purged


def test_writes_are_refused_when_no_token_is_configured(docroot, monkeypatch):
    monkeypatch.delenv("AFPA_ADMIN_TOKEN", raising=False)
    mem = MemoryServer(str(docroot))
    assert mem.server.admin_token is None
    status, _, result = call(mem, "POST", "/cache/purge", {"url": "http://h/"})
    assert status == 403 and "no admin token is configured" in result["error"]


def test_only_post_changes_state(mem_token):
    for method in ("GET", "PUT", "DELETE"):
        status, h, result = call(mem_token, method, "/cache/purge")
        assert status == 405 and h["allow"] == "POST" and "use POST" in result["error"]
    assert len(mem_token.server.runtime.cache) == 3


@pytest.mark.parametrize("body, status, problem", [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"url": "http://h/", "sof": true}', 400, "unknown field 'sof'"),
    (b'{"url": "http://h/", "soft": "yes"}', 400, "'soft' must be true or false"),
    (b'{"url": "ftp://h/"}', 400, "not an http:// URL"),
    (b"x" * (admin.MAX_BODY + 1), 413, "larger than"),
])
def test_bad_bodies_get_one_line_errors(mem_token, body, status, problem):
    got, _, result = call(mem_token, "POST", "/cache/purge", raw_body=body)
    assert got == status and problem in result["error"]


def test_bad_ban_patterns_are_400(mem_token):
    status, _, result = call(mem_token, "POST", "/cache/ban", {"regex": "(unclosed"})
    assert status == 400 and "not a valid regular expression" in result["error"]
    status, _, result = call(mem_token, "POST", "/cache/tag", {"tags": []})
    assert status == 400 and "'tags'" in result["error"]


def test_read_endpoints_stay_open_without_a_token(mem_token):
    site = admin.admin_site(mem_token.server)
    channel = site.buildProtocol(None)
    t = StringTransport()
    channel.makeConnection(t)
    channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    [(status, _, body)] = parse_responses(t.value())
    assert (status, body) == (200, b"ok\n")


def test_admin_token_sources(tmp_path):
    assert config.read_admin_token(Settings(), {}) is None
    assert config.read_admin_token(Settings(), {"AFPA_ADMIN_TOKEN": " " + TOKEN + "\n"}) == TOKEN.encode()
    f = tmp_path / "t"
    f.write_text("file-token-0123456789\n")
    # the file wins over the environment
    assert config.read_admin_token(Settings(admin_token_file=str(f)), {"AFPA_ADMIN_TOKEN": TOKEN}) \
        == b"file-token-0123456789"
    f.write_text("short\n")
    with pytest.raises(ValueError, match=r"t: admin_token_file: the token is shorter than 16"):
        config.read_admin_token(Settings(admin_token_file=str(f)), {})
    with pytest.raises(ValueError, match="missing: admin_token_file: cannot read"):
        config.read_admin_token(Settings(admin_token_file=str(tmp_path / "missing")), {})
    with pytest.raises(ValueError, match="AFPA_ADMIN_TOKEN: the token must be one word"):
        config.read_admin_token(Settings(), {"AFPA_ADMIN_TOKEN": "two words but long enough"})


def _raw(mem, data: bytes):
    site = admin.admin_site(mem.server)
    channel = site.buildProtocol(None)
    t = StringTransport()
    channel.makeConnection(t)
    channel.dataReceived(data)
    [(status, _, out)] = parse_responses(t.value())
    return status, json.loads(out)


def test_a_form_encoded_post_as_curl_sends_it_still_works(mem_token):
    body = b'{"tags": ["css"]}'
    status, result = _raw(mem_token, b"POST /cache/tag HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
                          b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                          b"Content-Type: application/x-www-form-urlencoded\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert status == 200 and result["purged"] == 2


def test_a_chunked_body_past_the_limit_is_dropped_and_answered_413(mem_token):
    chunk = b"x" * 4096
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(admin.MAX_BODY // 4096 + 1))
    status, result = _raw(mem_token, b"POST /cache/tag HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
                          b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
    assert status == 413 and "larger than 65536 bytes" in result["error"]


def test_cache_ban_needs_a_prefix_or_a_regex(capsys):
    from afpa import cli
    assert cli.main(["cache", "ban", "--admin", "127.0.0.1:1"]) == 1
    assert capsys.readouterr().err == "afpa: cache ban: give a PREFIX or --regex RE (one of them)\n"
    assert cli.main(["cache", "ban", "/x", "--regex", "y", "--admin", "127.0.0.1:1"]) == 1


def test_cache_command_takes_admin_and_token_file_from_a_config(tmp_path, capsys):
    from afpa import cli
    conf = tmp_path / "afpa.toml"
    conf.write_text(f'admin = "127.0.0.1:1"\nadmin_token_file = "{tmp_path / "nope"}"\n')
    assert cli.main(["cache", "tag", "t", "--config", str(conf)]) == 1
    assert capsys.readouterr().err == f"afpa: {tmp_path / 'nope'}: admin_token_file: cannot read: No such file or directory\n"
