"""Which peers are trusted proxies (protocol-neutral).

A protocol module asks :meth:`TrustedProxies.trusts` about the address of the
peer that sent a message before believing what the message says about where it
came from (HTTP's ``X-Forwarded-For``, a trace header, ...).  Nobody is trusted
unless configured, and that common case costs one test.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


class TrustedProxies:
    """A set of addresses and networks; ``trusts(host)`` says whether a peer is in it."""

    __slots__ = ("networks", "_exact", "_ranges")

    def __init__(self, entries: Iterable[str] = ()):
        self.networks = tuple(ipaddress.ip_network(e) for e in entries)
        # Single addresses (the usual "127.0.0.1" or "::1") are matched as
        # strings; only real ranges need the address parsed.
        self._exact = frozenset(str(n.network_address) for n in self.networks
                                if n.num_addresses == 1)
        self._ranges = tuple(n for n in self.networks if n.num_addresses > 1)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, host: str) -> bool:
        """True when ``host`` (an IP address as text) is a configured trusted proxy."""
        if not self.networks:
            return False
        if host in self._exact:
            return True
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False  # not an IP address (a UNIX socket, say): never trusted
        mapped = getattr(addr, "ipv4_mapped", None)
        if mapped is not None:
            # An IPv4 client accepted on a dual-stack socket: judge its IPv4 address.
            addr = mapped
            if str(addr) in self._exact:
                return True
        elif str(addr) in self._exact:  # another spelling of a listed IPv6 address
            return True
        return any(addr in net for net in self._ranges)
