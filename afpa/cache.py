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

An object's ``cost`` is everything it keeps alive: key, heads, payload and a
measured per-object overhead, so the budget bounds memory, not just payload.
Responses read or collected for storing but not yet stored are *in flight*:
they are reserved against a second bound (:meth:`CacheStore.reserve`, the same
size as the budget, shared with pinned bytes), and whoever cannot reserve
streams or relays without storing instead of holding the response in memory.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
from collections.abc import Callable, Hashable
from typing import Any

import attrs

FRAGMENT = 64 * 1024
# Bytes charged per object beyond its key, heads and payload.  Measured with
# tracemalloc over 20,000 stored objects (a CacheObject with an ETag, an identity
# tuple and one fragment, its key tuple, the index dict slot and a heap entry):
# 816 bytes each on CPython 3.12 (the object 152, six bytes headers 33 each,
# key tuple 56, heap entry tuple and numbers ~140, dict slot ~100, the rest
# ETag/identity/floats).  Rounded up to leave room for a dead heap entry.
OBJECT_OVERHEAD = 1024
FRAGMENT_OVERHEAD = 48  # a bytes object's header (33) plus its slot in the tuple
# Bytes charged per surrogate key (tag) of an object, beyond the tag's own
# length: the tag's bytes header and tuple slot, and its share of the tag index
# (a dict slot and a set, which is the whole set for a tag only one object has).
# Measured with tracemalloc: about 330 bytes per unique tag on CPython 3.12.
TAG_OVERHEAD = 384


def key_bytes(key: Hashable) -> int:
    """Bytes a key holds: the lengths of its bytes/str parts (tuples of them too)."""
    if isinstance(key, tuple):
        return sum(len(p) for p in key if isinstance(p, (bytes, str)))
    if isinstance(key, (bytes, str)):
        return len(key)
    return 0


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
    meta: Any = None        # the protocol module's own caching facts; the store never reads them
    tags: tuple = ()        # surrogate keys (purge by tag)
    hits: int = 0
    refs: int = 0
    evicted: bool = False
    cost: int = 0
    heap_seq: int = -1

    def __attrs_post_init__(self) -> None:
        self.cost = (len(self.head) + len(self.short_head) + self.size + key_bytes(self.key)
                     + OBJECT_OVERHEAD + FRAGMENT_OVERHEAD * len(self.fragments) + _tags_cost(self.tags))

    def set_tags(self, tags: tuple) -> None:
        """Give the object its surrogate keys (and charge them) before it is stored:
        the store indexes an object's tags when it is put."""
        self.cost += _tags_cost(tags) - _tags_cost(self.tags)
        self.tags = tags


def _tags_cost(tags: tuple) -> int:
    return sum(TAG_OVERHEAD + key_bytes(t) for t in tags) if tags else 0


