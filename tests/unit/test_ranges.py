"""protocols/http/policy/ranges.py: byte ranges with the examples of RFC 9110 section 14."""

from __future__ import annotations

import pytest

from afpa.cache.store import fragments_of
from protocols.http.policy import ranges
from protocols.http.wire.responses import http_date, object_heads

LEN = 10000  # the representation length RFC 9110 14.1.2 examples assume

# RFC 9110 14.1.2 "Examples of byte-ranges-specifier values", against 10000 bytes.
RFC_EXAMPLES = [
    ("bytes=0-499", [(0, 500)]),                     # the first 500 bytes
    ("bytes=500-999", [(500, 1000)]),                # the second 500 bytes
    ("bytes=-500", [(9500, 10000)]),                 # the final 500 bytes
    ("bytes=9500-", [(9500, 10000)]),                # the final 500 bytes
    ("bytes=0-0,-1", [(0, 1), (9999, 10000)]),       # the first and last bytes only
    ("bytes= 0-999, 4500-5499, -1000", [(0, 1000), (4500, 5500), (9000, 10000)]),
    # "Other valid (but not canonical) specifications of the second 500 bytes":
    ("bytes=500-600,601-999", [(500, 1000)]),
    ("bytes=500-700,601-999", [(500, 1000)]),
]


@pytest.mark.parametrize("value,expected", RFC_EXAMPLES)
def test_rfc_9110_examples(value, expected):
    assert ranges.select(value.encode(), LEN) == expected


@pytest.mark.parametrize("value,expected", [
    ("bytes=0-", [(0, LEN)]),
    ("bytes=0-99999", [(0, LEN)]),                  # last-pos past the end: up to the end (14.1.2)
    ("bytes=-20000", [(0, LEN)]),                   # suffix longer than the representation: all of it
    ("bytes=9999-9999", [(9999, LEN)]),
    ("BYTES=1-2", [(1, 3)]),                          # range units compare case-insensitively
    ("bytes=1-2 , ,\t 5000-5001", [(1, 3), (5000, 5002)]),  # OWS and empty list elements
    ("bytes=5000-5001,1-2", [(5000, 5002), (1, 3)]),  # the client's order is kept
    ("bytes=5000-5001,1-2,10-20", [(1, 21), (5000, 5002)]),  # coalesced (near): sorted
    ("bytes=0-99999999999999999999999999", [(0, LEN)]),  # huge numerals do not overflow
    ("bytes=10000-,0-0", [(0, 1)]),                 # the unsatisfiable one is left out
])
def test_resolve(value, expected):
    assert ranges.select(value.encode(), LEN) == expected


@pytest.mark.parametrize("value", [
    "bytes=10000-", "bytes=20000-30000", "bytes=-0", "bytes=10000-,-0",
    "bytes=99999999999999999999999999-",
])
def test_unsatisfiable(value):
    """None satisfiable: 416 (RFC 9110 14.1.1, 15.5.17)."""
    assert ranges.select(value.encode(), LEN) == []


@pytest.mark.parametrize("value", [
    "items=0-5",            # a unit we do not know: ignored (14.2)
    "bytes 0-5", "bytes=", "bytes=-", "bytes=,", "bytes=abc", "bytes=5-1",  # last < first: invalid
    "bytes=0-1;x", "bytes=0 -1", "bytes=0-1,bytes=3-4", "bytes=+1-2", "bytes=1-2-3",
    "bytes=" + ",".join(f"{i * 100}-{i * 100 + 1}" for i in range(17)),  # too many ranges
])
def test_ignored(value):
    """Invalid or refused: None, the whole representation is sent (200)."""
    assert ranges.select(value.encode(), LEN) is None


