"""Table loading, validation messages, drawing, and the every-(state, outcome) property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from afpa import graph, tables
from afpa.intrinsics import default_registry

REG = default_registry()
SHIPPED = tables.shipped_table_names()
HTTP = tables.shipped_table_path("http").read_text()


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_table_validates(name):
    machine = tables.load(tables.shipped_table_path(name), REG)
    assert machine.states


def test_http_table_shape():
    m = tables.load(tables.shipped_table_path("http"), REG)
    assert m.start.name == "derive_request"
    assert m.states["derive_cached_response"].on["hit"].target is m.states["send_engine"]
    assert m.states["derive_request"].on["need_more"].target.name == "@wait"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_state_outcome_leads_somewhere(name):
    """For every compiled table, each (state, declared outcome) leads to a state or an end."""
    m = tables.load(tables.shipped_table_path(name), REG)
    pairs = []
    for st_ in m.states.values():
        fn = REG.lookup(st_.function, m.module.name)
        pairs += [(st_, outcome) for outcome in fn.outcomes]

    @given(st.sampled_from(pairs))
    def check(pair):
        state, outcome = pair
        target = state.on[outcome].target
        assert target.name in tables.SPECIALS or m.states[target.name] is target

    check()


def problems_of(text: str) -> list[str]:
    _, problems = tables.check_text(text, "t.toml", REG)
    return [str(p) for p in problems]


def edit(old: str, new: str) -> str:
    assert old in HTTP
    return HTTP.replace(old, new)


def line_of(text: str, fragment: str, after: str = "") -> int:
    """1-based line of the first ``fragment`` after ``after`` (tables change; tests
    must not hard-code where a state sits)."""
    start = text.index(after) if after else 0
    return text.count("\n", 0, text.index(fragment, start)) + 1


def test_unknown_function():
    text = edit('run = "derive_miss_response"', 'run = "derive_mis_response"')
    out = problems_of(text)
    n = line_of(text, 'run = "derive_mis_response"')
    assert f"t.toml:{n}: [states.derive_miss_response] run: unknown function 'derive_mis_response'" in out


def test_unknown_target():
    text = edit('ready = "send_engine"', 'ready = "send_engin"')
    n = line_of(text, 'ready = "send_engin"')
    assert (f"t.toml:{n}: [states.derive_uncached_response] on.ready: unknown target state "
            "'send_engin'") in problems_of(text)


def test_outcome_without_transition():
    text = edit(', stale = "derive_miss_response"', "")
    n = line_of(text, "on = {", after="[states.derive_cached_response]")
    assert (f"t.toml:{n}: [states.derive_cached_response] on.stale: outcome 'stale' of "
            "'derive_cached_response' has no transition") in problems_of(text)


def test_transition_for_outcome_never_returned():
    out = problems_of(edit('ready = "send_engine"', 'ready = "send_engine", maybe = "@close"'))
    assert any("on.maybe: function 'derive_uncached_response' never returns 'maybe'" in p for p in out)


def test_unreachable_state():
    text = HTTP + '\n[states.orphan]\nrun = "derive_miss_response"\non = { docroot = "send_engine" }\n'
    n = line_of(text, "[states.orphan]")
    assert f"t.toml:{n}: [states.orphan]: unreachable from start state 'derive_request'" in problems_of(text)


def test_no_path_to_an_end():
    text = """
[machine]
name = "loop"
module = "http"
start = "derive_request"

[states.derive_request]
run = "derive_request"
on = { complete = "derive_miss_response", need_more = "@wait", malformed = "derive_request" }

[states.derive_miss_response]
run = "derive_miss_response"
on = { docroot = "derive_request", remote = "derive_request", deferred = "derive_request" }
"""
    out = problems_of(text)
    assert "t.toml:9: [states.derive_request] on: no path from this state to @done or @close" in out
    assert "t.toml:13: [states.derive_miss_response] on: no path from this state to @done or @close" in out


def test_every_problem_listed_at_once():
    text = edit('run = "derive_miss_response"', 'run = "nope"').replace('ready = "send_engine"', 'ready = "gone"')
    out = problems_of(text)
    assert len(out) >= 2


def test_bad_toml_and_shape():
    [bad] = problems_of('[machine]\nname = "x"\nthis is = = not toml\n')
    assert bad.startswith("t.toml:3: not valid TOML: ") and "\n" not in bad
    out = problems_of('[machine]\nname = "x"\n')
    assert "t.toml:1: machine.module: missing or not a string" in out
    assert "t.toml: states: no [states.*] tables" in out
    text = HTTP.replace('module = "http"', 'module = "ftp"')
    n = line_of(text, 'module = "ftp"')
    assert any(p.startswith(f"t.toml:{n}: machine.module: unknown protocol module 'ftp'")
               for p in problems_of(text))
    text = edit('doc = "Ask routing', 'dco = "x"\ndoc = "Ask routing')
    n = line_of(text, 'dco = "x"')
    assert f"t.toml:{n}: [states.derive_miss_response] dco: unknown key (expected run, on, doc)" in problems_of(text)


def test_failed_table_never_compiles():
    with pytest.raises(tables.TableError) as info:
        tables.load_text(edit('ready = "send_engine"', 'ready = "gone"'), "t.toml", REG)
    assert "unknown target state 'gone'" in str(info.value)


def test_graph_drawn_from_the_table():
    spec, _ = tables.parse(HTTP, "http.toml")
    dot = graph.to_dot(spec)
    assert dot.startswith('digraph "http"')
    assert '"derive_cached_response" -> "send_engine" [label="hit"];' in dot
    assert 'style=dashed' in dot  # @wait self-loop
    mermaid = graph.to_mermaid(spec)
    assert "derive_cached_response --> derive_miss_response : miss" in mermaid
    edited, _ = tables.parse(edit('hit = "send_engine"', 'hit = "derive_miss_response"'), "e.toml")
    assert '"derive_cached_response" -> "derive_miss_response" [label="hit"];' in graph.to_dot(edited)
