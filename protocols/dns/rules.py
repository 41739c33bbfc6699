"""What the DNS forwarder answers itself, and where it forwards the rest.

The DNS counterpart of a document root: :class:`LocalRecords` holds records
given in the configuration and names from hosts files, answered
authoritatively (AA=1) without forwarding.  :class:`Forwarding` picks the
upstreams for a name by the longest matching domain, in the manner of
dnsmasq's ``server=/corp.example/10.0.0.53``; a domain with no upstreams is
answered locally only (dnsmasq's ``local=/lan/``).

Replies go through :func:`wire.reply_from_answer`, so local answers get the
same 0x20 case echo, EDNS and truncation handling as cached ones.  (The rdata
of the few supported types is a line of struct packing each; the tests decode
what comes out with ``twisted.names.dns``.)

Local records get a TTL of 300 seconds unless a line gives one.  dnsmasq uses
0 (``local-ttl``), which makes every client ask again for every lookup; names
from a configuration file change rarely and a reload is how they change, so
five minutes of client caching is the better default.
"""

from __future__ import annotations

import ipaddress
import shlex
import struct
from collections.abc import Iterable

from protocols.dns import wire
from protocols.dns.wire import Answer, Query

DEFAULT_TTL = 300
MAX_CNAME_CHAIN = 8

_TYPES = {"A": wire.A, "AAAA": wire.AAAA, "CNAME": wire.CNAME, "PTR": wire.PTR, "NS": wire.NS,
          "MX": wire.MX, "TXT": wire.TXT, "SRV": wire.SRV}  # fmt: skip
_RR = struct.Struct(">HHIH")  # type, class, ttl, rdlength after the owner
_U16 = struct.Struct(">H")
_HDR = struct.Struct(">HHHHHH")


def _name(text: str) -> bytes:
    """Wire form, lowercased (local names match case-insensitively)."""
    return wire.encode_name(text).lower()


