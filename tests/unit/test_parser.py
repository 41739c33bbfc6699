"""The strict request parser, fed whole, one byte at a time, and with trailing data."""

from __future__ import annotations

import random
import re

import pytest

from protocols.http.settings import HttpSettings
from protocols.http.wire.errors import HttpError
from protocols.http.wire.parser import ChunkedBody, LengthBody, parse_head, parse_response_head
from protocols.http.states.remote import BackendExchange
from protocols.http.scopes import HttpRequest

LIMITS = HttpSettings()


def parse_whole(data: bytes, limits=LIMITS):
    req = HttpRequest()
    end = parse_head(data, 0, 0, limits, req)
    return req, end


def parse_bytewise(data: bytes, limits=LIMITS):
    """Feed one byte at a time the way the engine does (buffer grows, scan resumes)."""
    req = HttpRequest()
    scan = 0
    for i in range(1, len(data) + 1):
        end = parse_head(data[:i], 0, scan, limits, req)
        if end >= 0:
            return req, end
        scan = req.scan_hint
    return req, -1


SIMPLE = b"GET /a/b.txt?x=1 HTTP/1.1\r\nHost: Example.COM:8080\r\nAccept: */*\r\n\r\n"


@pytest.mark.parametrize("parse", [parse_whole, parse_bytewise])
def test_simple_get(parse):
    req, end = parse(SIMPLE)
    assert end == len(SIMPLE)
    assert (req.method, req.path, req.query, req.version) == (b"GET", b"/a/b.txt", b"x=1", 11)
    assert req.host == b"example.com:8080"
    assert req.keep_alive and req.content_length == -1 and not req.chunked
    assert (b"Accept", b"*/*") in req.headers


def test_trailing_data_is_left_alone():
    data = SIMPLE + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
    req, end = parse_whole(data)
    assert data[end:].startswith(b"GET /next")
    req2 = HttpRequest()
    assert parse_head(data, end, end, LIMITS, req2) == len(data)
    assert req2.path == b"/next"


def test_incomplete_head_waits():
    req, end = parse_whole(SIMPLE[:-2])
    assert end == -1


def test_leading_empty_line_ignored():
    req, end = parse_whole(b"\r\n" + SIMPLE)
    assert end == len(SIMPLE) + 2


@pytest.mark.parametrize("data,version,keep", [
    (b"GET / HTTP/1.0\r\n\r\n", 10, False),
    (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 10, True),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 11, False),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, Close\r\n\r\n", 11, False),
    (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 11, True),
])
def test_versions_and_persistence(data, version, keep):
    req, _ = parse_whole(data)
    assert req.version == version and req.keep_alive is keep


