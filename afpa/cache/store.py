"""The runtime's memory cache: cache objects and a byte-budgeted store.

A :class:`CacheObject` (AFPA paper, section 3.4) keeps its status line and
*immutable* headers already serialized, so a hit costs no header formatting
beyond the few mutable fields (Date, Age, Connection) added at send time.  The
payload is a tuple of fragments of at most 64 KiB that the Send Engine hands to
the socket as they are.  A stored payload of more than one fragment moves to a
sealed memory file (memfd) and its fragments become read-only views of it: the
Send Engine sends such a body with ``sendfile``, which spares the kernel copying
it into the socket.

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

Variants: one key may hold several objects, told apart by a *secondary key*
the protocol computes from the request (HTTP's Vary).  The index maps a key to
its :class:`CacheObject` when the key has one plain object (the common case, so
a lookup costs one class check more), or to a :class:`Variants` container of
objects by secondary key.  The store never interprets a secondary key or the
container's ``selector`` (what the protocol needs to compute one); each variant
is a full object with its own cost, priority and eviction.
"""

from __future__ import annotations

import heapq
import itertools
import math
import mmap
import os
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


# Objects larger than one fragment keep their payload in an anonymous memory
# file (memfd) whose pages the Send Engine hands to the socket with sendfile:
# the kernel takes references to the pages instead of copying the bytes (the
# copy was ~40% of the server's CPU on a 1 MiB hit).  Each holds a descriptor,
# so at most this share of the process's descriptor limit is spent on them;
# past it, objects keep plain bytes.
MEMFILE_FD_SHARE = 4
MEMFILE_MAX = 4096


def _memfile_limit() -> int:
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 0
    if soft == resource.RLIM_INFINITY:
        return MEMFILE_MAX
    return min(MEMFILE_MAX, soft // MEMFILE_FD_SHARE)


class MemFile:
    """A stored payload's bytes in an anonymous memory file (memfd), sealed
    against change; its descriptor closes when the last holder lets go (the
    object, a sender of it).  The object's fragments are read-only views of the
    file's mapping, so the bytes are held once."""

    __slots__ = ("fd", "__weakref__")
    open = 0  # memory files alive in this process
    limit = _memfile_limit()

    def __init__(self, fd: int):
        self.fd = fd
        MemFile.open += 1

    def __del__(self) -> None:
        MemFile.open -= 1
        os.close(self.fd)


def memfile_of(fragments: tuple, size: int) -> tuple[MemFile, tuple[memoryview, ...]] | None:
    """``fragments`` (``size`` bytes) copied into a new :class:`MemFile`, with
    read-only views of it cut as the fragments were; None when no memory file
    can be had (no memfd on this system, the descriptor share spent, an error):
    then the caller keeps the bytes."""
    if size <= 0 or MemFile.open >= MemFile.limit or not hasattr(os, "memfd_create"):
        return None
    try:
        fd = os.memfd_create("afpa-object", os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0))
    except OSError:
        return None
    mf = MemFile(fd)  # closes fd if anything below fails
    try:
        bufs = list(fragments)
        while bufs:
            n = os.writev(fd, bufs)
            while bufs and n >= len(bufs[0]):
                n -= len(bufs.pop(0))
            if n:
                bufs[0] = memoryview(bufs[0])[n:]
        _seal(fd)  # before mapping: a shared mapping would make the write seal fail
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        return None
    view = memoryview(mm)
    return mf, tuple(view[i:i + FRAGMENT] for i in range(0, size, FRAGMENT))


def _seal(fd: int) -> None:
    # The bytes never change once stored: sealed, no one (a forked worker
    # included) can write or resize them under a reader.
    try:
        import fcntl
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    except (ImportError, AttributeError, OSError):
        pass