def _reverse_name(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return _name(address.reverse_pointer)


def _rdata(rtype: int, args: list[str]) -> bytes:
    """Encode the rdata of one record line's arguments; ValueError on bad input."""
    def want(count: int) -> None:
        if len(args) != count:
            raise ValueError(f"expected {count} value(s) after the type, got {len(args)}")

    try:
        if rtype == wire.A:
            want(1)
            return ipaddress.IPv4Address(args[0]).packed
        if rtype == wire.AAAA:
            want(1)
            return ipaddress.IPv6Address(args[0]).packed
        if rtype in (wire.CNAME, wire.PTR, wire.NS):
            want(1)
            return wire.encode_name(args[0])
        if rtype == wire.MX:
            want(2)
            return _U16.pack(_u16(args[0])) + wire.encode_name(args[1])
        if rtype == wire.SRV:
            want(4)
            return b"".join(_U16.pack(_u16(a)) for a in args[:3]) + wire.encode_name(args[3])
        if rtype == wire.TXT:
            if not args:
                raise ValueError("TXT needs at least one string")
            out = bytearray()
            for text in args:
                raw = text.encode()
                # Character-strings hold at most 255 octets: longer text is split.
                for chunk in [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]:
                    out.append(len(chunk))
                    out += chunk
            if len(out) > 0xFFFF:
                raise ValueError("TXT data longer than 65535 octets")
            return bytes(out)
    except ipaddress.AddressValueError as e:
        raise ValueError(f"bad address: {e}") from None
    raise ValueError("unsupported type")


def _u16(text: str) -> int:
    if not text.isdigit() or int(text) > 0xFFFF:
        raise ValueError(f"{text!r} is not a number from 0 to 65535")
    return int(text)


class LocalRecords:
    """Records answered without forwarding: configuration lines and hosts files.

    A record line is ``name [ttl] [IN] TYPE value...`` with TYPE one of A,
    AAAA, CNAME, PTR, NS, MX (preference, host), SRV (priority, weight, port,
    target), TXT (one or more strings, quoted when they hold spaces).  A hosts
    file line is an address and its names; the first name of an address also
    answers the reverse (PTR) lookup, as dnsmasq does.
    """

    def __init__(self, records: Iterable[str] = (), *, ttl: int = DEFAULT_TTL, where: str = "records") -> None:
        self.ttl = ttl
        # lowercased wire name -> type -> list of (ttl, rdata)
        self._names: dict[bytes, dict[int, list[tuple[int, bytes]]]] = {}
        for lineno, line in enumerate(records, 1):
            self.add_record(line, where=where, lineno=lineno)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: bytes) -> bool:
        return name.lower() in self._names

    def _add(self, name: bytes, rtype: int, ttl: int, rdata: bytes) -> None:
        types = self._names.setdefault(name, {})
        if rtype == wire.CNAME and (types.keys() - {wire.CNAME} or types.get(wire.CNAME)):
            raise ValueError("a CNAME must be the only record of its name")
        if rtype != wire.CNAME and wire.CNAME in types:
            raise ValueError("a name with a CNAME can hold no other record")
        rrs = types.setdefault(rtype, [])
        if all(rdata != old for _t, old in rrs):
            rrs.append((ttl, rdata))

    def add_record(self, line: str, *, where: str = "records", lineno: int = 1) -> None:
        """Add one record line; raise ``ValueError("<where>: line N: <problem>")``."""
        try:
            try:
                fields = shlex.split(line, comments=True)
            except ValueError as e:
                raise ValueError(f"{e}") from None
            if not fields:
                return
            if len(fields) < 3:
                raise ValueError("expected: name [ttl] [IN] TYPE value...")
            name = _name(fields[0])
            rest = fields[1:]
            ttl = self.ttl
            if rest[0].isdigit():
                ttl = int(rest[0])
                if ttl > 0x7FFFFFFF:
                    raise ValueError(f"TTL {ttl} too large")
                rest = rest[1:]
            if rest and rest[0].upper() == "IN":
                rest = rest[1:]
            if not rest:
                raise ValueError("missing record type")
            rtype = _TYPES.get(rest[0].upper())
            if rtype is None:
                raise ValueError(f"unsupported record type {rest[0]!r} (supported: {', '.join(_TYPES)})")
            self._add(name, rtype, ttl, _rdata(rtype, rest[1:]))
        except ValueError as e:
            raise ValueError(f"{where}: line {lineno}: {e}") from None

    def add_hosts(self, text: str, *, where: str = "hosts") -> None:
        """Add the entries of a hosts file's text (``address name [alias...]``, ``#`` comments)."""
        reversed_done: set[bytes] = set()
        for lineno, line in enumerate(text.splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            try:
                if len(fields) < 2:
                    raise ValueError("an address needs at least one name")
                try:
                    address = ipaddress.ip_address(fields[0])
                except ValueError:
                    raise ValueError(f"{fields[0]!r} is not an IP address") from None
                rtype = wire.A if address.version == 4 else wire.AAAA
                names = [_name(n) for n in fields[1:]]
                for name in names:
                    self._add(name, rtype, self.ttl, address.packed)
                rev = _reverse_name(address)
                if rev not in reversed_done and wire.PTR not in self._names.get(rev, {}):
                    self._add(rev, wire.PTR, self.ttl, wire.encode_name(fields[1]))
                    reversed_done.add(rev)
            except ValueError as e:
                raise ValueError(f"{where}: line {lineno}: {e}") from None

    def load_hosts(self, path: str) -> None:
        """Read a hosts file (configuration time); ValueError with the path on any problem."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
        self.add_hosts(text, where=path)

    def answer(self, query: Query, tcp: bool = False) -> bytes | None:
        """The authoritative reply for a name held here, or None to go on (forward).

        The records of the asked type (following local CNAMEs), or NODATA
        (NOERROR, no records) when the name is held without that type.
        """
        if query.qclass != wire.CLASS_IN and query.qclass != wire.CLASS_ANY:
            return None
        qname = query.key[:-4]
        types = self._names.get(qname)
        if types is None:
            return None
        qtype = query.qtype
        records: list[bytes] = []
        offsets: list[int] = []
        ttls: list[int] = []
        pos = 12 + len(qname) + 4
        owner = b"\xc0\x0c"  # the question name
        seen = {qname}
        for _ in range(MAX_CNAME_CHAIN):
            if qtype == wire.ANY:
                found = [(t, rr) for t, rrs in types.items() for rr in rrs]
            else:
                found = [(qtype, rr) for rr in types.get(qtype, ())]
                if not found and wire.CNAME in types:
                    found = [(wire.CNAME, rr) for rr in types[wire.CNAME]]
            target = None
            for rtype, (ttl, rdata) in found:
                offsets.append(pos + len(owner) + 4)
                ttls.append(ttl)
                records.append(owner + _RR.pack(rtype, wire.CLASS_IN, ttl, len(rdata)) + rdata)
                pos += len(records[-1])
                if rtype == wire.CNAME and qtype != wire.CNAME:
                    target = rdata.lower()
            if target is None or target in seen or target not in self._names:
                break
            seen.add(target)
            owner = target
            types = self._names[target]
        header = _HDR.pack(0, wire.QR | wire.AA | wire.RA, 1, len(records), 0, 0)
        body = header + query.key + b"".join(records)
        stored = Answer(body, tuple(offsets), min(ttls, default=self.ttl), wire.NOERROR, not records)
        return wire.reply_from_answer(stored, query, 0, tcp)


def parse_rules(spec: str) -> list[tuple[str, list[tuple[str, int]]]]:
    """Parse ``/domain[/domain...]/[address[#port]]``, dnsmasq's ``server=`` form.

    Each domain gets the address (port 53 unless given); with no address the
    domains are local only: never forwarded.  ValueError (one line) on bad input.
    """
    if not spec.startswith("/") or spec.count("/") < 2:
        raise ValueError(f"forwarding rule {spec!r}: expected /domain/address[#port]")
    parts = spec[1:].split("/")
    target = parts[-1].strip()
    domains = parts[:-1]
    servers: list[tuple[str, int]] = []
    if target:
        host, _, port_text = target.partition("#")
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise ValueError(f"forwarding rule {spec!r}: {host!r} is not an IP address") from None
        port = 53
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"forwarding rule {spec!r}: bad port {port_text!r}")
            port = int(port_text)
        servers.append((host, port))
    out = []
    for domain in domains:
        domain = domain.strip()
        if not domain:
            raise ValueError(f"forwarding rule {spec!r}: empty domain")
        try:
            wire.encode_name(domain)
        except ValueError as e:
            raise ValueError(f"forwarding rule {spec!r}: {e}") from None
        out.append((domain, list(servers)))
    return out


def parse_rule(spec: str) -> tuple[str, list[tuple[str, int]]]:
    """Parse one ``/domain/address[#port]`` rule (see :func:`parse_rules`)."""
    rules = parse_rules(spec)
    if len(rules) != 1:
        raise ValueError(f"forwarding rule {spec!r}: one domain per rule here")
    return rules[0]


class Forwarding:
    """Which upstreams serve a name: the longest matching rule domain, else the default.

    Domains match on label boundaries (``corp.example`` covers
    ``a.corp.example`` but not ``xcorp.example``); rules for the same domain
    add up; an empty upstream list means the domain is never forwarded.
    """

    def __init__(
        self, default: Iterable[tuple[str, int]], rules: Iterable[tuple[str, Iterable[tuple[str, int]]]] = ()
    ) -> None:
        self.default: tuple[tuple[str, int], ...] = tuple(default)
        self._rules: dict[bytes, tuple[tuple[str, int], ...]] = {}
        for domain, servers in rules:
            name = _name(domain)
            merged = self._rules.get(name, ()) + tuple(s for s in servers if s not in self._rules.get(name, ()))
            self._rules[name] = merged

    def upstreams_for(self, key_or_qname: bytes) -> tuple[tuple[str, int], ...]:
        """The upstreams for a wire name (a cache key works too: its tail is ignored).

        An empty tuple means: answer locally, do not forward.
        """
        rules = self._rules
        if not rules:
            return self.default
        name = key_or_qname.lower()
        try:
            end = _name_end(name)
        except IndexError:
            return self.default
        pos = 0
        while True:
            found = rules.get(name[pos:end])
            if found is not None:
                return found
            length = name[pos]
            if not length:
                return self.default
            pos += length + 1


def _name_end(name: bytes) -> int:
    """Offset just after the wire name at the start of ``name``."""
    pos = 0
    while name[pos]:
        pos += name[pos] + 1
    return pos + 1
