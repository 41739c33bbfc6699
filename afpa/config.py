"""Server settings: one attrs class with the embedded defaults.

``afpa serve`` with no options runs on exactly these values, so every default
here is one an operator could deploy.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

import attrs

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """``"256M"`` -> 268435456.  Units are binary (k = 1024); plain digits are bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 65536, 64k, 256M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``"127.0.0.1:8080"``, ``":8080"``, ``"[::1]:8080"`` or ``"8080"`` -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"not HOST:PORT: {text!r}")
    elif ":" in text:
        host, _, port = text.rpartition(":")
    else:
        host, port = "", text
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host or default_host, int(port)


@attrs.define(slots=True)
class Settings:
    """Everything a server needs to know; defaults are the embedded configuration."""

    listen: tuple[str, int] = ("127.0.0.1", 8080)
    tls_certs: tuple = ()               # afpa.tls.Certificate: TLS on tls_listen, else on listen
    tls_listen: tuple[str, int] | None = None
    root: str = "."
    table: str | None = None            # None: the module's shipped table
    companion_tables: dict = attrs.field(factory=dict)  # e.g. {"http-backend": path}
    module: str = "http"
    admin: tuple[str, int] | None = None
    access_log: str | None = None       # path, or "-" for standard output

    # Cache
    cache_bytes: int = 256 << 20
    max_object_bytes: int = 8 << 20     # larger files stream from disk uncached
    revalidate_after: float = 2.0       # seconds before a cached file is stat()ed again

    # Request limits (HTTP answers 414 / 431 / 413)
    max_request_line: int = 8 << 10
    max_header_block: int = 64 << 10
    max_headers: int = 100
    max_discard_body: int = 1 << 20     # body bytes read and dropped to keep a connection
    output_buffer: int = 256 << 10      # queued response bytes per client before it must drain

    # Timeouts, seconds
    idle_timeout: float = 60.0          # keep-alive connection with no request started
    header_timeout: float = 10.0        # from the first byte of a request to its end of head
    send_timeout: float = 60.0          # a response making no progress to a stalled client
    keepalive_requests: int = 10000     # then the connection is closed after the response

    # Disk helper threads (Flash's AMPED helpers)
    helper_threads: int = 8

    # Where misses go: rules (routing.config) tried in order, then the default.
    backend: str | None = None          # --backend URL: default route forwards there
    defer: str | None = None            # --defer URL: default route hands connections there
    routes: tuple = ()                  # routing.router.Route rules from a config file
    trust_forwarded: bool = False       # keep (and append to) incoming X-Forwarded-*

    # Backends
    backend_connect_timeout: float = 5.0
    backend_first_byte_timeout: float = 60.0
    backend_idle_timeout: float = 60.0  # between reads of a response body
    tunnel_idle_timeout: float = 3600.0  # a deferred (spliced) connection with no traffic
    backend_max_idle: int = 32          # pooled keep-alive connections per backend
    backend_pool_idle_timeout: float = 30.0


# Config file keys -> (Settings field, converter).  Sections flatten into fields.
_SECONDS = float
_FILE_KEYS: dict[str, tuple[str, Any]] = {
    "listen": ("listen", parse_hostport), "admin": ("admin", parse_hostport),
    "access_log": ("access_log", str), "root": ("root", str), "table": ("table", str), "backend_table": ("backend_table", str),
    "backend": ("backend", str), "defer": ("defer", str), "trust_forwarded": ("trust_forwarded", bool),
    "cache.size": ("cache_bytes", parse_size), "cache.max_object_size": ("max_object_bytes", parse_size),
    "cache.revalidate_after": ("revalidate_after", _SECONDS),
    "limits.request_line": ("max_request_line", parse_size),
    "limits.header_block": ("max_header_block", parse_size),
    "limits.headers": ("max_headers", int), "limits.discard_body": ("max_discard_body", parse_size),
    "limits.output_buffer": ("output_buffer", parse_size),
    "limits.keepalive_requests": ("keepalive_requests", int),
    "timeouts.idle": ("idle_timeout", _SECONDS), "timeouts.header": ("header_timeout", _SECONDS),
    "timeouts.send": ("send_timeout", _SECONDS),
    "timeouts.backend_connect": ("backend_connect_timeout", _SECONDS),
    "timeouts.backend_first_byte": ("backend_first_byte_timeout", _SECONDS),
    "timeouts.backend_idle": ("backend_idle_timeout", _SECONDS),
    "timeouts.tunnel_idle": ("tunnel_idle_timeout", _SECONDS),
    "backends.max_idle": ("backend_max_idle", int),
    "backends.pool_idle_timeout": ("backend_pool_idle_timeout", _SECONDS),
    "tls.listen": ("tls_listen", parse_hostport),
}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_config(path: str) -> dict[str, Any]:
    """Read a TOML config file into Settings keyword arguments.

    Raises ValueError naming the file and key for anything unknown or invalid,
    so a typo never silently falls back to a default.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    routes = data.pop("route", [])
    certs = data.get("tls", {}).pop("certificate", []) if isinstance(data.get("tls"), dict) else []
    if not isinstance(routes, list) or not all(isinstance(r, dict) for r in routes):
        raise ValueError(f"{path}: 'route' must be an array of tables ([[route]])")
    kwargs: dict[str, Any] = {"routes": tuple(routes)}
    for key, value in _flatten(data).items():
        if key not in _FILE_KEYS:
            raise ValueError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(_FILE_KEYS))}, [[route]], "
                             "[[tls.certificate]])")
        field, convert = _FILE_KEYS[key]
        try:
            kwargs[field] = convert(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {key}: {exc}") from exc
    if "backend_table" in kwargs:
        kwargs["companion_tables"] = {"http-backend": kwargs.pop("backend_table")}
    if certs:
        from afpa.tls import Certificate
        try:
            kwargs["tls_certs"] = tuple(Certificate(c["cert"], c["key"]) for c in certs)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: every [[tls.certificate]] needs cert and key") from exc
    return kwargs
