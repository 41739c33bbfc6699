"""Siblings without sockets: owner choice, the Afpa-Sibling field, settings,
and the sibling listener's check on an in-memory server."""

from __future__ import annotations

from collections import Counter

import pytest
from twisted.internet.testing import StringTransport

from afpa.config import SettingError
from afpa.machine.scopes import Connection
from afpa.server import EntryFactory
from protocols.http.policy import forward
from protocols.http.states import siblings
from protocols.http.scopes import HttpGlobal, HttpRequest
from routing.siblings import owner_index, score
from tests.conftest import MemoryServer, settings_from_file
from tests.httpclient import parse_responses
from protocols.http.settings import HttpSettings, read_sibling_token, sibling_address

TOKEN = "unit-sibling-token-0123456789"
KEYS = [b"example.com /item/%d?x=%d" % (i, i * 7) for i in range(20000)]


def ids(n):
    return tuple(b"10.0.0.%d:9301" % i for i in range(n))


# -- owner choice ---------------------------------------------------------------

def test_owner_is_stable_and_the_same_for_everyone():
    members = ids(3)
    first = [owner_index(members, k) for k in KEYS[:500]]
    assert first == [owner_index(members, k) for k in KEYS[:500]]
    # Fixed values: the same on every member, process and machine (not Python's salted hash).
    assert score(b"127.0.0.1:9301", b"h /a") == score(b"127.0.0.1:9301", b"h /a")
    assert owner_index((b"127.0.0.1:9301", b"127.0.0.1:9302"), b"127.0.0.1 /obj/0") in (0, 1)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_owners_are_balanced(n):
    counts = Counter(owner_index(ids(n), k) for k in KEYS)
    for i in range(n):
        assert abs(counts[i] - len(KEYS) / n) < 0.05 * len(KEYS) / n


def test_membership_changes_move_only_the_keys_they_must():
    three, two = ids(3), ids(3)[:2]
    before = [owner_index(three, k) for k in KEYS]
    after = [owner_index(two, k) for k in KEYS]
    # Removing member 2 moves its keys and no other.
    assert all(a == b for a, b in zip(before, after) if a != 2)
    four = ids(4)
    grown = [owner_index(four, k) for k in KEYS]
    moved = sum(a != b for a, b in zip(before, grown))
    assert all(g == 3 for a, g in zip(before, grown) if a != g)   # only to the newcomer
    assert abs(moved - len(KEYS) / 4) < 0.05 * len(KEYS)


# -- the Afpa-Sibling field -------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    (b"tok; for=192.0.2.1; proto=https", (b"tok", "192.0.2.1", True)),
    (b"tok;for=::1;proto=http", (b"tok", "::1", False)),
    (b"tok; proto=http; for=2001:db8::1", (b"tok", "2001:db8::1", False)),
    (b"tok; for=192.0.2.1", None),
    (b"tok; for=192.0.2.1; proto=ftp", None),
    (b"tok; for=host.example; proto=http", None),
    (b"tok; for=192.0.2.1; proto=http; for=192.0.2.2", None),
    (b"tok; for=192.0.2.1; proto=http; extra=1", None),
])
def test_field_parse(value, expected):
    assert siblings.parse_field(value) == expected


def request(*fields: tuple[bytes, bytes], method=b"GET"):
    return HttpRequest(method=method, target=b"/a?b", path=b"/a", host=b"example.com", key=(b"example.com", b"/a?b"),
                       headers=list(fields), lnames=[n.lower() for n, _ in fields])


def test_head_to_the_owner_keeps_the_clients_request_and_adds_the_facts():
    req = request((b"Accept", b"*/*"), (b"X-Forwarded-For", b"6.6.6.6"), (b"Via", b"1.0 up"),
                  (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"), (b"Keep-Alive", b"5"),
                  (b"Afpa-Sibling", b"forged; for=1.1.1.1; proto=https"), (b"TE", b"trailers"))
    head = forward.sibling_request_head(req, b"secret", "192.0.2.7", True)
    assert head == (b"GET /a?b HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\nX-Forwarded-For: 6.6.6.6\r\n"
                    b"Via: 1.0 up\r\nAfpa-Sibling: secret; for=192.0.2.7; proto=https\r\n\r\n")
    # Toward an origin afpa's own field never goes, whoever sent it.
    origin = forward.request_head(req, "192.0.2.7", False, True, body="none")
    assert b"afpa-sibling" not in origin.lower()


def test_only_plain_cacheable_client_misses_go_to_an_owner():
    conn = Connection(None, None, None)
    assert siblings.eligible(request(), conn)
    assert not siblings.eligible(HttpRequest(method=b"POST"), conn)  # no key: not cacheable
    stale = request()
    stale.stale = object()
    body = request()
    body.content_length = 5
    upgrade = request()
    upgrade.upgrade = b"websocket"
    assert not any(siblings.eligible(r, conn) for r in (stale, body, upgrade))
    conn.listener = siblings.LISTENER
    assert not siblings.eligible(request(), conn)   # never from a sibling: no loops


# -- settings ------------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ('[siblings]\nmembers = ["127.0.0.1:1", "127.0.0.1:2"]', "self_index: required with siblings.members"),
    ('[siblings]\nmembers = ["127.0.0.1:1"]\nself_index = 1', "self_index: 1 is not an index of siblings.members"),
    ('[siblings]\nmembers = ["127.0.0.1:1", "127.0.0.1:1"]\nself_index = 0', "listed twice"),
    ('[siblings]\nmembers = ["nowhere"]\nself_index = 0', "'nowhere' is not HOST:PORT"),
    ('[siblings]\nmembers = "127.0.0.1:1"', "siblings.members: expected a list of HOST:PORT"),
    ('[siblings]\nself_index = 0', "self_index: needs siblings.members"),
    ('[siblings]\nmembers = ["127.0.0.1:1"]\nself_index = 0\nretry_after = -1', "siblings.retry_after"),
])
def test_sibling_settings_are_checked(tmp_path, text, message):
    from afpa.cli import build_parser, settings_from_args
    cfg = tmp_path / "afpa.toml"
    cfg.write_text(text)
    with pytest.raises(ValueError) as info:
        settings_from_args(build_parser().parse_args(["serve", "--config", str(cfg)]))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith(f"{cfg}: siblings.")


