"""Purge, ban and tag purge end to end: a real ``afpa serve`` in front of a test
backend, driven by the ``afpa cache`` command through the admin API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, free_port
from tests.httpclient import parse_responses
from tests.integration.backends import RawBackend, response
from tests.integration.test_serve import exchange, get

pytestmark = pytest.mark.integration

TOKEN = "integration-token-0123456789abcdef"
TAGS = {"/product/1": "Surrogate-Key: product-1 catalog", "/product/2": "Cache-Tag: product-2,catalog"}


@pytest.fixture
def backend():
    def answer(head, _body):
        path = head.split(b" ")[1].decode()
        extra = [TAGS[path]] if path in TAGS else []
        return response(f"body of {path}".encode(), "Cache-Control: max-age=600", *extra)

    b = RawBackend(answer)
    yield b
    b.close()


def fetch(port, path):
    [(status, headers, body)] = parse_responses(exchange(port, get(path)))
    assert status == 200 and body == f"body of {path}".encode()
    assert "surrogate-key" not in headers and "cache-tag" not in headers
    return headers["cache-status"]


def cli(p, *args, token_file=None):
    env = {k: v for k, v in os.environ.items() if k != "AFPA_ADMIN_TOKEN"}
    extra = ["--admin-token-file", token_file] if token_file else []
    done = subprocess.run([sys.executable, "-m", "afpa", "cache", *args, "--admin", f"127.0.0.1:{p.admin_port}",
                           *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    return done.returncode, done.stdout, done.stderr


def test_purge_ban_and_tag_through_the_cli(afpa_process, backend, tmp_path):
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    p = afpa_process("--backend", backend.url, "--admin-token-file", str(token_file))
    paths = ["/product/1", "/product/2", "/static/a.css", "/static/b.js", "/page"]
    for path in paths:
        assert fetch(p.port, path).startswith("afpa; fwd=uri-miss")
        assert fetch(p.port, path) == "afpa; hit"

    # Without the token: refused, nothing purged.
    rc, out, err = cli(p, "tag", "product-1")
    assert rc == 1 and out == "" and err.startswith("afpa: admin API at ") and "401" in err
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-0123456789\n")
    rc, _, err = cli(p, "tag", "product-1", token_file=str(wrong))
    assert rc == 1 and "403: wrong admin token" in err
    assert fetch(p.port, "/product/1") == "afpa; hit"

    rc, out, err = cli(p, "tag", "product-1", token_file=str(token_file))
    assert rc == 0, err
    assert json.loads(out) == {"purged": 1, "tags": {"product-1": 1}, "soft": False}
    assert fetch(p.port, "/product/1").startswith("afpa; fwd=uri-miss")
    assert fetch(p.port, "/product/2") == "afpa; hit"

    rc, out, _ = cli(p, "ban", "/static/", token_file=str(token_file))
    assert rc == 0 and json.loads(out)["purged"] == 2
    assert fetch(p.port, "/static/a.css").startswith("afpa; fwd=uri-miss")
    assert fetch(p.port, "/static/b.js").startswith("afpa; fwd=uri-miss")
    assert fetch(p.port, "/page") == "afpa; hit"

    rc, out, _ = cli(p, "purge", "http://127.0.0.1/page", token_file=str(token_file))
    assert rc == 0 and json.loads(out)["purged"] == 1
    assert fetch(p.port, "/page").startswith("afpa; fwd=uri-miss")

    rc, out, _ = cli(p, "tag", "catalog", "--soft", token_file=str(token_file))
    assert rc == 0 and json.loads(out)["purged"] == 2  # /product/1 (fetched again) and /product/2
    assert fetch(p.port, "/product/2").startswith("afpa; fwd=stale")

    rc, _, err = cli(p, "ban", "--regex", "(", token_file=str(token_file))
    assert rc == 1 and "400: 'regex' is not a valid regular expression" in err


def test_cli_without_a_server_says_so_in_one_line(tmp_path):
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "afpa", "cache", "purge", "http://h/", "--admin",
                           f"127.0.0.1:{port}"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr == f"afpa: cannot reach the admin API at 127.0.0.1:{port}: Connection refused\n"


def test_serve_refuses_a_token_file_it_cannot_use(tmp_path):
    short = tmp_path / "token"
    short.write_text("short\n")
    done = subprocess.run([sys.executable, "-m", "afpa", "serve", "--listen", "127.0.0.1:0",
                           "--admin-token-file", str(short)], cwd=REPO, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"afpa: {short}: admin_token_file: the token is shorter than 16 characters "
        "(make one with: openssl rand -hex 32)"]