class CacheStore:
    """Key -> :class:`CacheObject` under a byte budget."""

    def __init__(self, budget: int, max_object: int):
        self.budget = budget
        self.max_object = max_object
        self._index: dict[Hashable, CacheObject] = {}
        # Heap entries name the key, not the object, so an entry left behind by a
        # removed or replaced object does not keep that object's payload alive.
        self._heap: list[tuple[float, int, Hashable, int]] = []
        self._seq = itertools.count()
        self._inflation = 0.0  # GDSF's L
        # Tag -> keys of the stored objects that carry it; entries come and go with
        # the objects (put/_unlink), so it never outgrows what it indexes.
        self._tags: dict[Hashable, set[Hashable]] = {}
        self.bytes = 0
        self.pinned_bytes = 0
        self.inflight_bytes = 0
        self.inflight_limit = budget
        # Reservations are made from helper threads too (a file read whole).
        self._inflight_lock = threading.Lock()
        self.hits = self.misses = self.stale = self.stored = self.evicted = self.rejected = 0
        self.purged = {"purge": 0, "ban": 0, "tag": 0}  # objects affected, by operation

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
            if not obj.evicted:
                obj.evicted = True  # not in the index: counted as pinned while sent
                if obj.refs:
                    self.pinned_bytes += obj.cost
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
        for tag in obj.tags:
            self._tags.setdefault(tag, set()).add(obj.key)
        self._push(obj)
        self.stored += 1
        return True

    def _push(self, obj: CacheObject) -> None:
        seq = obj.heap_seq = next(self._seq)
        heapq.heappush(self._heap, (self._priority(obj), seq, obj.key, obj.hits))

    def _evict_one(self) -> bool:
        while self._heap:
            prio, seq, key, hits_then = heapq.heappop(self._heap)
            obj = self._index.get(key)
            if obj is None or obj.heap_seq != seq:
                continue  # removed or replaced since it was pushed
            if obj.hits != hits_then:
                # Hit since it was pushed: requeue with an up-to-date priority.
                self._push(obj)
                continue
            self._inflation = prio
            self._unlink(obj)
            self.evicted += 1
            return True
        return False

    def _unlink(self, obj: CacheObject) -> None:
        del self._index[obj.key]
        self.bytes -= obj.cost
        for tag in obj.tags:
            keys = self._tags.get(tag)
            if keys is not None:
                keys.discard(obj.key)
                if not keys:
                    del self._tags[tag]
        obj.evicted = True
        if obj.refs:
            self.pinned_bytes += obj.cost
        if len(self._heap) > 2 * len(self._index) + 64:
            # Drop dead heap entries so the heap stays proportional to the index.
            index = self._index
            self._heap = [e for e in self._heap
                          if (o := index.get(e[2])) is not None and o.heap_seq == e[1]]
            heapq.heapify(self._heap)

    def remove(self, key: Hashable) -> None:
        """Forget the object under ``key`` (if any); safe while it is being sent."""
        obj = self._index.get(key)
        if obj is not None:
            self._unlink(obj)

    # -- invalidation (purge, ban, tags) ----------------------------------------

    def purge(self, key: Hashable, *, soft: bool = False, now: float = 0.0) -> int:
        """Purge what is stored under ``key``; returns how many objects that was.
        ``soft``: mark it stale as of ``now`` and keep it (for revalidation and
        grace) instead of removing it."""
        n = self._invalidate(key, soft, now)
        self.purged["purge"] += n
        return n

    def purge_where(self, predicate: Callable[[Hashable], bool], *, soft: bool = False,
                    now: float = 0.0) -> int:
        """Ban: purge every stored key for which ``predicate(key)`` is true (the
        protocol module builds the predicate; keys are opaque here).  One pass
        over the index."""
        n = sum(self._invalidate(key, soft, now) for key in [k for k in self._index if predicate(k)])
        self.purged["ban"] += n
        return n

    def purge_tag(self, tag: Hashable, *, soft: bool = False, now: float = 0.0) -> int:
        """Purge every object stored with surrogate key ``tag``."""
        n = sum(self._invalidate(key, soft, now) for key in list(self._tags.get(tag, ())))
        self.purged["tag"] += n
        return n

    def _invalidate(self, key: Hashable, soft: bool, now: float) -> int:
        # The one place purge, ban and tag purge reach stored objects: whatever a
        # key holds (one object today; several variants later) is visited here.
        obj = self._index.get(key)
        if obj is None:
            return 0
        if soft:
            # Just before now, so a lookup at this very instant already finds it
            # stale while grace windows measured from fresh_until stay whole.
            obj.fresh_until = min(obj.fresh_until, math.nextafter(now, -math.inf))
        else:
            self._unlink(obj)
        return 1

    def tagged(self, tag: Hashable) -> int:
        """How many stored objects carry ``tag``."""
        return len(self._tags.get(tag, ()))

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

    # -- responses in flight --------------------------------------------------

    def reserve(self, n: int) -> bool:
        """Reserve ``n`` bytes for a response held in memory before it is stored
        (a file read whole, a backend response collected).  False when the bytes
        in flight plus the pinned bytes would pass ``inflight_limit``: the caller
        then streams or relays without storing.  Safe from any thread."""
        with self._inflight_lock:
            if self.inflight_bytes + self.pinned_bytes + n > self.inflight_limit:
                return False
            self.inflight_bytes += n
            return True

    def unreserve(self, n: int) -> None:
        """Give back a reservation (the response was stored or dropped)."""
        if n:
            with self._inflight_lock:
                self.inflight_bytes -= n
