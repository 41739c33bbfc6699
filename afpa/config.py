"""Server settings: one attrs class with the embedded defaults.

``afpa serve`` with no options runs on exactly these values, so every default
here is one an operator could deploy.
"""

from __future__ import annotations

import re

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
    root: str = "."
    table: str | None = None            # None: the module's shipped table
    module: str = "http"
    admin: tuple[str, int] | None = None

    # Cache
    cache_bytes: int = 256 << 20
    max_object_bytes: int = 8 << 20     # larger files stream from disk uncached
    revalidate_after: float = 2.0       # seconds before a cached file is stat()ed again

    # Request limits (HTTP answers 414 / 431 / 413)
    max_request_line: int = 8 << 10
    max_header_block: int = 64 << 10
    max_headers: int = 100
    max_discard_body: int = 1 << 20     # body bytes read and dropped to keep a connection

    # Timeouts, seconds
    idle_timeout: float = 60.0          # keep-alive connection with no request started
    header_timeout: float = 10.0        # from the first byte of a request to its end of head
    send_timeout: float = 60.0          # a response making no progress to a stalled client
    keepalive_requests: int = 10000     # then the connection is closed after the response

    # Disk helper threads (Flash's AMPED helpers)
    helper_threads: int = 8