def test_sixteen_ranges_are_served_and_never_amplified():
    value = ("bytes=" + ",".join(f"{i * 100}-{i * 100 + 1}" for i in range(16))).encode()
    assert len(ranges.select(value, LEN)) == 16
    # The same bytes asked for 16 times are sent once.
    assert ranges.select(b"bytes=" + b",".join([b"0-9999"] * 16), LEN) == [(0, LEN)]
    assert ranges.select(b"bytes=" + b",".join([b"-10000"] * 16), LEN) == [(0, LEN)]


def test_empty_representation_ignores_range():
    assert ranges.select(b"bytes=0-10", 0) is None


def test_content_range_rfc_14_4():
    assert ranges.content_range(42, 1234, 1234) == b"bytes 42-1233/1234"
    assert ranges.content_range(0, 1, 10) == b"bytes 0-0/10"


ETAG = b'"abc-12"'
LM = 1_700_000_000


@pytest.mark.parametrize("value,holds", [
    (b'"abc-12"', True),
    (b' "abc-12" ', True),
    (b'"abc-13"', False),
    (b'W/"abc-12"', False),               # weak: never for If-Range (13.1.5)
    (http_date(LM), True),                # exactly the Last-Modified date
    (http_date(LM + 1), False),
    (http_date(LM - 1), False),
    (b"not a date", False),
    (b'"abc-12", "x"', False),
])
def test_if_range(value, holds):
    assert ranges.if_range_holds(value, ETAG, LM) is holds


def test_if_range_without_validators():
    assert not ranges.if_range_holds(b'"abc-12"', None, None)
    assert not ranges.if_range_holds(http_date(LM), ETAG, None)
    assert not ranges.if_range_holds(b'"W/x"', b'W/"x"', None)


def test_slice_fragments_copies_nothing():
    data = bytes(range(256)) * 1024  # 256 KiB: four fragments
    frags = fragments_of(data)
    for start, stop in [(0, len(data)), (0, 1), (65535, 65537), (65536, 131072), (100, 200000),
                        (len(data) - 1, len(data)), (131072, 196608 + 5)]:
        pieces = ranges.slice_fragments(frags, start, stop)
        assert b"".join(pieces) == data[start:stop]
        assert all(isinstance(p, memoryview) or any(p is f for f in frags) for p in pieces)
    assert ranges.slice_fragments(frags, 65536, 131072) == [frags[1]]


def test_single_head():
    head, _ = object_heads(200, b"text/plain", 10000, LM, ETAG)
    out = ranges.single_head(head, 500, 1000, 10000)
    lines = out.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 206 Partial Content"
    assert b"Content-Length: 500" in lines and b"Content-Range: bytes 500-999/10000" in lines
    assert b"Content-Length: 10000" not in lines
    assert b"ETag: " + ETAG in lines and b"Content-Type: text/plain" in lines


def test_multipart_rfc_14_6():
    """The example of RFC 9110 14.6: two ranges of an 8000-byte application/pdf."""
    data = bytes(i % 251 for i in range(8000))
    head, _ = object_heads(200, b"application/pdf", 8000, LM, ETAG)
    new_head, parts, closing = ranges.multipart(head, [(500, 1000), (7000, 8000)], 8000)
    body = b"".join(part + data[a:b] for part, a, b in parts) + closing
    fields = dict(line.split(b": ", 1) for line in new_head.split(b"\r\n")[1:-1])
    assert new_head.startswith(b"HTTP/1.1 206 Partial Content\r\n")
    assert fields[b"Content-Type"] == b"multipart/byteranges; boundary=" + ranges.BOUNDARY
    assert int(fields[b"Content-Length"]) == len(body)
    b = ranges.BOUNDARY
    assert body == (b"--" + b + b"\r\nContent-Type: application/pdf\r\nContent-Range: bytes 500-999/8000\r\n\r\n"
                    + data[500:1000] + b"\r\n--" + b
                    + b"\r\nContent-Type: application/pdf\r\nContent-Range: bytes 7000-7999/8000\r\n\r\n"
                    + data[7000:8000] + b"\r\n--" + b + b"--\r\n")
