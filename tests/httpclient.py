"""A tiny response parser for tests: splits raw bytes into (status, headers, body)."""

from __future__ import annotations


def parse_responses(raw: bytes, head_only: tuple[bool, ...] = ()) -> list[tuple[int, dict, bytes]]:
    """Parse consecutive Content-Length-framed responses (``head_only[i]`` for HEAD)."""
    out = []
    pos = 0
    i = 0
    while pos < len(raw):
        end = raw.index(b"\r\n\r\n", pos)
        lines = raw[pos:end].split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower().decode()] = v.strip().decode()
        pos = end + 4
        length = 0 if (i < len(head_only) and head_only[i]) or status == 304 else int(headers.get("content-length", 0))
        out.append((status, headers, raw[pos:pos + length]))
        pos += length
        i += 1
    return out
