"""The admin listener's read endpoints: the machine page and its JSON, and
``admin_auth = "all"`` locking every read but /healthz and the page shells."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from afpa.cli import build_parser, settings_from_args
from tests.conftest import REPO, MemoryServer, admin_call

TOKEN = "s3cret-token-0123456789"


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch):
    monkeypatch.delenv("AFPA_ADMIN_TOKEN", raising=False)


@pytest.fixture
def token_file(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    return str(f)


def call(mem, path, token=None, method="GET"):
    return admin_call(mem.server, method, path, token)


READS = ["/metrics", "/tables/", "/tables/http.toml", "/machines.json", "/machines/http.json",
         "/machines/http-backend.json", "/no/such/page"]
OPEN = ["/healthz", "/", "/machines/http", "/machines/http-backend", "/machines/whatever"]


def test_page_and_json_open_by_default(mem):
    status, h, body = call(mem, "/")
    assert status == 200 and h["content-type"].startswith("text/html")
    # Only the page's own script and style may run; no framing, no outside fetches.
    csp = h["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "frame-ancestors 'none'" in csp
    assert "connect-src 'self'" in csp and "unsafe" not in csp
    for link in (b'href="/metrics"', b'href="/healthz"', b'href="/tables/"', b'href="/machines.json"'):
        assert link in body
    status, h, page = call(mem, "/machines/http")
    assert status == 200 and page == body  # one page; its script reads the path
    status, h, body = call(mem, "/machines.json")
    assert status == 200 and h["content-type"] == "application/json" and h["cache-control"] == "no-store"
    assert [m["name"] for m in json.loads(body)["machines"]] == ["http", "http-backend"]
    status, _, body = call(mem, "/machines/http-backend.json")
    one = json.loads(body)
    assert status == 200 and one["name"] == "http-backend" and one["time"] == mem.clock.seconds()
    assert one["start"] == "backend_buffer_body" and one["states"][0]["entries"] == 0
    status, _, body = call(mem, "/machines/nope.json")
    assert status == 404 and json.loads(body) == {"error": "no machine named 'nope'; see /machines.json",
                                                  "machines": ["http", "http-backend"]}
    assert call(mem, "/machines/http/more")[0] == 404
    for path in READS[:-1]:
        assert call(mem, path)[0] == 200, path


def test_the_page_script_matches_its_hash(mem):
    """The CSP hash is of the exact script the page carries (else browsers block it)."""
    import base64
    import hashlib
    import re
    _, h, body = call(mem, "/")
    script = re.search(rb"<script>(.*?)</script>", body, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in h["content-security-policy"]
    assert b"innerHTML" not in body  # server text goes in as text, never as markup


@pytest.fixture
def locked(docroot, token_file):
    return MemoryServer(str(docroot), admin_token_file=token_file, admin_auth="all")


@pytest.mark.parametrize("path", READS)
def test_locked_reads_need_the_token(locked, path):
    status, h, body = call(locked, path)
    assert status == 401 and h["www-authenticate"] == 'Bearer realm="afpa admin"'
    assert h["content-type"] == "application/json"
    assert json.loads(body) == {"error": "this endpoint needs Authorization: Bearer <admin token>"}
    status, _, body = call(locked, path, token="wrong-token-0123456789")
    assert status == 403 and json.loads(body) == {"error": "wrong admin token"}
    status, _, _ = call(locked, path, token=TOKEN)
    assert status == (404 if path == "/no/such/page" else 200)


@pytest.mark.parametrize("path", OPEN)
def test_locked_admin_keeps_healthz_and_page_shells_open(locked, path):
    status, h, body = call(locked, path)
    assert status == 200
    assert body == b"ok\n" if path == "/healthz" else body.startswith(b"<!DOCTYPE html>")


def test_locked_writes_still_need_the_token(locked):
    assert call(locked, "/cache/purge", method="POST")[0] == 401
    assert call(locked, "/cache/purge", token=TOKEN, method="POST")[0] == 400  # empty body: past the lock


def test_reads_open_with_a_token_in_writes_mode(docroot, token_file):
    mem = MemoryServer(str(docroot), admin_token_file=token_file)
    assert mem.settings.admin_auth == "writes"
    for path in READS[:-1]:
        assert call(mem, path)[0] == 200


def test_all_without_a_token_refuses_to_start(docroot):
    with pytest.raises(ValueError) as info:
        MemoryServer(str(docroot), admin_auth="all")
    assert str(info.value) == ('admin_auth: "all" needs an admin token (admin_token_file, '
                               '--admin-token-file or $AFPA_ADMIN_TOKEN)')


def test_admin_auth_from_config_and_command_line(tmp_path):
    cfg = tmp_path / "afpa.toml"
    cfg.write_text('admin_auth = "all"\n')
    assert settings_from_args(build_parser().parse_args(["serve", "--config", str(cfg)])).admin_auth == "all"
    args = build_parser().parse_args(["serve", "--config", str(cfg), "--admin-auth", "writes"])
    assert settings_from_args(args).admin_auth == "writes"
    cfg.write_text('admin_auth = "reads"\n')
    with pytest.raises(ValueError) as info:
        settings_from_args(build_parser().parse_args(["serve", "--config", str(cfg)]))
    assert str(info.value) == f'{cfg}: admin_auth: expected "writes" or "all", got \'reads\''


def test_serve_with_all_and_no_token_is_a_one_line_error(tmp_path, monkeypatch):
    done = subprocess.run([sys.executable, "-m", "afpa", "serve", "--root", str(tmp_path), "--listen", "127.0.0.1:0",
                           "--admin", "127.0.0.1:0", "--admin-auth", "all"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == ('afpa: admin_auth: "all" needs an admin token (admin_token_file, '
                           '--admin-token-file or $AFPA_ADMIN_TOKEN)\n')