def test_sibling_settings_from_a_file_and_from_code(tmp_path):
    cfg = tmp_path / "afpa.toml"
    cfg.write_text('[siblings]\nmembers = ["127.0.0.1:9301", "[::1]:9302"]\nself_index = 1\n')
    s = settings_from_file(cfg).module_settings
    assert s.sibling_members == ("127.0.0.1:9301", "[::1]:9302") and sibling_address(s) == ("::1", 9302)
    s = HttpSettings(sibling_members=["127.0.0.1:9301"], sibling_self=0, sibling_listen="0.0.0.0:9400")
    assert sibling_address(s) == ("0.0.0.0", 9400) and sibling_address(HttpSettings()) is None
    with pytest.raises(SettingError):
        HttpSettings(sibling_members=["127.0.0.1:9301"], sibling_self=3)


def test_the_token_comes_from_a_file_or_the_environment(tmp_path):
    s = HttpSettings(sibling_members=["127.0.0.1:9301"], sibling_self=0)
    assert read_sibling_token(s, {}) is None
    assert read_sibling_token(s, {"AFPA_SIBLING_TOKEN": TOKEN}) == TOKEN.encode()
    with pytest.raises(ValueError, match="shorter than 16"):
        read_sibling_token(s, {"AFPA_SIBLING_TOKEN": "short"})
    with pytest.raises(ValueError, match="without spaces, quotes, ';' or ','"):
        read_sibling_token(s, {"AFPA_SIBLING_TOKEN": TOKEN + ";x"})
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    s.sibling_token_file = str(f)
    assert read_sibling_token(s, {}) == TOKEN.encode()


def test_siblings_without_a_token_do_not_start(docroot, monkeypatch):
    monkeypatch.delenv("AFPA_SIBLING_TOKEN", raising=False)
    with pytest.raises(ValueError, match="no token"):
        MemoryServer(str(docroot), sibling_members=("127.0.0.1:9301",), sibling_self=0)


# -- the sibling listener on an in-memory server -------------------------------------

@pytest.fixture
def owner(docroot, monkeypatch):
    monkeypatch.setenv("AFPA_SIBLING_TOKEN", TOKEN)
    return MemoryServer(str(docroot), sibling_members=("127.0.0.1:9301", "127.0.0.1:9302"), sibling_self=0,
                        access_log=None)


def sibling_connection(mem):
    g: HttpGlobal = mem.server.g
    proto = EntryFactory(mem.server, siblings.LISTENER, g.listeners()[0].entry).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def ask(proto, transport, *fields: str):
    transport.clear()
    proto.dataReceived(("GET /hello.txt HTTP/1.1\r\nHost: x\r\n" + "".join(f + "\r\n" for f in fields)
                        + "\r\n").encode())
    return parse_responses(transport.value())


def test_the_sibling_listener_needs_the_token(owner):
    for fields in ((), ("Afpa-Sibling: not-the-token-000000; for=192.0.2.1; proto=http",),
                   (f"Afpa-Sibling: {TOKEN}; for=192.0.2.1; proto=http",) * 2):
        proto, transport = sibling_connection(owner)
        [(status, h, _)] = ask(proto, transport, *fields)
        assert status == 403 and h["connection"] == "close" and transport.disconnecting
    proto, transport = sibling_connection(owner)
    [(status, _, body)] = ask(proto, transport, f"Afpa-Sibling: {TOKEN}; for=192.0.2.1; proto=https")
    assert (status, body) == (200, b"hello world\n")
    # The client's facts are the connection's for this request; the field is gone.
    assert proto.conn.peer_host == "192.0.2.1" and proto.conn.tls and proto.conn.listener == "sibling"
    [(status, h, _)] = ask(proto, transport, f"Afpa-Sibling: {TOKEN}; for=192.0.2.2; proto=http")
    assert status == 200 and h["cache-status"] == "afpa; hit" and proto.conn.peer_host == "192.0.2.2"
    # The one machine counts both listeners' requests.
    machine = owner.server.machine
    assert machine.entries[machine.start.index] == 5


def test_the_client_listener_ignores_the_field(owner):
    proto, transport = owner.connect()
    [(status, _, _)] = ask(proto, transport, "Afpa-Sibling: anything")
    assert status == 200 and proto.conn.listener == ""


def test_a_key_asked_often_enough_is_hot_and_remembered_keys_are_bounded(monkeypatch):
    from routing import siblings as mod

    s = mod.Siblings(None, ("127.0.0.1:1", "127.0.0.1:2"), 0, b"t" * 32, replica_after=3)
    assert [s.hot(b"k") for _ in range(4)] == [False, False, True, False]  # counting starts again
    assert s.replicas == 1
    monkeypatch.setattr(mod, "ASKED_KEYS", 10)
    for i in range(50):
        s.hot(b"%d" % i)
    assert len(s.asked) <= 10
    never = mod.Siblings(None, ("127.0.0.1:1", "127.0.0.1:2"), 0, b"t" * 32, replica_after=0)
    assert not any(never.hot(b"k") for _ in range(10))
