"""Backend response heads fed whole, one byte at a time, and split anywhere.

A backend's bytes arrive in whatever pieces TCP makes of them; the parser must
reach the same verdict however the head is cut: the same parsed response when it
is complete, "wait" (never an error) while it is a prefix of a good head, and the
same 502 for a bad one.  The model is h11's byte-at-a-time tests; the feeding
here copies what ``backend_read_head`` does (the buffer grows, the head is
parsed again from where it starts, an interim 1xx is followed by the next head).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.http.states.remote import BackendExchange
from protocols.http.wire.errors import HttpError
from protocols.http.wire.parser import parse_response_head

LIMIT = 65536


def summary(resp: BackendExchange, end: int) -> tuple:
    return (end, resp.version, resp.status, resp.reason, tuple(resp.headers), resp.content_length,
            resp.chunked, resp.codings, resp.keep_alive)


def heads_whole(data: bytes, limit: int = LIMIT) -> list:
    """Every head in ``data`` (1xx heads then the final one), parsed from the whole
    input; ends with "more" when the input stops inside a head, or with the error."""
    out: list = []
    pos = 0
    try:
        while True:
            resp = BackendExchange()
            end = parse_response_head(data, pos, limit, resp)
            if end < 0:
                out.append("more")
                return out
            out.append(summary(resp, end))
            if resp.status >= 200 or resp.status == 101:
                return out
            pos = end
    except HttpError as exc:
        out.append(("error", exc.status))
        return out


def heads_fed(pieces: list[bytes], limit: int = LIMIT) -> list:
    """The same, with the input arriving in ``pieces``: after each piece the head
    being read is parsed again from its start (as the backend machine does on
    each event), and a verdict is only taken when a head is complete or bad."""
    out: list = []
    buf = b""
    pos = 0
    try:
        for piece in pieces:
            buf += piece
            while True:
                resp = BackendExchange()
                end = parse_response_head(buf, pos, limit, resp)
                if end < 0:
                    break  # wait for the next piece
                out.append(summary(resp, end))
                if resp.status >= 200 or resp.status == 101:
                    return out
                pos = end
    except HttpError as exc:
        out.append(("error", exc.status))
        return out
    out.append("more")
    return out


def bytewise(data: bytes, limit: int = LIMIT) -> list:
    return heads_fed([data[i:i + 1] for i in range(len(data))], limit)


GOOD = {
    "minimal": b"HTTP/1.1 200 OK\r\n\r\n",
    "empty reason": b"HTTP/1.1 204 \r\n\r\n",
    "long reason": b"HTTP/1.1 404 Not Found Here \t(really)\r\nContent-Length: 0\r\n\r\n",
    "obs-text reason": b"HTTP/1.1 200 \xc3\xa9t\xc3\xa9\r\nContent-Length: 0\r\n\r\n",
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
    "repeated equal content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "gzip then chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
    "close-delimited 1.0": b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>",
    "1.0 keep-alive": b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n",
    "1.1 close": b"HTTP/1.1 200 OK\r\nConnection: foo, Close\r\nContent-Length: 2\r\n\r\nhi",
    "204 no body": b"HTTP/1.1 204 No Content\r\nETag: \"x\"\r\n\r\n",
    "304 no body": b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 99\r\n\r\n",
    "101 switch": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x00",
    "100 then final": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "103 then final": (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                       b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    "two interims then final": (b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                                b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"),
    "odd spacing": (b"HTTP/1.1 200 OK\r\nX:a\r\nY: \t b c \t\r\nContent-Length:\t 5 \r\nZ:\r\n"
                    b"Cache-Control:   max-age=60   \r\n\r\nhello"),
    "many fields": b"HTTP/1.1 200 OK\r\n" + b"".join(b"F%d: v%d\r\n" % (i, i) for i in range(40)) + b"\r\n",
}

BAD = {
    "no reason and no space": b"HTTP/1.1 200\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "obs-fold with tab": b"HTTP/1.1 200 OK\r\nX: a\r\n\tb\r\n\r\n",
    "space before colon": b"HTTP/1.1 200 OK\r\nX : a\r\n\r\n",
    "empty field name": b"HTTP/1.1 200 OK\r\n: a\r\n\r\n",
    "bare CR in value": b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
    "NUL in value": b"HTTP/1.1 200 OK\r\nX: \x00\r\n\r\n",
    "bare LF in the head": b"HTTP/1.1 200 OK\nX: a\r\n\r\n",
    "HTTP/2 status line": b"HTTP/2 200 OK\r\n\r\n",
    "HTTP/1.10": b"HTTP/1.10 200 OK\r\n\r\n",
    "lowercase version": b"http/1.1 200 OK\r\n\r\n",
    "not HTTP at all": b"ICY 200 OK\r\nicy-name: radio\r\n\r\n",
    "four-digit status": b"HTTP/1.1 2000 OK\r\n\r\n",
    "status below 100": b"HTTP/1.1 099 OK\r\n\r\n",
    "blank line first": b"\r\nHTTP/1.1 200 OK\r\n\r\n",
    "conflicting content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    "signed content-length": b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
    "content-length and chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    "chunked not last": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "good interim, bad final": b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\nX : y\r\n\r\n",
}


@pytest.mark.parametrize("raw", GOOD.values(), ids=GOOD.keys())
def test_good_head_byte_at_a_time_is_the_same_as_whole(raw):
    whole = heads_whole(raw)
    assert whole[-1] != "more" and whole[-1][0] != "error", whole
    assert bytewise(raw) == whole


@pytest.mark.parametrize("raw", GOOD.values(), ids=GOOD.keys())
def test_good_head_split_anywhere_is_the_same_as_whole(raw):
    """Two pieces, cut at every position: inside the status line, a field, the
    CRLF that ends a line or the blank line that ends the head."""
    whole = heads_whole(raw)
    for cut in range(1, len(raw)):
        assert heads_fed([raw[:cut], raw[cut:]]) == whole, cut


@pytest.mark.parametrize("raw", GOOD.values(), ids=GOOD.keys())
def test_truncated_head_waits(raw):
    """Every prefix short of a head's end is a wait, never an error."""
    whole = heads_whole(raw)
    last_end = whole[-1][0]
    for n in range(last_end):
        result = heads_whole(raw[:n])
        assert result[-1] == "more", (n, result)
        assert bytewise(raw[:n])[-1] == "more", n