def test_absolute_form_overrides_host():
    req, _ = parse_whole(b"GET http://Other.example/p?q HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (req.host, req.path, req.query, req.target) == (b"other.example", b"/p", b"q", b"/p?q")


def test_bodies_framing():
    req, _ = parse_whole(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
    assert req.content_length == 5
    req, _ = parse_whole(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert req.chunked


BAD = [
    # (request, status)
    (b"GET / HTTP/1.1\r\n\r\n", 400),                                   # no Host on 1.1
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),             # repeated Host
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),                      # invalid Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n z\r\n\r\n", 400),          # obs-fold
    (b"GET / HTTP/1.1\r\nHost: a\r\nX : y\r\n\r\n", 400),               # space before colon
    (b"GET / HTTP/1.1\r\nHost: a\r\nX\x01: y\r\n\r\n", 400),            # bad header name
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),           # NUL in value
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),             # bare CR
    (b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),                          # bare LF
    (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),                       # double space
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/1.10\r\nHost: a\r\n\r\n", 400),
    (b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /\r\n\r\n", 400),
    (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET http://u@h/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: something\r\n\r\n", 417),
]


@pytest.mark.parametrize("data,status", BAD)
@pytest.mark.parametrize("parse", [parse_whole, parse_bytewise])
def test_rejects(parse, data, status):
    with pytest.raises(HttpError) as info:
        parse(data)
    assert info.value.status == status


def test_bare_lf_rejected_before_head_ends():
    """A client cannot make us wait for the end of a head that is already invalid."""
    with pytest.raises(HttpError):
        parse_whole(b"GET / HTTP/1.1\nHost: a\n")


def test_limits():
    small = HttpSettings(max_request_line=64, max_header_block=128, max_headers=3)
    with pytest.raises(HttpError) as info:
        parse_whole(b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: a\r\n\r\n", small)
    assert info.value.status == 414
    with pytest.raises(HttpError) as info:
        parse_whole(b"GET /" + b"a" * 100, small)  # still incomplete
    assert info.value.status == 414
    with pytest.raises(HttpError) as info:
        parse_whole(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 200 + b"\r\n\r\n", small)
    assert info.value.status == 431
    with pytest.raises(HttpError) as info:
        parse_whole(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 200, small)
    assert info.value.status == 431
    with pytest.raises(HttpError) as info:
        parse_whole(b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", small)
    assert info.value.status == 431


def read_all(reader, data: bytes, step: int):
    out, pos, buf, finished = [], 0, b"", False
    for i in range(0, len(data), step):
        buf = buf[pos:] + data[i:i + step]
        pos, pieces, finished = reader.read(buf, 0)
        out += pieces
        if finished:
            return b"".join(out), buf[pos:], True
    return b"".join(out), buf[pos:], finished


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_chunked_body(step):
    body = b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT"
    data, rest, done = read_all(ChunkedBody(), body, step)
    assert done and data == b"hello world"
    assert b"NEXT".startswith(rest)  # what follows the body is left in the buffer


@pytest.mark.parametrize("body", [
    b"g\r\nhello\r\n0\r\n\r\n",               # not hex
    b"5\r\nhelloXX0\r\n\r\n",                  # no CRLF after data
    b"5\nhello\r\n0\r\n\r\n",                  # bare LF after size
    b"1234567890123456\r\n",                  # size overflow
    b"5 ;\r\nhello\r\n0\r\n\r\n",              # empty extension
    b"0\r\nBad Trailer: x\r\n\r\n",            # invalid trailer name
])
@pytest.mark.parametrize("step", [1, 1000])
def test_chunked_rejects(body, step):
    with pytest.raises(HttpError):
        read_all(ChunkedBody(), body, step)


def test_length_body():
    data, rest, done = read_all(LengthBody(4), b"abcdEFG", 2)
    assert done and data == b"abcd"


def _response(raw: bytes):
    resp = BackendExchange()
    assert parse_response_head(raw, 0, 65536, resp) == len(raw)
    return resp


@pytest.mark.parametrize("te,chunked,codings,keep_alive", [
    (b"chunked", True, b"", True),
    (b"gzip", False, b"gzip", False),            # RFC 9112 6.3: read until the close
    (b"GZip, chunked", True, b"gzip", True),      # chunked frames it; gzip is passed on
    (b"gzip, deflate", False, b"gzip, deflate", False),
    (b"identity", False, b"", False),
])
def test_backend_transfer_codings(te, chunked, codings, keep_alive):
    resp = _response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\n\r\n")
    assert (resp.chunked, resp.codings, resp.keep_alive, resp.content_length) == (chunked, codings, keep_alive, -1)


@pytest.mark.parametrize("te", [b"chunked, gzip", b"chunked, chunked", b"gz ip", b"gzip,,chunked", b"gzip;q"])
def test_backend_transfer_codings_malformed(te):
    with pytest.raises(HttpError) as info:
        _response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\n\r\n")
    assert info.value.status == 502


def test_backend_content_length_and_any_transfer_encoding_refused():
    with pytest.raises(HttpError) as info:
        _response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert info.value.status == 502


# -- properties ----------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PIECES = [b"GET ", b"POST ", b"/", b"/a?b", b" HTTP/1.1", b" HTTP/1.0", b"\r\n", b"\n", b"\r", b"Host: a",
          b"Content-Length: 3", b"Transfer-Encoding: chunked", b": ", b" ", b"\t", b"\x00", b"\xff", b"X",
          b"Connection: close", b"\r\n\r\n", b"abc", b"0\r\n\r\n"]


def outcome(parse, data):
    try:
        req, end = parse(data)
    except HttpError as exc:
        return ("error", exc.status)
    if end < 0:
        return ("more",)
    return ("ok", end, req.method, req.target, req.version, req.host, req.content_length, req.chunked,
            req.keep_alive, req.headers)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=14).map(b"".join) | st.binary(max_size=200))
def test_any_input_is_a_request_an_error_or_a_wait(data):
    """Nothing but HttpError ever escapes the parser, and feeding byte by byte
    reaches the same verdict as feeding the whole input at once."""
    whole = outcome(parse_whole, data)
    bytewise = outcome(parse_bytewise, data)
    if whole[0] == "error" and bytewise[0] == "error":
        return  # an early rejection may name a different defect first
    assert whole == bytewise


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=6), st.integers(min_value=1, max_value=50))
def test_chunked_round_trip_whatever_the_split(pieces, step):
    encoded = b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
    data, rest, done = read_all(ChunkedBody(), encoded + b"NEXT", step)
    assert done and data == b"".join(pieces) and b"NEXT".startswith(rest)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(min_value=1, max_value=30))
