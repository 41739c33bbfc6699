"""One normalised request path for every decision (issue 11 items 9, 11, 12)."""

from __future__ import annotations

import pytest

from protocols.http.settings import HttpSettings
from protocols.http.states import files
from protocols.http.policy import forward
from protocols.http.wire import paths
from protocols.http.wire.errors import HttpError
from protocols.http.wire.parser import parse_head
from protocols.http.scopes import HttpRequest
from tests.conftest import MemoryServer, settings_from_file
from tests.httpclient import parse_responses


@pytest.mark.parametrize("raw,normal", [
    # RFC 3986 5.4 examples, as paths resolved against "/a/b/c/d;p"
    ("/a/b/c/g", "/a/b/c/g"),
    ("/a/b/c/./g", "/a/b/c/g"),
    ("/a/b/c/g/", "/a/b/c/g/"),
    ("/a/b/c/.", "/a/b/c/"),
    ("/a/b/c/./", "/a/b/c/"),
    ("/a/b/c/..", "/a/b/"),
    ("/a/b/c/../", "/a/b/"),
    ("/a/b/c/../g", "/a/b/g"),
    ("/a/b/c/../..", "/a/"),
    ("/a/b/c/../../g", "/a/g"),
    ("/a/b/c/g.", "/a/b/c/g."),
    ("/a/b/c/.g", "/a/b/c/.g"),
    ("/a/b/c/g..", "/a/b/c/g.."),
    ("/a/b/c/..g", "/a/b/c/..g"),
    ("/a/b/c/./../g", "/a/b/g"),
    ("/a/b/c/./g/.", "/a/b/c/g/"),
    ("/a/b/c/g/./h", "/a/b/c/g/h"),
    ("/a/b/c/g/../h", "/a/b/c/h"),
    ("/a/b/c/g;x=1/./y", "/a/b/c/g;x=1/y"),
    ("/a/b/c/g;x=1/../y", "/a/b/c/y"),
    ("/mid/content=5/../6", "/mid/6"),
    ("/", "/"),
    ("/.", "/"),
    ("/a/..", "/"),
    # unreserved characters decoded, other escapes kept with upper-case hex
    ("/%73tatic/s.txt", "/static/s.txt"),
    ("/%7Euser/%2D%2e%5F", "/~user/-._"),
    ("/a%20b/%c3%a9", "/a%20b/%C3%A9"),
    ("/q%3fx%23y", "/q%3Fx%23y"),
    ("/a/%2e%2E/b/%2e/c", "/b/c"),  # encoded dots are dot segments once decoded
    # empty segments collapse, so no path reads as another host
    ("//evil.com/../sub", "/sub"),
    ("//static//s.txt", "/static/s.txt"),
    ("/dir//", "/dir/"),
    ("/x/../static/s.txt", "/static/s.txt"),
])
def test_normalise(raw, normal):
    assert paths.normalise(raw.encode()) == normal.encode()
    assert paths.normalise(normal.encode()) == normal.encode()  # idempotent


@pytest.mark.parametrize("raw,detail", [
    ("/..", "climbs above the root"),
    ("/../etc/passwd", "climbs above the root"),
    ("/a/../../b", "climbs above the root"),
    ("/%2e%2e/etc/passwd", "climbs above the root"),
    ("/a%2fb", "encoded slash"),
    ("/a%2Fb", "encoded slash"),
    ("/a%5cb", "encoded backslash"),
    ("/hello.txt%00.html", "NUL in path"),
    ("/a%zz", "invalid percent-encoding"),
    ("/a%4", "invalid percent-encoding"),
    ("/a%", "invalid percent-encoding"),
])
def test_refused(raw, detail):
    with pytest.raises(HttpError) as info:
        paths.normalise(raw.encode())
    assert info.value.status == 400 and detail in info.value.detail


def parsed(raw: bytes) -> HttpRequest:
    req = HttpRequest()
    assert parse_head(raw, 0, 0, HttpSettings(), req) == len(raw)
    return req


