"""The runtime's memory cache: cache objects and a byte-budgeted store.

A :class:`CacheObject` (AFPA paper, section 3.4) keeps its status line and
*immutable* headers already serialized, so a hit costs no header formatting
beyond the few mutable fields (Date, Age, Connection) added at send time.  The
payload is a tuple of fragments of at most 64 KiB that the Send Engine hands to
the socket as they are.

The store evicts by Greedy-Dual-Size-Frequency: an object's priority is
``L + (1 + hits) / cost``, the victim is the lowest priority and ``L`` rises to
the victim's priority, so small popular objects stay and large cold ones go
first while old popularity ages out.  A hit only bumps ``obj.hits`` (one integer
add on the fast path); priorities are brought up to date lazily when an entry
reaches the top of the heap.  ``bench/cache_policy.py`` measures its hit ratio
against LRU on a skewed trace.

Objects being sent are pinned (``refs``); evicting one only unlinks it from the
index, the Send Engine keeps its reference until the last fragment is written,
and its bytes are reported as ``pinned_bytes`` until then.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Any

import attrs

FRAGMENT = 64 * 1024
OBJECT_OVERHEAD = 256  # bytes charged per object for its bookkeeping


def fragments_of(data: bytes) -> tuple[bytes, ...]:
    """Split a payload into fragments of at most 64 KiB."""
    if len(data) <= FRAGMENT:
        return (data,) if data else ()
    return tuple(data[i:i + FRAGMENT] for i in range(0, len(data), FRAGMENT))


@attrs.define(slots=True, eq=False)
class CacheObject:
    """One cached response.

    ``head``: status line and immutable header lines, each ending in CRLF, without
    the blank line that ends a head.  ``short_head``: the same for a body-less
    "not modified" answer.  ``identity``: whatever the module uses to tell whether
    the origin still has this version (for files: device, inode, size, mtime).
    """

    key: Hashable
    head: bytes
    fragments: tuple[bytes, ...]
    size: int
    stored_at: float
    fresh_until: float
    short_head: bytes = b""
    etag: bytes | None = None
    last_modified: int | None = None
    identity: Any = None
    hits: int = 0
    refs: int = 0
    evicted: bool = False
    cost: int = 0

    def __attrs_post_init__(self) -> None:
        self.cost = len(self.head) + len(self.short_head) + self.size + OBJECT_OVERHEAD


class CacheStore:
    """Key -> :class:`CacheObject` under a byte budget."""

    def __init__(self, budget: int, max_object: int):
        self.budget = budget
        self.max_object = max_object
        self._index: dict[Hashable, CacheObject] = {}
        self._heap: list[tuple[float, int, CacheObject, int]] = []
        self._seq = itertools.count()
        self._inflation = 0.0  # GDSF's L
        self.bytes = 0
        self.pinned_bytes = 0
        self.hits = self.misses = self.stale = self.stored = self.evicted = self.rejected = 0

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._index

    def get(self, key: Hashable, now: float) -> CacheObject | None:
        """Look up ``key``; counts a hit, a stale hit or a miss.  Returns stale objects
        too: the caller decides whether to revalidate."""
        obj = self._index.get(key)
        if obj is None:
            self.misses += 1
        elif obj.fresh_until >= now:
            self.hits += 1
            obj.hits += 1
        else:
            self.stale += 1
        return obj

    def _priority(self, obj: CacheObject) -> float:
        return self._inflation + (1 + obj.hits) / obj.cost

    def put(self, obj: CacheObject) -> bool:
        """Store ``obj`` (replacing any object under its key), evicting as needed.
        Returns False when the object can never fit."""
        self.remove(obj.key)  # a newer version replaces it, stored or not
        if obj.size > self.max_object or obj.cost > self.budget:
            self.rejected += 1
            return False
        if obj.evicted:
            # Stored again after an eviction: it counts as cached, not pinned.
            if obj.refs:
                self.pinned_bytes -= obj.cost
            obj.evicted = False
        while self.bytes + obj.cost > self.budget and self._evict_one():
            pass
        self._index[obj.key] = obj
        self.bytes += obj.cost
        heapq.heappush(self._heap, (self._priority(obj), next(self._seq), obj, obj.hits))
        self.stored += 1
        return True

    def _evict_one(self) -> bool:
        while self._heap:
            prio, _, obj, hits_then = heapq.heappop(self._heap)
            if obj.evicted or self._index.get(obj.key) is not obj:
                continue  # removed or replaced since it was pushed
            if obj.hits != hits_then:
                # Hit since it was pushed: requeue with an up-to-date priority.
                heapq.heappush(self._heap, (self._priority(obj), next(self._seq), obj, obj.hits))
                continue
            self._inflation = prio
            self._unlink(obj)
            self.evicted += 1
            return True
        return False

    def _unlink(self, obj: CacheObject) -> None:
        del self._index[obj.key]
        self.bytes -= obj.cost
        obj.evicted = True
        if obj.refs:
            self.pinned_bytes += obj.cost
        if len(self._heap) > 4 * len(self._index) + 64:
            # Drop dead heap entries so the heap stays proportional to the index.
            self._heap = [e for e in self._heap if not e[2].evicted]
            heapq.heapify(self._heap)

    def remove(self, key: Hashable) -> None:
        """Forget the object under ``key`` (if any); safe while it is being sent."""
        obj = self._index.get(key)
        if obj is not None:
            self._unlink(obj)

    def pin(self, obj: CacheObject) -> None:
        """Mark ``obj`` as being sent."""
        if obj.evicted and not obj.refs:
            self.pinned_bytes += obj.cost
        obj.refs += 1

    def release(self, obj: CacheObject) -> None:
        """The send of ``obj`` finished or was aborted."""
        obj.refs -= 1
        if obj.refs == 0 and obj.evicted:
            self.pinned_bytes -= obj.cost
