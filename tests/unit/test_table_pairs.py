"""The Driver over every (state, outcome) pair of every shipped table.

For each table afpa ships (``statetables/*.toml``, and any table directory a
registered module brings), each state and each outcome its function declares or
its table maps, a stub makes the state return that outcome and the test checks
that the Driver goes exactly where the compiled table says:

- to a state: that state's function runs next;
- ``@wait``: the machine parks (``waiting``) and the same state runs again on
  the next event;
- ``@done``: the request ends and the machine goes on with a new one;
- ``@close``: the request ends and nothing runs after it;

with the entry and transition counters of that edge bumped.  An outcome the
table does not map (and a state that raises) is counted as an error and handed
to ``failed``.

The outcome reaches the Driver three ways: returned as a word, fired later
through a Deferred (how runtime events come back to a parked machine), and
with the request asking to be traced (the tracing loop).  Stubs replace the
real functions, so nothing here depends on what HTTP (or DNS) states do: only on
the tables.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred

from afpa.machine import tables
from afpa.machine.driver import Driver
from afpa.machine.scopes import Connection
from afpa.machine.trace import begin
from afpa.net.intrinsics import default_registry

REG = default_registry()
UNMAPPED = "__no_table_maps_this__"


def table_paths() -> list[Path]:
    """Every shipped table, found on disk (a table added later is covered too)."""
    paths = {tables.shipped_table_path(n) for n in tables.shipped_table_names()}
    for module in REG.modules.values():
        table_dir = getattr(module, "table_dir", None)
        if table_dir:
            paths |= set(Path(table_dir).glob("*.toml"))
    return sorted(paths)


def outcomes_of(machine: tables.Machine, state: tables.CompiledState) -> list[str]:
    """What the state's function declares, plus what its table maps (runtime
    events such as ``timeout`` may be mapped without the function returning them)."""
    fn = REG.lookup(state.function, machine.module.name)
    declared = fn.outcomes if fn is not None else frozenset()
    return sorted(declared | state.on.keys())


def _pairs():
    out = []
    for path in table_paths():
        machine = tables.load(path, REG)
        for state in machine.states.values():
            for outcome in outcomes_of(machine, state):
                out.append(pytest.param(path, state.name, outcome,
                                        id=f"{path.stem}:{state.name}:{outcome}"))
    return out


def _states():
    return [pytest.param(path, name, id=f"{path.stem}:{name}")
            for path in table_paths() for name in tables.load(path, REG).states]


PAIRS = _pairs()
STATES = _states()
HOW = ("word", "deferred", "traced")


class Req:
    """A request scope with just what the Driver (and its tracing loop) reads."""

    def __init__(self, n: int):
        self.n = n
        self.trace = None
        self.started = 0.0
        self.head = None
        self.sent_head = False


class Rig(Driver):
    """A Driver with no sockets: it records every hook and every state run.

    Each state's function is a stub that returns what ``script`` says for that
    state (one answer per run); a state with nothing scripted parks on a
    Deferred that never fires, which ends the step loop."""

    def __init__(self, machine: tables.Machine):
        self.g = None
        self.conn = Connection(transport=None, machine=machine, state=machine.start)
        self.conn.driver = self
        self.runs: list[str] = []
        self.events: list[tuple] = []
        self.script: dict[str, list] = {}
        self.made = 0
        for state in machine.states.values():
            state.fn = self._stub(state.name)

    def _stub(self, name: str):
        def fn(g, conn, req):
            self.runs.append(name)
            answers = self.script.get(name)
            if answers:
                answer = answers.pop(0)
                if isinstance(answer, Exception):
                    raise answer
                return answer
            return Deferred()  # parks: nothing runs after it
        return fn

    def seconds(self) -> float:
        return 0.0

    def new_request(self):
        self.made += 1
        return Req(self.made)

    def waiting(self):
        self.events.append(("waiting", self.conn.state.name))

    def suspended(self):
        self.events.append(("suspended", self.conn.state.name))

    def finished(self, req, edge):
        close = edge.close
        self.events.append(("finished", req.n, close))
        self.conn.req = None
        if close:
            return None
        self.conn.state = self.conn.machine.start
        return self.conn.machine.start

    def failed(self):
        self.events.append(("failed",))


def fresh(path: Path) -> tuple[tables.Machine, Rig]:
    """A machine compiled for this test alone (its states get stub functions)."""
    machine = tables.load(path, REG)
    return machine, Rig(machine)


def drive(rig: Rig, state: tables.CompiledState, outcome: str, how: str) -> None:
    """Run ``state`` so that it ends with ``outcome``, delivered the ``how`` way."""
    if how == "word":
        rig.script[state.name] = [outcome]
        rig.run(state, None)
    elif how == "traced":
        rig.script[state.name] = [begin(outcome)]
        rig.run(state, None)
    else:
        d = Deferred()
        rig.script[state.name] = [d]
        rig.run(state, None)
        assert rig.events == [("suspended", state.name)] and rig.conn.busy
        rig.events.clear()
        d.callback(outcome)


def edge_count(machine: tables.Machine, state: str, outcome: str) -> int:
    for i, (s, o, _) in enumerate(machine.edges):
        if s == state and o == outcome:
            return machine.transitions[i]
    raise AssertionError(f"no edge {state} -{outcome}->")


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(("path", "name", "outcome"), PAIRS)
def test_outcome_goes_where_the_table_says(path, name, outcome, how):
    machine, rig = fresh(path)
    state = machine.states[name]
    edge = state.on.get(outcome)
    drive(rig, state, outcome, how)

    if edge is None:
        # Declared by the function but not mapped: an error, and the request ends.
        assert rig.runs == [name]
        assert rig.events == [("failed",)]
        assert machine.errors[state.index] == 1
        assert sum(machine.transitions) == 0
        return

    target = edge.target
    assert edge_count(machine, name, outcome) == 1
    assert sum(machine.transitions) == 1
    assert sum(machine.errors) == 0

    if target.fn is not None:
        # The target's function runs next, on the same request.
        assert rig.runs == [name, target.name]
        assert rig.events == [("suspended", target.name)]
        assert machine.entries[target.index] == (2 if target is state else 1)
        assert rig.made == 1
    elif target.name == tables.WAIT:
        assert rig.runs == [name]
        assert rig.events == [("waiting", name)]
        assert rig.conn.state is state
        # The next input runs the same state again, for the same request.
        req = rig.conn.req
        rig.events.clear()
        rig.deliver("input")
        assert rig.runs == [name, name]
        assert rig.conn.req is req and rig.made == 1
        assert machine.entries[state.index] == 2
    elif target.name == tables.DONE:
        # The request ends; the machine goes on with a new one from the start.
        start = machine.start
        assert rig.runs == [name, start.name]
        assert rig.events == [("finished", 1, False), ("suspended", start.name)]
        assert rig.made == 2 and rig.conn.req.n == 2
    else:
        assert target.name == tables.CLOSE
        assert rig.runs == [name]
        assert rig.events == [("finished", 1, True)]
        assert rig.conn.req is None and rig.made == 1
    assert machine.entries[state.index] >= 1


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(("path", "name"), STATES)
def test_unmapped_outcome_is_an_error(path, name, how):
    machine, rig = fresh(path)
    state = machine.states[name]
    drive(rig, state, UNMAPPED, how)
    assert rig.runs == [name]
    assert rig.events == [("failed",)]
    assert machine.errors[state.index] == 1
    assert machine.entries[state.index] == 1
    assert sum(machine.transitions) == 0


@pytest.mark.parametrize(("path", "name"), STATES)
def test_a_state_that_raises_is_an_error(path, name):
    machine, rig = fresh(path)
    state = machine.states[name]
    rig.script[name] = [RuntimeError("boom")]
    rig.run(state, None)
    assert rig.runs == [name]
    assert rig.events == [("failed",)]
    assert machine.errors[state.index] == 1
    assert sum(machine.transitions) == 0


def test_every_shipped_table_is_covered():
    """The discovery finds the tables on disk and every module's own tables, not
    a list written here."""
    covered = {p.resolve() for p in table_paths()}
    shipped = Path(str(resources.files("statetables")))
    assert {p.resolve() for p in shipped.glob("*.toml")} <= covered
    for module in REG.modules.values():
        for name in (module.table, *module.companions):
            if name:
                assert Path(name).stem in {p.stem for p in covered}, (module.name, name)
    assert len(covered) >= 2


EVENT_ENDS = [pytest.param(path, name, word, id=f"{path.stem}:{name}:{word}")
              for path in table_paths() for name, state in tables.load(path, REG).states.items()
              for word in ("timeout", "peer_closed")
              if word in state.on and state.on[word].target.fn is None]


@pytest.mark.parametrize(("path", "name", "word"), EVENT_ENDS)
def test_an_event_between_requests_ends_a_request_of_its_own(path, name, word):
    """An idle connection (no request scope yet) that times out or closes where
    the table maps the event straight to an end: the driver still ends a request
    (its hooks never get None)."""
    machine, rig = fresh(path)
    state = machine.states[name]
    rig.conn.state = state
    assert rig.conn.req is None
    rig.deliver(word)
    assert rig.events and rig.events[0][0] == "finished" and rig.events[0][1] == 1
