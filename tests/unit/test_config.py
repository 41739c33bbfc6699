"""Config file loading and routing rules."""

from __future__ import annotations

import pytest

from afpa.cli import build_parser, settings_from_args
from afpa.config import Settings, load_config
from routing.pool import Backend
from routing.router import build_router
from tests.conftest import REPO


def test_shipped_example_loads():
    settings = Settings(**load_config(str(REPO / "examples" / "afpa.toml")))
    router = build_router(settings)
    assert router.default.kind == "remote" and router.default.backends == (Backend("127.0.0.1", 8081),)
    assert router.choose(b"x", b"/static/a.css").kind == "docroot"
    assert router.choose(b"x", b"/websocket/chat").kind == "deferred"
    api = router.choose(b"api.example.com:8080", b"/v1")
    assert api.kind == "remote" and len(api.backends) == 2
    assert router.choose(b"other.example.com", b"/v1") is router.default
    assert settings.cache_bytes == 256 << 20 and settings.backend_first_byte_timeout == 60


@pytest.mark.parametrize("text,message", [
    ("listn = '127.0.0.1:1'", "unknown key 'listn'"),
    ("[cache]\nsize = 'lots'", "cache.size"),
    ("[[route]]\nto = 'elsewhere'", "route 1: 'to' must be docroot, remote or defer"),
    ("[[route]]\nto = 'remote'", "route 1: a remote route needs 'backend'"),
    ("[[route]]\nto = 'remote'\nbackend = 'ftp://x'", "only http:// backends"),
    ("[[route]]\nto = 'docroot'\nprefix = 'static'", "'prefix' must start with '/'"),
    ("[[route]]\nto = 'docroot'\nroot = '/no/such/dir'", "is not a directory"),
])
def test_config_errors_are_clear(tmp_path, text, message):
    cfg = tmp_path / "afpa.toml"
    cfg.write_text(text)
    with pytest.raises(ValueError) as info:
        build_router(Settings(**load_config(str(cfg))))
    assert message in str(info.value)


def test_command_line_overrides_config(tmp_path):
    cfg = tmp_path / "afpa.toml"
    cfg.write_text('backend = "http://127.0.0.1:9"\nlisten = "127.0.0.1:1"\n')
    args = build_parser().parse_args(["serve", "--config", str(cfg), "--listen", "127.0.0.1:2"])
    s = settings_from_args(args)
    assert s.listen == ("127.0.0.1", 2) and s.backend == "http://127.0.0.1:9"
    with pytest.raises(ValueError):
        settings_from_args(build_parser().parse_args(["serve", "--backend", "http://a:1", "--defer", "http://a:2"]))
    with pytest.raises(ValueError):
        settings_from_args(build_parser().parse_args(["serve", "--tls-cert", "x.pem"]))


def test_drain_timeout_from_config_and_command_line(tmp_path):
    assert Settings().drain_timeout == 30
    assert Settings(**load_config(str(REPO / "examples" / "afpa.toml"))).drain_timeout == 30
    cfg = tmp_path / "afpa.toml"
    cfg.write_text("[timeouts]\ndrain = 2.5\n")
    assert settings_from_args(build_parser().parse_args(["serve", "--config", str(cfg)])).drain_timeout == 2.5
    args = build_parser().parse_args(["serve", "--config", str(cfg), "--drain-timeout", "7"])
    assert settings_from_args(args).drain_timeout == 7