def test_head_split_inside_crlf():
    raw = GOOD["content-length"]
    first_crlf = raw.index(b"\r\n") + 1
    blank = raw.index(b"\r\n\r\n")
    for cut in (first_crlf, blank + 1, blank + 2, blank + 3):
        assert heads_fed([raw[:cut]]) == ["more"], cut
        assert heads_fed([raw[:cut], raw[cut:]]) == heads_whole(raw)


def test_what_the_heads_say():
    """A few verdicts spelled out (the tests above only compare feedings)."""
    cl = heads_whole(GOOD["content-length"])[-1]
    assert cl[2:4] == (200, b"OK") and cl[5:] == (5, False, b"", True)
    assert cl[0] == len(GOOD["content-length"]) - len(b"hello")
    chunked = heads_whole(GOOD["chunked"])[-1]
    assert chunked[5:] == (-1, True, b"", True)
    gz = heads_whole(GOOD["gzip then chunked"])[-1]
    assert gz[5:] == (-1, True, b"gzip", True)
    old = heads_whole(GOOD["close-delimited 1.0"])[-1]
    assert old[1] == 10 and old[5:] == (-1, False, b"", False)
    assert heads_whole(GOOD["1.0 keep-alive"])[-1][-1] is True
    assert heads_whole(GOOD["1.1 close"])[-1][-1] is False
    spaced = heads_whole(GOOD["odd spacing"])[-1]
    assert spaced[4] == ((b"X", b"a"), (b"Y", b"b c"), (b"Content-Length", b"5"), (b"Z", b""),
                         (b"Cache-Control", b"max-age=60"))
    assert spaced[5] == 5
    interim = heads_whole(GOOD["103 then final"])
    assert [h[2] for h in interim] == [103, 200]
    assert interim[0][4] == ((b"Link", b"</s.css>; rel=preload"),)
    assert [h[2] for h in heads_whole(GOOD["two interims then final"])] == [102, 103, 500]
    switch = heads_whole(GOOD["101 switch"])
    assert [h[2] for h in switch] == [101]  # what follows a 101 is not HTTP
    assert heads_whole(GOOD["304 no body"])[-1][2] == 304


@pytest.mark.parametrize("raw", BAD.values(), ids=BAD.keys())
def test_bad_head_fails_the_same_way_both_ways(raw):
    whole = heads_whole(raw)
    assert whole[-1] == ("error", 502), whole
    fed = bytewise(raw)
    assert fed == whole
    for cut in range(1, len(raw)):
        assert heads_fed([raw[:cut], raw[cut:]]) == whole, cut


def test_head_over_the_limit_fails_both_ways():
    raw = b"HTTP/1.1 200 OK\r\nX: " + b"v" * 200 + b"\r\n\r\n"
    assert heads_whole(raw, limit=128) == [("error", 502)]
    assert bytewise(raw, limit=128) == [("error", 502)]
    # ... and even before it ends, when what came already is too much.
    assert heads_whole(raw[:150], limit=128) == [("error", 502)]


# -- property: any split of any input ---------------------------------------------

PIECES = [b"HTTP/1.1 ", b"HTTP/1.0 ", b"200 OK", b"101 Switching", b"103 Hints", b"204 ", b"304 X",
          b"\r\n", b"\n", b"\r", b"Content-Length: 3", b"Content-Length: 4", b"Transfer-Encoding: chunked",
          b"Transfer-Encoding: gzip", b"Connection: close", b": ", b" ", b"\t", b"X", b"\x00", b"\xff",
          b"\r\n\r\n", b"abc"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=16).map(b"".join) | st.binary(max_size=120),
       st.lists(st.integers(min_value=1, max_value=len(b"".join(PIECES))), max_size=6))
def test_any_input_any_split_same_verdict(data, cuts):
    """However the input is cut, the verdict (heads, wait or 502) is the one the
    whole input gets."""
    whole = heads_whole(data)
    points = sorted({c for c in cuts if c < len(data)})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    assert heads_fed(pieces) == whole
    assert bytewise(data) == whole
