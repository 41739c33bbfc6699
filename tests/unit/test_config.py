"""Config file loading and routing rules."""

from __future__ import annotations

import pytest

from afpa.cli import build_parser, settings_from_args
from afpa.config import Settings, SettingError, load_config
from routing.pool import Backend
from routing.router import build_router
from tests.conftest import REPO, settings_from_file
from protocols.http.settings import HttpSettings, http_settings


def test_shipped_example_loads():
    settings = settings_from_file(REPO / "examples" / "afpa.toml")
    http = settings.module_settings
    router = build_router(http)
    assert router.default.kind == "remote" and router.default.backends == (Backend("127.0.0.1", 8081),)
    assert router.choose(b"x", b"/static/a.css").kind == "docroot"
    assert router.choose(b"x", b"/websocket/chat").kind == "deferred"
    api = router.choose(b"api.example.com:8080", b"/v1")
    assert api.kind == "remote" and len(api.backends) == 2
    assert router.choose(b"other.example.com", b"/v1") is router.default
    assert settings.cache_bytes == 256 << 20 and http.backend_first_byte_timeout == 60


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
        build_router(settings_from_file(cfg).module_settings)
    assert message in str(info.value)


def test_command_line_overrides_config(tmp_path):
    cfg = tmp_path / "afpa.toml"
    cfg.write_text('backend = "http://127.0.0.1:9"\nlisten = "127.0.0.1:1"\n')
    args = build_parser().parse_args(["serve", "--config", str(cfg), "--listen", "127.0.0.1:2"])
    s = settings_from_args(args)
    assert s.listen == ("127.0.0.1", 2) and s.module_settings.backend == "http://127.0.0.1:9"
    with pytest.raises(ValueError):
        settings_from_args(build_parser().parse_args(["serve", "--backend", "http://a:1", "--defer", "http://a:2"]))
    with pytest.raises(ValueError):
        settings_from_args(build_parser().parse_args(["serve", "--tls-cert", "x.pem"]))


@pytest.mark.parametrize("text,message", [
    ('trust_forwarded = "false"', "afpa.toml: trust_forwarded: replaced by trusted_proxies"),
    ('trust_forwarded = true', "afpa.toml: trust_forwarded: replaced by trusted_proxies"),
    ("[timeouts]\nidle = -5", "afpa.toml: timeouts.idle: expected a positive number of seconds, got -5"),
    ("[timeouts]\nidle = '5'", "afpa.toml: timeouts.idle: expected a positive number of seconds, got '5' (a string)"),
    ("[timeouts]\nbackend_connect = 0", "timeouts.backend_connect: expected a positive number of seconds, got 0"),
    ("[limits]\nheaders = 1.5", "limits.headers: expected a positive whole number, got 1.5"),
    ("[limits]\nheaders = true", "limits.headers: expected a positive whole number, got True (a boolean)"),
    ("[cache]\nsize = -1", "cache.size: expected a size in bytes"),
    ("[cache]\nheuristic_fraction = 1.5", "cache.heuristic_fraction: expected a number from 0 to 1 (e.g. 0.1), got 1.5"),
    ("[cache]\nheuristic_max = 0", "cache.heuristic_max: expected a positive number of seconds, got 0"),
    ("[cache]\ntargeted_field = 'CDN Cache'", "cache.targeted_field: expected an HTTP field name"),
    ("backend = ''", "afpa.toml: backend: expected an http:// URL"),
    ("backend = 8081", "afpa.toml: backend: expected an http:// URL (e.g. http://127.0.0.1:8081), got 8081"),
    ("listen = 8080", "listen: expected HOST:PORT"),
    ("trusted_proxies = '10.0.0.0/8'", "trusted_proxies: expected a list of IP addresses or CIDRs"),
    ("trusted_proxies = ['10.0.0.1/8']", "trusted_proxies: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)"),
    ("trusted_proxies = ['proxy.local']", "trusted_proxies: 'proxy.local' is not an IP address or CIDR"),
    ("[[tls.certificate]]\ncert = 5\nkey = 'k'", "tls.certificate 1: needs exactly cert and key"),
])
def test_config_values_are_type_checked(tmp_path, text, message):
    cfg = tmp_path / "afpa.toml"
    cfg.write_text(text)
    with pytest.raises(ValueError) as info:
        settings_from_args(build_parser().parse_args(["serve", "--config", str(cfg)]))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith(str(cfg))


