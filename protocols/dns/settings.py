"""The DNS module's settings: the ``[dns]`` section of a config file and the
``afpa serve --module dns`` flags.

Defaults follow dnsmasq and Unbound where they agree: upstream port 53, TTLs
clamped to at most a day (negative answers to an hour, RFC 2308's advice),
serve-stale off (RFC 8767 makes it an operator's choice) and at most a day of
staleness when on.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs

from afpa.config import BOOL, COUNT, Kind, SECONDS, _Detail
from afpa.machine.modules import ModuleSettings, Option


def parse_upstream(text: str) -> tuple[str, int]:
    """``"9.9.9.9"``, ``"9.9.9.9:5353"``, ``"[::1]:53"``, ``"::1"`` -> (host, port); port 53 by default."""
    text = text.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise _Detail(f"not HOST[:PORT]: {text!r}")
        port = rest[1:] or "53"
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise _Detail(f"not an IP address: {host!r} (upstreams are given by address)") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise _Detail(f"not a port: {port!r} in {text!r}")
    return host, int(port)


def _upstreams(value: Any) -> tuple[tuple[str, int], ...]:
    if isinstance(value, str):
        return (parse_upstream(value),)
    if not isinstance(value, (list, tuple)):
        raise TypeError
    out: list[tuple[str, int]] = []
    for item in value:
        if isinstance(item, str):
            out.append(parse_upstream(item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], int):
            out.append(parse_upstream(f"[{item[0]}]:{item[1]}"))
        elif isinstance(item, (list, tuple)):
            out.extend(_upstreams(item))  # a flag's value, already checked
        else:
            raise TypeError
    return tuple(out)


def _strings(value: Any) -> tuple[str, ...]:
    """A string or a list of them (a repeated flag's values come as nested tuples)."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise TypeError
    out: list[str] = []
    for item in value:
        out.extend(_strings(item))
    return tuple(out)


def _rules(value: Any) -> tuple[str, ...]:
    from protocols.dns.rules import parse_rules

    items = _strings(value)
    for item in items:
        try:
            parse_rules(item)
        except ValueError as exc:
            raise _Detail(str(exc)) from None
    return tuple(items)


def _record_lines(value: Any) -> tuple[str, ...]:
    from protocols.dns.rules import LocalRecords

    items = _strings(value)
    try:
        LocalRecords(items)
    except ValueError as exc:
        raise _Detail(str(exc)) from None
    return tuple(items)


def _paths(value: Any) -> tuple[str, ...]:
    items = _strings(value)
    if not all(i.strip() for i in items):
        raise ValueError
    return items


def _ttl(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError
    if not 0 <= value <= 0x7FFFFFFF:
        raise ValueError
    return value


UPSTREAMS = Kind('a list of upstream addresses, IP[:PORT] (port 53 by default; e.g. ["9.9.9.9", "[::1]:5353"])',
                 _upstreams)
RULES = Kind('a list of forwarding rules /domain/[address[#port]] (e.g. ["/corp.example/10.0.0.53"]; '
             'no address: answered locally only)', _rules)
RECORDS = Kind('a list of records "name [ttl] TYPE value..." (e.g. ["router.lan A 192.168.1.1"])', _record_lines)
PATHS = Kind("a list of file paths", _paths)
TTL = Kind("a whole number of seconds (0 or more)", _ttl, int)


@attrs.define(slots=True, frozen=True)
class DnsSettings:
    """The forwarder's settings (see the README's "DNS forwarder" section)."""

    upstreams: tuple[tuple[str, int], ...] = ()   # tried in order
    servers: tuple[str, ...] = ()          # per-domain rules, dnsmasq's server=/dom/addr
    local_records: tuple[str, ...] = ()    # answered without forwarding
    hosts_files: tuple[str, ...] = ()      # /etc/hosts-style files, answered without forwarding
    min_ttl: int = 0                       # clamps on stored lifetimes (unbound cache-min-ttl)
    max_ttl: int = 86400                   # (unbound cache-max-ttl)
    neg_max_ttl: int = 3600                # negative answers (RFC 2308: 1 to 3 hours)
    serve_stale: bool = False              # RFC 8767: answer stale when every upstream fails
    stale_max: float = 86400.0             # how long past expiry a stale answer may be served
    timeout: float = 1.0                   # seconds per upstream try (UDP)
    tries: int = 2                         # rounds over the upstream list
    tcp_timeout: float = 5.0               # the TCP fallback exchange (connect + answer)


def check(s: DnsSettings) -> None:
    """Rules that tie the fields together (ValueError ``"<key>: <problem>"``)."""
    if not (s.upstreams or s.servers or s.local_records or s.hosts_files):
        raise ValueError("dns.upstreams: nothing to answer with: give an upstream (--upstream 9.9.9.9, "
                         "[dns] upstreams), a forwarding rule, local records or a hosts file")
    if s.min_ttl > s.max_ttl:
        raise ValueError(f"dns.min_ttl: {s.min_ttl} is above dns.max_ttl ({s.max_ttl})")
    for path in s.hosts_files:
        try:
            with open(path, encoding="utf-8"):
                pass
        except OSError as exc:
            raise ValueError(f"dns.hosts_files: {path}: {exc.strerror}") from None


SETTINGS = ModuleSettings(
    section="dns",
    cls=DnsSettings,
    options=(
        Option("upstreams", "upstreams", UPSTREAMS, flag="--upstream", repeat=True,
               help="an upstream DNS server IP[:PORT] (repeat for several; tried in order)"),
        Option("servers", "servers", RULES, flag="--dns-rule", repeat=True,
               help="forward a domain elsewhere: /corp.example/10.0.0.53[#port] (no address: local only)"),
        Option("local_records", "local_records", RECORDS, flag="--dns-record", repeat=True,
               help='a record answered locally: "name [ttl] TYPE value"'),
        Option("hosts_files", "hosts_files", PATHS, flag="--hosts-file", repeat=True,
               help="a hosts file whose names are answered locally"),
        Option("min_ttl", "min_ttl", TTL, help="shortest lifetime stored"),
        Option("max_ttl", "max_ttl", TTL, help="longest lifetime stored"),
        Option("neg_max_ttl", "neg_max_ttl", TTL, help="longest lifetime of a stored negative answer"),
        Option("serve_stale", "serve_stale", BOOL, help="answer from a stale entry when upstreams fail"),
        Option("stale_max", "stale_max", SECONDS, help="seconds past expiry a stale answer may be served"),
        Option("timeout", "timeout", SECONDS, flag="--dns-timeout", help="seconds to wait for one upstream try"),
        Option("tries", "tries", COUNT, flag="--dns-tries", help="rounds over the upstream list"),
        Option("tcp_timeout", "tcp_timeout", SECONDS, help="seconds for a TCP fallback exchange"),
    ),
    check=check,
)
