"""The cache store: byte budget, size-aware eviction, safe eviction while sending."""

from __future__ import annotations

from afpa.cache.store import FRAGMENT, OBJECT_OVERHEAD, CacheObject, CacheStore, fragments_of


def obj(key, size, now=0.0):
    return CacheObject(key, b"HTTP/1.1 200 OK\r\n", fragments_of(b"x" * size), size, now, now + 10)


def test_fragments_are_at_most_64k():
    frags = fragments_of(b"a" * (3 * FRAGMENT + 5))
    assert [len(f) for f in frags] == [FRAGMENT, FRAGMENT, FRAGMENT, 5]
    assert fragments_of(b"") == ()


def test_hit_stale_miss_counting():
    c = CacheStore(1 << 20, 1 << 20)
    c.put(obj("a", 10))
    assert c.get("a", 5) is not None and c.get("a", 11) is not None and c.get("b", 5) is None
    assert (c.hits, c.stale, c.misses, c.stored) == (1, 1, 1, 1)


def test_budget_is_kept_and_big_cold_objects_go_first():
    each = 1000 + OBJECT_OVERHEAD + len(b"HTTP/1.1 200 OK\r\n")
    c = CacheStore(budget=10 * each, max_object=1 << 20)
    for i in range(10):
        c.put(obj(f"small{i}", 1000))
    c.put(obj("big", 5000))          # needs room: some small objects go
    assert c.bytes <= c.budget and c.evicted >= 4 and "big" in c
    survivors = [f"small{i}" for i in range(10) if f"small{i}" in c]
    for _ in range(3):
        for key in survivors:
            c.get(key, 0)
    c.put(obj("big2", 5000))
    # The popular small objects stay; the big cold one pays for the newcomer.
    assert c.bytes <= c.budget
    assert "big" not in c and "big2" in c
    assert all(key in c for key in survivors)


def test_too_large_is_rejected():
    c = CacheStore(budget=10_000, max_object=1000)
    assert not c.put(obj("a", 2000))
    assert c.rejected == 1 and len(c) == 0


def test_replacing_a_key_frees_the_old_bytes():
    c = CacheStore(1 << 20, 1 << 20)
    c.put(obj("a", 100))
    c.put(obj("a", 200))
    assert len(c) == 1 and c.bytes == obj("a", 200).cost


def test_eviction_while_pinned_is_safe_and_accounted():
    c = CacheStore(1 << 20, 1 << 20)
    o = obj("a", 100)
    c.put(o)
    c.pin(o)
    c.remove("a")
    assert o.evicted and o.fragments[0] == b"x" * 100   # still sendable
    assert c.bytes == 0 and c.pinned_bytes == o.cost
    c.release(o)
    assert c.pinned_bytes == 0


def test_an_object_stored_again_is_evictable_and_accounted():
    c = CacheStore(budget=3 * obj("x", 1000).cost, max_object=1 << 20)
    a = obj("a", 1000)
    c.put(a)
    c.pin(a)
    c.put(a)                          # refreshed in place while being sent
    assert not a.evicted and c.pinned_bytes == 0
    c.release(a)
    for i in range(10):
        c.put(obj(f"k{i}", 1000))
        assert c.bytes <= c.budget
    assert "a" not in c and c.pinned_bytes == 0


def test_a_rejected_new_version_drops_the_old_one():
    c = CacheStore(budget=1 << 20, max_object=1000)
    c.put(obj("a", 500))
    assert not c.put(obj("a", 5000))
    assert "a" not in c and c.bytes == 0


def test_objects_over_one_fragment_are_stored_in_a_memory_file():
    """Stored, a multi-fragment payload moves to a sealed memory file (what the
    Send Engine's sendfile reads); the fragments become read-only views of it
    holding the same bytes, and the descriptor closes once the object is gone."""
    import gc
    import os

    from afpa.cache.store import MemFile

    store = CacheStore(1 << 30, 1 << 30)
    body = os.urandom(3 * FRAGMENT + 5)
    small = CacheObject("s", b"H", fragments_of(b"x" * FRAGMENT), FRAGMENT, 0, 1)
    big = CacheObject("b", b"H", fragments_of(body), len(body), 0, 1)
    gc.collect()  # memory files of earlier tests' objects
    before = MemFile.open
    store.put(small)
    store.put(big)
    assert small.file is None and small.fragments == (b"x" * FRAGMENT,)  # one fragment: plain bytes
    assert big.file is not None and MemFile.open == before + 1
    assert [len(f) for f in big.fragments] == [FRAGMENT, FRAGMENT, FRAGMENT, 5]
    assert b"".join(big.fragments) == body
    assert os.pread(big.file.fd, len(body) + 1, 0) == body
    assert big.fragments[0].readonly
    try:
        os.pwrite(big.file.fd, b"!", 0)
        written = True
    except OSError:
        written = False
    assert not written  # sealed: no one changes the bytes under a reader
    store.remove("b")
    del big
    gc.collect()
    assert MemFile.open == before


def test_without_a_memory_file_an_object_keeps_its_bytes(monkeypatch):
    """Past the descriptor share (or without memfd), objects are stored as they came."""
    import os

    from afpa.cache.store import MemFile

    monkeypatch.setattr(MemFile, "limit", MemFile.open)
    store = CacheStore(1 << 30, 1 << 30)
    body = os.urandom(2 * FRAGMENT + 1)
    obj = CacheObject("b", b"H", fragments_of(body), len(body), 0, 1)
    assert store.put(obj)
    assert obj.file is None and b"".join(obj.fragments) == body
    assert all(f.__class__ is bytes for f in obj.fragments)
