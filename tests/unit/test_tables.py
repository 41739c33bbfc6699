"""Table loading, validation messages, drawing, and the every-(state, outcome) property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from afpa import cli

from afpa.machine import graph, tables
from afpa.net.intrinsics import default_registry
from afpa.machine.modules import ProtocolModule, collect, state

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


# -- contracts: what each state needs on the request, proven along every path ----------

BROKEN_STALE = edit('stale = "derive_miss_response"', 'stale = "send_engine"')


def test_stale_wired_to_send_engine_is_refused_with_the_path():
    n = line_of(BROKEN_STALE, "on = {", after="[states.derive_cached_response]")
    assert (f"t.toml:{n}: [states.send_engine] run: needs 'response', missing on path "
            "derive_request -complete-> derive_cached_response -stale-> send_engine") in problems_of(BROKEN_STALE)
    with pytest.raises(tables.TableError):
        tables.load_text(BROKEN_STALE, "t.toml", REG)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_tables_meet_every_need(name):
    spec, problems = tables.check_text(tables.shipped_table_path(name).read_text(), name, REG)
    assert problems == []
    avail = tables.available_facts(spec, REG)
    for sname, body in spec.states.items():
        fn = REG.lookup(body["run"], spec.module)
        if fn.contract is not None:
            assert fn.contract.needs <= avail[sname], sname


def test_every_shipped_function_declares_a_contract():
    for module in REG.modules.values():
        for fn in module.functions.values():
            assert fn.contract is not None, fn.name
    assert REG.intrinsics["send_engine"].contract.needs == {"response"}


@state("ok", "more", "bad", needs=(), provides={"ok": ("request",), "bad": ("response",)})
def t_parse(g, conn, req):
    """Parse."""


@state("ready", "more", needs=("request",), provides={"ready": ("response",)})
def t_answer(g, conn, req):
    """Answer (may wait for more input first)."""


@state("a", "b", needs=("request",), provides={"a": ("route",)})
def t_choose(g, conn, req):
    """Only branch a decides a route."""


@state("ready", needs=("request", "route"), provides={"ready": ("response",)})
def t_use_route(g, conn, req):
    """Answer along the route."""


@state("loop", "out", needs=("request",))
def t_again(g, conn, req):
    """Loop or go on."""


@state("retry", "go", needs=("route",), drops={"retry": ("route",)})
def t_forget(g, conn, req):
    """Give the route up on retry."""


@state("ready")
def t_legacy(g, conn, req):
    """A third-party function from before contracts: declares none."""


T_REG = default_registry()
T_REG.register(ProtocolModule("t", collect([t_parse, t_answer, t_choose, t_use_route, t_again, t_forget,
                                            t_legacy]), "", None, None, None))


def t_table(*states: str, start: str = "p") -> str:
    head = f'[machine]\nname = "t"\nmodule = "t"\nstart = "{start}"\n\n'
    tail = '\n[states.send]\nrun = "afpa.send_engine"\non = { sent = "@done", close = "@close", aborted = "@close" }\n'
    return head + "\n".join(states) + tail


def t_problems(text: str) -> list[str]:
    _, problems = tables.check_text(text, "t.toml", T_REG)
    return [str(p) for p in problems]


PARSE = '[states.p]\nrun = "t_parse"\non = { ok = "%s", more = "@wait", bad = "send" }\n'


def test_a_need_unmet_through_one_of_two_branches_is_flagged():
    text = t_table(PARSE % "c",
                   '[states.c]\nrun = "t_choose"\non = { a = "u", b = "u" }\n',
                   '[states.u]\nrun = "t_use_route"\non = { ready = "send" }\n')
    n = line_of(text, 'on = { a = "u"')
    assert t_problems(text) == [
        f"t.toml:{n}: [states.u] run: needs 'route', missing on path p -ok-> c -b-> u"]
    # Branch b straight to the Send Engine: it left no response either.
    assert t_problems(text.replace('b = "u"', 'b = "send"')) == [
        f"t.toml:{n}: [states.send] run: needs 'response', missing on path p -ok-> c -b-> send"]
    # Branch b answering on its own: nothing to say.
    fixed = text.replace('b = "u"', 'b = "p2"') + '\n[states.p2]\nrun = "t_answer"\non = { ready = "send", more = "@wait" }\n'
    assert t_problems(fixed) == []


def test_loops_keep_what_every_path_provides():
    # p -ok-> c; c -a-> g (route known), c -b-> g (no route); g loops back to c or goes on to u.
    text = t_table(PARSE % "c",
                   '[states.c]\nrun = "t_choose"\non = { a = "g", b = "g" }\n',
                   '[states.g]\nrun = "t_again"\non = { loop = "c", out = "u" }\n',
                   '[states.u]\nrun = "t_use_route"\non = { ready = "send" }\n')
    assert t_problems(text) == [
        f"t.toml:{line_of(text, 'on = { loop')}: [states.u] run: needs 'route', missing on path "
        "p -ok-> c -b-> g -out-> u"]
    # A loop that only ever passes through states that keep the request is fine.
    ok = t_table(PARSE % "g", '[states.g]\nrun = "t_again"\non = { loop = "g", out = "a" }\n',
                 '[states.a]\nrun = "t_answer"\non = { ready = "send", more = "@wait" }\n')
    assert t_problems(ok) == []


def test_wait_keeps_the_facts_and_done_starts_afresh():
    # t_answer waits for more input with the request it was given: still known on re-entry.
    text = t_table(PARSE % "a", '[states.a]\nrun = "t_answer"\non = { ready = "send", more = "@wait" }\n')
    assert t_problems(text) == []
    # A request starts with nothing: a start state that needs the request cannot run.
    text = t_table('[states.a]\nrun = "t_answer"\non = { ready = "send", more = "@wait" }\n', start="a")
    n = line_of(text, 'run = "t_answer"')
    assert t_problems(text) == [f"t.toml:{n}: [states.a] run: needs 'request', missing when a request starts here"]


def test_a_dropped_fact_must_be_provided_again():
    text = t_table(PARSE % "c",
                   '[states.c]\nrun = "t_choose"\non = { a = "f", b = "send" }\n',
                   '[states.f]\nrun = "t_forget"\non = { retry = "u", go = "u" }\n',
                   '[states.u]\nrun = "t_use_route"\non = { ready = "send" }\n')
    out = t_problems(text)
    assert any("[states.u] run: needs 'route', missing on path p -ok-> c -a-> f -retry-> u" in p for p in out)
    assert any("[states.send] run: needs 'response', missing on path p -ok-> c -b-> send" in p for p in out)


def test_a_function_without_a_contract_is_trusted():
    # t_legacy declares nothing: it may need anything and is assumed to leave
    # whatever its successors need (a response for the Send Engine here).
    text = t_table('[states.p]\nrun = "t_legacy"\non = { ready = "send" }\n')
    assert t_problems(text) == []
    text = t_table(PARSE % "l", '[states.l]\nrun = "t_legacy"\non = { ready = "u" }\n',
                   '[states.u]\nrun = "t_use_route"\non = { ready = "send" }\n')
    assert t_problems(text) == []


def test_contract_declarations_are_checked():
    with pytest.raises(ValueError, match="'maybe' is not one of the declared outcomes"):
        state("yes", needs=(), provides={"maybe": ("response",)})
    with pytest.raises(ValueError, match="tuple of fact names"):
        state("yes", needs="request")
    assert t_legacy.__afpa_contract__ is None


def test_cli_check_names_the_line_and_the_path(tmp_path, capsys):
    bad = tmp_path / "my-http.toml"
    bad.write_text(BROKEN_STALE)
    assert cli.main(["tables", "check", str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    n = line_of(BROKEN_STALE, "on = {", after="[states.derive_cached_response]")
    assert err == [f"{bad}:{n}: [states.send_engine] run: needs 'response', missing on path "
                   "derive_request -complete-> derive_cached_response -stale-> send_engine",
                   f"{bad}: 1 problem(s)"]
    shipped = [str(tables.shipped_table_path(name)) for name in SHIPPED]
    assert cli.main(["tables", "check", *shipped]) == 0


def test_graph_shows_contracts():
    spec, _ = tables.parse(HTTP, "http.toml")
    dot = graph.to_dot(spec, REG)
    assert '"derive_cached_response" -> "send_engine" [label="hit +response"];' in dot
    assert "needs: response" in dot and "// fact response: " in dot
    assert "derive_cached_response --> derive_miss_response : stale +stale" in graph.to_mermaid(spec, REG)