def test_trusted_proxies_from_file_and_command_line(tmp_path):
    cfg = tmp_path / "afpa.toml"
    cfg.write_text('trusted_proxies = ["127.0.0.1", "10.0.0.0/8", "::1"]\n')
    s = settings_from_args(build_parser().parse_args(["serve", "--config", str(cfg)]))
    assert s.module_settings.trusted_proxies == ("127.0.0.1/32", "10.0.0.0/8", "::1/128")
    s = settings_from_args(build_parser().parse_args(["serve", "--trusted-proxy", "192.0.2.0/24",
                                                      "--trusted-proxy", "::1"]))
    assert s.module_settings.trusted_proxies == ("192.0.2.0/24", "::1/128")
    assert HttpSettings().trusted_proxies == ()  # default: trust nobody


@pytest.mark.parametrize("argv,message", [
    (["--backend", ""], "argument --backend: expected an http:// URL"),
    (["--idle-timeout", "-5"], "argument --idle-timeout: expected a positive number of seconds, got '-5'"),
    (["--backend-idle-timeout", "0"], "argument --backend-idle-timeout: expected a positive number"),
    (["--tls-handshake-timeout", "soon"], "argument --tls-handshake-timeout: expected a positive number"),
    (["--trusted-proxy", "10.0.0.1/8"], "argument --trusted-proxy: '10.0.0.1/8' has host bits set"),
    (["--trust-forwarded"], "--trust-forwarded was replaced by --trusted-proxy"),
    (["--cache-size", "lots"], "argument --cache-size: expected a size in bytes"),
])
def test_command_line_refuses_what_a_config_file_would(capsys, argv, message):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", *argv])
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_same_check_for_settings_made_in_code():
    for kwargs in ({"idle_timeout": -5}, {"backend": ""}, {"backend_first_byte_timeout": float("nan")},
                   {"trusted_proxies": ["nobody"]}, {"max_headers": 0}):
        with pytest.raises(SettingError) as info:
            http_settings(**kwargs)
        assert info.value.field == next(iter(kwargs))


def test_backend_timeouts_on_the_command_line(tmp_path):
    cfg = tmp_path / "afpa.toml"
    cfg.write_text("[timeouts]\nbackend_connect = 9\nbackend_idle = 8\ntls_handshake = 3\n")
    s = settings_from_args(build_parser().parse_args(
        ["serve", "--config", str(cfg), "--backend-connect-timeout", "1.5", "--backend-first-byte-timeout", "2",
         "--backend-idle-timeout", "3"]))
    http = s.module_settings
    assert (http.backend_connect_timeout, http.backend_first_byte_timeout, http.backend_idle_timeout) == (1.5, 2.0, 3.0)
    assert s.tls_handshake_timeout == 3.0
    assert Settings().tls_handshake_timeout == 10.0


def test_a_key_added_with_a_plain_type_is_checked_strictly(tmp_path, monkeypatch):
    # How another setting is added: one line in _FILE_KEYS (and the field).  A bare
    # bool/int there still refuses a string, from the file and from code.
    from afpa import config
    monkeypatch.setitem(config._FILE_KEYS, "limits.helper_threads", ("helper_threads", int))
    monkeypatch.setitem(config._FILE_KEYS, "cache.strict", ("cache_strict", bool))
    cfg = tmp_path / "afpa.toml"
    cfg.write_text('[cache]\nstrict = "false"\n')
    with pytest.raises(ValueError, match=r"cache.strict: expected true or false, got 'false' \(a string\)"):
        load_config(str(cfg))
    cfg.write_text('[limits]\nhelper_threads = "4"\n')
    with pytest.raises(ValueError, match="limits.helper_threads: expected a whole number"):
        load_config(str(cfg))


def test_drain_timeout_from_config_and_command_line(tmp_path):
    assert Settings().drain_timeout == 30
    assert settings_from_file(REPO / "examples" / "afpa.toml").drain_timeout == 30


def test_caching_policy_settings(tmp_path):
    cfg = tmp_path / "afpa.toml"
    cfg.write_text("[cache]\nheuristic_fraction = 0\nheuristic_max = 3600\ntargeted_field = 'Edge-Control'\n")
    s = settings_from_file(cfg).module_settings
    assert (s.heuristic_fraction, s.heuristic_max, s.targeted_field) == (0.0, 3600.0, "Edge-Control")
    d = HttpSettings()
    assert (d.heuristic_fraction, d.heuristic_max, d.targeted_field) == (0.1, 86400.0, "Afpa-Cache-Control")
    cfg = tmp_path / "afpa.toml"
    cfg.write_text("[timeouts]\ndrain = 2.5\n")
    assert settings_from_args(build_parser().parse_args(["serve", "--config", str(cfg)])).drain_timeout == 2.5
    args = build_parser().parse_args(["serve", "--config", str(cfg), "--drain-timeout", "7"])
    assert settings_from_args(args).drain_timeout == 7