def test_parser_sets_normalised_path_and_target_query_untouched():
    req = parsed(b"GET /x/../%73tatic/s.txt?a=%2e%2e/../&b=%41 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert req.path == b"/static/s.txt"
    assert req.query == b"a=%2e%2e/../&b=%41"
    assert req.target == b"/static/s.txt?a=%2e%2e/../&b=%41"
    assert parsed(b"GET /a/./b? HTTP/1.1\r\nHost: h\r\n\r\n").target == b"/a/b?"
    assert parsed(b"GET /plain HTTP/1.1\r\nHost: h\r\n\r\n").target == b"/plain"
    absolute = parsed(b"GET http://Example.com//a/../%62?q HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (absolute.host, absolute.path, absolute.target) == (b"example.com", b"/b", b"/b?q")
    star = parsed(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (star.path, star.target) == (b"*", b"*")


def test_backend_receives_the_normalised_target():
    req = parsed(b"GET /api/../v1/%7Eme?x=%2e HTTP/1.1\r\nHost: h\r\n\r\n")
    head = forward.request_head(req, "10.0.0.7", tls=False, trusted_peer=False, body="none")
    assert head.startswith(b"GET /v1/~me?x=%2e HTTP/1.1\r\n")


def test_directory_location_is_never_a_network_path():
    assert files.directory_location(b"/sub", b"") == b"/sub/"
    assert files.directory_location(b"//evil.com", b"a=1") == b"/evil.com/?a=1"


# --- through the machine ---------------------------------------------------

def get(path: str, *headers: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"


def ask(mem: MemoryServer, path: str):
    proto, t = mem.connect()
    proto.dataReceived(get(path).encode())
    return parse_responses(t.value())[0]


@pytest.fixture
def routed(docroot, tmp_path):
    """Default docroot plus a /static/ rule with its own root and a /websocket/
    rule deferred to a (never reached) local server."""
    static_root = tmp_path / "static-root"
    (static_root / "static").mkdir(parents=True)
    (static_root / "static" / "s.txt").write_bytes(b"from the static rule\n")
    (docroot / "static").mkdir()
    (docroot / "static" / "s.txt").write_bytes(b"from the default root\n")
    (docroot / "cached.html").write_bytes(b"<p>cached</p>\n")
    routes = ({"to": "docroot", "prefix": "/static/", "root": str(static_root)},
              {"to": "defer", "prefix": "/websocket/", "backend": "http://127.0.0.1:9"})
    return MemoryServer(str(docroot), routes=routes)


@pytest.mark.parametrize("path", ["/static/s.txt", "/x/../static/s.txt", "/%73tatic/s.txt",
                                  "//static/s.txt", "/static/./s.txt"])
def test_route_rule_matches_the_normalised_path(routed, path):
    status, h, body = ask(routed, path)
    assert (status, body) == (200, b"from the static rule\n")


def test_spellings_share_one_cache_entry(routed):
    assert ask(routed, "/static/s.txt")[1]["cache-status"] == "afpa; fwd=uri-miss; stored"
    status, h, body = ask(routed, "/x/../%73tatic/s.txt")
    assert (status, body, h["cache-status"]) == (200, b"from the static rule\n", "afpa; hit")


def test_dot_segments_do_not_defer(routed):
    status, _, body = ask(routed, "/websocket/../cached.html")
    assert (status, body) == (200, b"<p>cached</p>\n")


def test_refused_paths_get_400_with_a_short_detail(mem):
    for path, detail in (("/a%2fb", b"encoded slash"), ("/a%00", b"NUL in path"),
                         ("/../x", b"climbs above the root")):
        status, h, body = ask(mem, path)
        assert status == 400 and detail in body and h["connection"] == "close"


def test_directory_redirect_stays_on_this_host(mem, docroot):
    (docroot / "sub").mkdir()
    (docroot / "sub" / "index.html").write_bytes(b"sub\n")
    for path in ("//evil.com/../sub", "//sub", "/sub", "/x/../sub"):
        status, h, _ = ask(mem, path)
        assert (status, h["location"]) == (301, "/sub/"), path
    status, h, _ = ask(mem, "/sub?a=1")
    assert h["location"] == "/sub/?a=1"


@pytest.fixture
def dotted(docroot):
    (docroot / ".git").mkdir()
    (docroot / ".git" / "config").write_bytes(b"[core]\n")
    (docroot / ".env").write_bytes(b"SECRET=1\n")
    (docroot / ".htaccess").write_bytes(b"deny\n")
    (docroot / "dir" / ".hidden").write_bytes(b"hidden\n")
    (docroot / ".well-known" / "acme-challenge").mkdir(parents=True)
    (docroot / ".well-known" / "acme-challenge" / "tok").write_bytes(b"tok.key\n")
    return docroot


@pytest.mark.parametrize("path", ["/.git/config", "/.env", "/.htaccess", "/dir/.hidden", "/%2Eenv",
                                  "/.git/", "/.git", "/.well-known/acme-challenge/tok"])
def test_dotfiles_denied_by_default(dotted, path):
    status, _, body = ask(MemoryServer(str(dotted)), path)
    assert status == 404 and body.startswith(b"404")


def test_dotfiles_allow_names_a_segment(dotted):
    mem = MemoryServer(str(dotted), dotfiles_allow=(".well-known",))
    assert ask(mem, "/.well-known/acme-challenge/tok")[::2] == (200, b"tok.key\n")
    assert ask(mem, "/.well-known")[1]["location"] == "/.well-known/"
    assert ask(mem, "/.env")[0] == 404
    assert ask(mem, "/.well-known/../.git/config")[0] == 404


def test_dotfiles_allow_in_config(tmp_path):
    cfg = tmp_path / "afpa.toml"
    cfg.write_text('dotfiles_allow = [".well-known"]\n')
    assert settings_from_file(cfg).module_settings.dotfiles_allow == (".well-known",)
    for text, message in (('dotfiles_allow = ".well-known"', "expected a list of path segment names starting with a dot"),
                          ("dotfiles_allow = [1]", "expected a list of path segment names starting with a dot"),
                          ('dotfiles_allow = ["well-known"]', "not a path segment starting with a dot"),
                          ('dotfiles_allow = [".a/b"]', "not a path segment starting with a dot")):
        cfg.write_text(text + "\n")
        with pytest.raises(ValueError) as info:
            settings_from_file(cfg)
        assert f"{cfg}: dotfiles_allow: " in str(info.value) and message in str(info.value)