def key_bytes(key: Hashable) -> int:
    """Bytes a key holds: the lengths of its bytes/str parts (tuples of them too)."""
    if isinstance(key, tuple):
        return sum(key_bytes(p) for p in key)
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
    ``file``: the payload's :class:`MemFile` once the store put it there (objects
    larger than one fragment); the fragments are then views of it.
    """

    key: Hashable
    head: bytes
    fragments: tuple[bytes | memoryview, ...]
    size: int
    stored_at: float
    fresh_until: float
    short_head: bytes = b""
    etag: bytes | None = None
    last_modified: int | None = None
    identity: Any = None
    meta: Any = None        # the protocol module's own caching facts; the store never reads them
    tags: tuple = ()        # surrogate keys (purge by tag)
    secondary: Hashable = None  # its secondary key when stored as a variant (see Variants)
    hits: int = 0
    refs: int = 0
    evicted: bool = False
    cost: int = 0
    heap_seq: int = -1
    file: MemFile | None = None

    def __attrs_post_init__(self) -> None:
        self.cost = (len(self.head) + len(self.short_head) + self.size + key_bytes(self.key)
                     + key_bytes(self.secondary)
                     + OBJECT_OVERHEAD + FRAGMENT_OVERHEAD * len(self.fragments) + _tags_cost(self.tags))

    def set_tags(self, tags: tuple) -> None:
        """Give the object its surrogate keys (and charge them) before it is stored:
        the store indexes an object's tags when it is put."""
        self.cost += _tags_cost(tags) - _tags_cost(self.tags)
        self.tags = tags


def _tags_cost(tags: tuple) -> int:
    return sum(TAG_OVERHEAD + key_bytes(t) for t in tags) if tags else 0


@attrs.define(slots=True, eq=False)
class Variants:
    """The objects stored under one key, by secondary key.  ``selector`` is the
    protocol's recipe for a request's secondary key (for HTTP, the Vary field
    names); variants stored with another selector were dropped when it changed."""

    selector: Any
    objects: dict = attrs.field(factory=dict)


