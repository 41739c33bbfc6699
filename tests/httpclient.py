"""A tiny response parser for tests: splits raw bytes into (status, headers, body)."""

from __future__ import annotations


def parse_responses(raw: bytes, head_only: tuple[bool, ...] = ()) -> list[tuple[int, dict, bytes]]:
    """Parse consecutive responses framed by Content-Length or chunked
    (``head_only[i]`` for answers to HEAD).  Raises ValueError/IndexError while
    the bytes are still incomplete."""
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
        bodiless = (i < len(head_only) and head_only[i]) or status == 304
        if not bodiless and headers.get("transfer-encoding", "").split(",")[-1].strip() == "chunked":
            body = b""
            while True:
                eol = raw.index(b"\r\n", pos)
                size = int(raw[pos:eol].split(b";")[0], 16)
                pos = eol + 2
                if size == 0:
                    pos = raw.index(b"\r\n\r\n", pos - 2) + 4
                    break
                if pos + size + 2 > len(raw):
                    raise ValueError("incomplete chunk")
                body += raw[pos:pos + size]
                pos += size + 2
            out.append((status, headers, body))
        else:
            length = 0 if bodiless else int(headers.get("content-length", 0))
            out.append((status, headers, raw[pos:pos + length]))
            pos += length
        i += 1
    return out
