"""Sibling afpa instances sharing one cache: which member owns a key.

Every member is configured with the same ordered list of sibling addresses
(``siblings.members``) and its own index in it.  Each cache key has exactly one
*owner*, chosen by rendezvous (highest-random-weight) hashing: every member gets
a score ``H(member, key)`` and the highest score wins.  Every member computes
the same answer without talking to the others, and when a member joins or
leaves only the keys it wins or won move (about 1/N of them), unlike ``hash mod
N``, which moves almost every key.

The owner fetches and stores a key; the other members ask the owner (over its
sibling listener) instead of the origin, and store nothing of it, so N members
hold N budgets of distinct objects instead of N copies of the popular ones.

This module is protocol-neutral: a key is bytes, a member an address with a
backend connection pool.  A member that failed is skipped for ``retry_after``
seconds (its keys then go to the origin directly), so a dead or restarting
sibling costs one failed attempt, not one per request.
"""

from __future__ import annotations

from hashlib import blake2b
from collections import OrderedDict
from typing import Any

from routing.pool import Backend, BackendPool


def score(member: bytes, key: bytes) -> int:
    """The rendezvous weight of ``key`` at ``member``: stable across processes
    and machines (Python's own ``hash`` is salted per process)."""
    return int.from_bytes(blake2b(key, digest_size=8, key=member[:64]).digest(), "big")


def owner_index(members: tuple[bytes, ...], key: bytes) -> int:
    """The index of the member that owns ``key`` (highest score; ties, which
    need a 64-bit collision, go to the lower index)."""
    best, best_score = 0, -1
    for i, member in enumerate(members):
        s = score(member, key)
        if s > best_score:
            best, best_score = i, s
    return best


ASKED_KEYS = 65536  # keys whose asks are remembered for hot()


class Siblings:
    """This instance's view of its siblings: who owns what, a connection pool
    to each other member, and which are skipped after a failure."""

    def __init__(self, reactor: Any, members: tuple[str, ...], me: int, token: bytes, *,
                 connect_timeout: float = 1.0, retry_after: float = 2.0, max_idle: int = 256,
                 idle_timeout: float = 30.0, max_connections: int = 256, max_queue: int = 1024,
                 replica_after: int = 0):
        self.reactor = reactor
        # Hot keys get a local copy (see hot()): how many asks of the owner make a
        # key hot (0: never), and the recent asks per key, oldest first, bounded.
        self.replica_after = replica_after
        self.asked: OrderedDict[bytes, int] = OrderedDict()
        self.replicas = 0
        self.members = members
        self.ids = tuple(m.encode("ascii") for m in members)
        self.me = me
        self.token = token
        self.retry_after = retry_after
        self.down_until = [0.0] * len(members)
        self.forwarded = [0] * len(members)   # requests sent to each member as their owner
        self.fallbacks = [0] * len(members)   # of those, answered by the origin instead
        self.pools: list[BackendPool | None] = []
        for i, member in enumerate(members):
            if i == me:
                self.pools.append(None)
                continue
            host, _, port = member.rpartition(":")  # "host:port" or "[v6]:port", as config checked it
            self.pools.append(BackendPool(reactor, Backend(host.strip("[]"), int(port)), max_idle=max_idle,
                                          connect_timeout=connect_timeout, idle_timeout=idle_timeout,
                                          max_connections=max_connections, max_queue=max_queue))

    def owner(self, key: bytes) -> int:
        """The index of ``key``'s owner (may be this instance, :attr:`me`)."""
        return owner_index(self.ids, key)

    def pool_for(self, key: bytes, now: float, count: bool = False) -> BackendPool | None:
        """The pool of the sibling to ask for ``key``; None when this instance
        owns it or its owner is skipped after a recent failure (either way the
        request is served here as by a single afpa).  ``count``: the request
        goes there (counted in :meth:`status`)."""
        i = owner_index(self.ids, key)
        if i == self.me or self.down_until[i] > now:
            return None
        if count:
            self.forwarded[i] += 1
        return self.pools[i]

    def hot(self, key: bytes) -> bool:
        """Count one more ask of ``key``'s owner; True once it was asked
        ``replica_after`` times among the last :data:`ASKED_KEYS` keys asked: this
        instance then stores the owner's answer too (a replica), so a popular
        object is answered on every member's fast path while the long tail stays
        held once, by its owner."""
        if not self.replica_after:
            return False
        asked = self.asked
        n = asked.pop(key, 0) + 1
        if n >= self.replica_after:
            self.replicas += 1
            return True
        asked[key] = n
        if len(asked) > ASKED_KEYS:
            asked.popitem(last=False)
        return False

    def failed(self, pool: BackendPool, now: float, down: bool) -> None:
        """A request to ``pool``'s member got no answer and went to the origin;
        ``down``: the member looks gone (not merely busy), skip it for a while."""
        i = self.pools.index(pool)
        self.fallbacks[i] += 1
        if down:
            self.down_until[i] = now + self.retry_after

    def sweep(self, now: float) -> None:
        """Expire idle connections to siblings."""
        for pool in self.pools:
            if pool is not None:
                pool.sweep(now)

    def status(self, now: float) -> list[dict[str, Any]]:
        """One JSON-able entry per member (for the admin API and tests)."""
        return [{"member": m, "self": i == self.me, "down": self.down_until[i] > now,
                 "forwarded": self.forwarded[i], "fallbacks": self.fallbacks[i]}
                for i, m in enumerate(self.members)]