class CacheStore:
    """Key -> :class:`CacheObject` (or :class:`Variants`) under a byte budget."""

    def __init__(self, budget: int, max_object: int):
        self.budget = budget
        self.max_object = max_object
        self._index: dict[Hashable, CacheObject | Variants] = {}
        # Heap entries name the key (and secondary key), not the object, so an
        # entry left behind by a removed or replaced object does not keep that
        # object's payload alive.
        self._heap: list[tuple[float, int, Hashable, Hashable, int]] = []
        self.objects = 0  # stored objects, every variant counted
        self._seq = itertools.count()
        self._inflation = 0.0  # GDSF's L
        # Tag -> (key, secondary key) of the stored objects that carry it; entries
        # come and go with the objects (put/_unlink), so it never outgrows what it
        # indexes, and a tag on one variant never purges its siblings.
        self._tags: dict[Hashable, set[tuple[Hashable, Hashable]]] = {}
        self.bytes = 0
        self.pinned_bytes = 0
        self.inflight_bytes = 0
        self.inflight_limit = budget
        # Reservations are made from helper threads too (a file read whole).
        self._inflight_lock = threading.Lock()
        self.hits = self.misses = self.stale = self.stored = self.evicted = self.rejected = 0
        self.purged = {"purge": 0, "ban": 0, "tag": 0}  # objects affected, by operation

    def __len__(self) -> int:
        return self.objects

    def __contains__(self, key: Hashable) -> bool:
        return key in self._index

    def get(self, key: Hashable, now: float) -> CacheObject | Variants | None:
        """Look up ``key``; counts a hit, a stale hit or a miss.  Returns stale objects
        too: the caller decides whether to revalidate.  A :class:`Variants` is not
        counted yet: the caller picks the variant with :meth:`select`."""
        obj = self._index.get(key)
        if obj is None:
            self.misses += 1
        elif obj.__class__ is Variants:
            return obj
        elif obj.fresh_until >= now:
            self.hits += 1
            obj.hits += 1
        else:
            self.stale += 1
        return obj

    def select(self, variants: Variants, secondary: Hashable, now: float) -> CacheObject | None:
        """The variant stored under ``secondary`` (counted like :meth:`get`)."""
        obj = variants.objects.get(secondary)
        if obj is None:
            self.misses += 1
        elif obj.fresh_until >= now:
            self.hits += 1
            obj.hits += 1
        else:
            self.stale += 1
        return obj

    def _lookup(self, key: Hashable, secondary: Hashable) -> CacheObject | None:
        entry = self._index.get(key)
        if entry is None or entry.__class__ is not Variants:
            return entry if secondary is None else None
        return entry.objects.get(secondary) if secondary is not None else None

    def _priority(self, obj: CacheObject) -> float:
        return self._inflation + (1 + obj.hits) / obj.cost

    def put(self, obj: CacheObject, selector: Any = None) -> bool:
        """Store ``obj`` (replacing any object under its key), evicting as needed.
        Returns False when the object can never fit.

        With ``obj.secondary`` set it is stored as a variant: it replaces only
        the variant with the same secondary key (and a plain object under the
        key); the other variants stay if ``selector`` is the one they were
        stored with, else they go."""
        # A newer version replaces the old one, stored or not.
        entry = self._index.get(obj.key)
        if obj.secondary is None or entry is None or entry.__class__ is not Variants \
                or entry.selector != selector:
            self.remove(obj.key)
        else:
            old = entry.objects.get(obj.secondary)
            if old is not None:
                self._unlink(old)
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
        if obj.file is None and obj.size > FRAGMENT:
            moved = memfile_of(obj.fragments, obj.size)
            if moved is not None:
                obj.file, obj.fragments = moved
        if obj.secondary is None:
            self._index[obj.key] = obj
        else:
            entry = self._index.get(obj.key)
            if entry is None:
                entry = self._index[obj.key] = Variants(selector)
            entry.objects[obj.secondary] = obj
        self.objects += 1
        self.bytes += obj.cost
        for tag in obj.tags:
            self._tags.setdefault(tag, set()).add((obj.key, obj.secondary))
        self._push(obj)
        self.stored += 1
        return True

    def _push(self, obj: CacheObject) -> None:
        seq = obj.heap_seq = next(self._seq)
        heapq.heappush(self._heap, (self._priority(obj), seq, obj.key, obj.secondary, obj.hits))

    def resize(self, budget: int, max_object: int) -> int:
        """Take a new byte budget and object size limit (a configuration reload);
        evict until the objects fit.  Returns the number of objects evicted."""
        with self._inflight_lock:
            self.budget = self.inflight_limit = budget
        self.max_object = max_object
        before = self.evicted
        while self.bytes > self.budget and self._evict_one():
            pass
        return self.evicted - before

    def _evict_one(self) -> bool:
        while self._heap:
            prio, seq, key, secondary, hits_then = heapq.heappop(self._heap)
            obj = self._lookup(key, secondary)
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
        if obj.secondary is None:
            del self._index[obj.key]
        else:
            entry = self._index[obj.key]
            del entry.objects[obj.secondary]
            if not entry.objects:
                del self._index[obj.key]
        self.objects -= 1
        self.bytes -= obj.cost
        for tag in obj.tags:
            stored = self._tags.get(tag)
            if stored is not None:
                stored.discard((obj.key, obj.secondary))
                if not stored:
                    del self._tags[tag]
        obj.evicted = True
        if obj.refs:
            self.pinned_bytes += obj.cost
        if len(self._heap) > 2 * self.objects + 64:
            # Drop dead heap entries so the heap stays proportional to the index.
            lookup = self._lookup
            self._heap = [e for e in self._heap
                          if (o := lookup(e[2], e[3])) is not None and o.heap_seq == e[1]]
            heapq.heapify(self._heap)

    def remove(self, key: Hashable) -> None:
        """Forget the object (every variant) under ``key``; safe while being sent."""
        entry = self._index.get(key)
        if entry is None:
            return
        if entry.__class__ is Variants:
            for obj in list(entry.objects.values()):
                self._unlink(obj)
        else:
            self._unlink(entry)

    def discard(self, obj: CacheObject) -> None:
        """Forget ``obj`` alone (one variant), if it is still the stored one."""
        if not obj.evicted and self._lookup(obj.key, obj.secondary) is obj:
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
        n = 0
        for key, secondary in list(self._tags.get(tag, ())):
            obj = self._lookup(key, secondary)
            if obj is not None:
                n += self._invalidate_one(obj, soft, now)
        self.purged["tag"] += n
        return n

    def _invalidate(self, key: Hashable, soft: bool, now: float) -> int:
        # Purge and ban reach stored objects here: whatever a key holds (one
        # object, or every variant) is visited.
        entry = self._index.get(key)
        if entry is None:
            return 0
        if entry.__class__ is Variants:
            return sum(self._invalidate_one(obj, soft, now) for obj in list(entry.objects.values()))
        return self._invalidate_one(entry, soft, now)

    def _invalidate_one(self, obj: CacheObject, soft: bool, now: float) -> int:
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