def test_chunked_garbage_is_an_error_or_a_wait(data, step):
    try:
        read_all(ChunkedBody(), data, step)
    except HttpError:
        pass


# -- good requests: the same whatever the pieces ----------------------------------

GOOD_REQUESTS = [
    SIMPLE,
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET http://Other.example/p?q HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost:a\r\nX: \t b c \t\r\nY:\r\nAccept:   */*   \r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
]


def parse_split(data: bytes, cut: int):
    """Two pieces: the head parsed (and waiting) on the first, then on both."""
    req = HttpRequest()
    end = parse_head(data[:cut], 0, 0, LIMITS, req)
    if end >= 0:
        return req, end
    return req, parse_head(data, 0, req.scan_hint, LIMITS, req)


@pytest.mark.parametrize("data", GOOD_REQUESTS)
def test_good_request_whatever_the_pieces(data):
    """Byte by byte and cut in two anywhere (inside a CRLF too), a request head
    parses exactly as it does whole, and every prefix short of its end waits."""
    whole = outcome(parse_whole, data)
    assert whole[0] == "ok"
    assert outcome(parse_bytewise, data) == whole
    for cut in range(1, len(data)):
        assert outcome(lambda d: parse_split(d, cut), data) == whole, cut
    for n in range(whole[1]):
        assert outcome(parse_whole, data[:n]) == ("more",), n


# -- response heads: the fields are exactly the request grammar's ----------------

FIELD_PIECES = [b"X", b"Name", b"a-b", b":", b" ", b"\t", b"v", b"w x", b"\xff", b"\x7f", b"\x00", b"\r", b"\n",
                b"\r\n", b"(", b"::", b"Content-Length: 3\r\n", b"Vary: *\r\n"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(FIELD_PIECES), max_size=16).map(b"".join))
def test_response_fields_follow_the_field_grammar(block):
    """A response head's field section is accepted exactly when it is a run of
    field lines (name, colon, value, optional whitespace), and its fields are
    what the field-line grammar extracts (values without their outer whitespace)."""
    from protocols.http.wire.parser import FIELD_BLOCK, FIELDS
    raw = b"HTTP/1.1 200 OK\r\n" + block + b"\r\n"
    if b"\r\n\r\n" in raw[:-2] or raw.find(b"\r\n\r\n") != len(raw) - 4:
        return  # the head would end elsewhere
    resp = BackendExchange()
    valid = FIELD_BLOCK.fullmatch(block) is not None
    try:
        parse_response_head(raw, 0, 65536, resp)
    except HttpError:
        assert not valid or b"content-length" in block.lower()
        return
    assert valid
    assert resp.headers == FIELDS.findall(block)
    assert resp.lnames == [name.lower() for name, _ in resp.headers]


def test_response_field_values_lose_only_outer_whitespace():
    resp = _response(b"HTTP/1.1 200 OK\r\nX: \t a \t b \t\r\nY:\r\nZ:c:d\r\n\r\n")
    assert resp.headers == [(b"X", b"a \t b"), (b"Y", b""), (b"Z", b"c:d")]
    for bad in (b"X : a\r\n", b" X: a\r\n", b"X: a\r\n b\r\n", b"X: a\rb\r\n", b"X: a\nb\r\n", b"X\r\n"):
        with pytest.raises(HttpError):
            _response(b"HTTP/1.1 200 OK\r\n" + bad + b"\r\n")


# The RFC 9112 grammar of a request line and of field lines, as regular
# expressions: the parser must accept exactly what they accept and find the
# same fields, whatever bytes are slipped in where.
_T = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_V = rb"\x21-\x7e\x80-\xff"
_GRAMMAR_LINE = re.compile(rb"[" + _T + rb"]+ [\x21-\x7e]+ HTTP/[0-9]\.[0-9]")
_GRAMMAR_FIELD = (rb"([" + _T + rb"]+):[ \t]*((?:[" + _V + rb"]+(?:[ \t]+[" + _V + rb"]+)*)?)[ \t]*\r\n")
_GRAMMAR_BLOCK = re.compile(rb"(?:" + _GRAMMAR_FIELD + rb")*")
_INSERTS = b"\x00\t \r\n:\x7f\x80\xff\"(a2@"


def _grammar(head: bytes):
    """What the grammar says of a complete head: its fields, or None (invalid)."""
    line_end, end = head.find(b"\r\n"), head.find(b"\r\n\r\n")
    if not _GRAMMAR_LINE.fullmatch(head, 0, line_end):
        return None
    if not _GRAMMAR_BLOCK.fullmatch(head, line_end + 2, end + 2):
        return None
    return re.findall(_GRAMMAR_FIELD, head[line_end + 2:end + 2])


def test_parser_accepts_what_the_grammar_accepts():
    """Thousands of heads, each a valid one with a few bytes inserted (bare CR
    and LF, controls, obs-text, separators, whitespace in names and values):
    refused with 400 exactly when the grammar refuses them, else parsed into
    the fields the grammar finds (505 for a well-formed HTTP/2.x line)."""
    rnd = random.Random(1234)
    base = [b"Accept: text/html, */*;q=0.8", b"User-Agent: Mozilla/5.0 (X11; Linux) x/1",
            b"X-Empty:", b"X-Pad: \t spaced value\t ", b"Cookie: a=1; b=\"2\"", b"Accept-Language:en"]
    for _ in range(3000):
        fields = rnd.sample(base, rnd.randint(0, len(base)))
        head = bytearray(b"GET /p/q.txt?x=1 HTTP/1.1\r\nHost: h\r\n" + b"".join(f + b"\r\n" for f in fields))
        places = [i for i in range(len(head)) if i != 4 and i not in range(27, 37)]  # not the "/", not Host
        for at in sorted(rnd.sample(places, rnd.randint(0, 3)), reverse=True):
            head[at:at] = bytes([rnd.choice(_INSERTS)])
        head = bytes(head) + b"\r\n"
        if head.find(b"\r\n\r\n") < 0:
            continue
        expected = _grammar(head)
        got = outcome(parse_whole, head)
        if expected is None:
            assert got[:2] == ("error", 400), head
        elif got[0] == "error":
            assert got[1] == 505 and not head.startswith(b"GET /p/q.txt?x=1 HTTP/1."), head
        else:
            assert got[0] == "ok" and parse_whole(head)[0].headers == expected, head


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: a\r\nExpect: nothing\r\nBad Name: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\nX: a\x00b\r\n\r\n",
])
def test_malformed_line_is_400_whatever_the_fields_before_it(data):
    """A field refused for its meaning (417 for Expect) does not hide a
    malformed line after it: the head is a 400."""
    assert outcome(parse_whole, data) == ("error", 400)
    assert outcome(parse_bytewise, data) == ("error", 400)


def test_first_refused_field_gives_the_answer():
    data = b"GET / HTTP/1.1\r\nHost: a\r\nExpect: nothing\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"
    assert outcome(parse_whole, data) == ("error", 417)


def test_a_head_parses_the_same_every_time():
    """Targets and Host values seen before (remembered once checked) come out
    as they did the first time: normalised, lower-cased, refused alike."""
    data = b"GET /a/../b%41?q=%41 HTTP/1.1\r\nHost: EXAMPLE.com\r\n\r\n"
    bad = b"GET /a%2Fb HTTP/1.1\r\nHost: EXAMPLE.com\r\n\r\n"
    for _ in range(3):
        req, _ = parse_whole(data)
        assert (req.target, req.path, req.query, req.host) == (b"/bA?q=%41", b"/bA", b"q=%41", b"example.com")
        assert outcome(parse_whole, bad) == ("error", 400)
        req, _ = parse_whole(b"GET http://Other.EXAMPLE/b%41 HTTP/1.1\r\nHost: EXAMPLE.com\r\n\r\n")
        assert (req.target, req.host) == (b"/bA", b"other.example")


def test_response_malformed_field_line_wins_over_a_bad_content_length():
    """Every line is checked for form before any field's meaning: a head with a
    bad Content-Length and a later malformed line is refused as malformed."""
    with pytest.raises(HttpError) as exc:
        _response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\nBad Name: a\r\n\r\n")
    assert exc.value.status == 502 and "header section" in exc.value.detail
    with pytest.raises(HttpError) as exc:
        _response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\nContent-Length: 3\r\n\r\n")
    assert "invalid Content-Length" in exc.value.detail
    resp = _response(b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, ,Close\r\nContent-Length: 0\r\n\r\n")
    assert resp.keep_alive is False and resp.status == 200 and resp.reason == b"OK"


def test_response_lines_seen_before_parse_the_same_and_still_frame():
    """A field line met again (remembered) gives the same fields and still
    frames the message; a head with a known line and a bad one is refused."""
    head = b"HTTP/1.1 200 OK\r\nServer: x \r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
    first, again = _response(head), _response(head)
    assert again.headers == first.headers == [(b"Server", b"x"), (b"Content-Length", b"5"),
                                              (b"Connection", b"close")]
    assert again.lnames == [b"server", b"content-length", b"connection"]
    assert again.content_length == 5 and again.keep_alive is False
    with pytest.raises(HttpError):
        _response(b"HTTP/1.1 200 OK\r\nServer: x \r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n")
    with pytest.raises(HttpError):
        _response(b"HTTP/1.1 200 OK\r\nServer: x \r\nBad Name: 1\r\n\r\n")
