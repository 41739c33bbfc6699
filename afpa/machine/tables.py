"""Transition tables: load TOML, validate, compile to plain objects.

A table is data an operator can read and edit::

    [machine]
    name = "http"            # what metrics and graphs call it
    module = "http"          # protocol module providing unqualified functions
    start = "derive_request"

    [states.derive_request]
    run = "derive_request"   # or "module.fn"; "afpa.fn" is a runtime intrinsic
    on = { complete = "derive_cached_response", need_more = "@wait" }

Special targets: ``@wait`` (stop, run the same state again when more input
arrives), ``@done`` (request finished, the connection goes on) and ``@close``
(request finished, close the connection).

Runtime events are outcomes too (:data:`afpa.machine.modules.EVENTS`): a state
that stops on ``@wait`` may map ``timeout`` and ``peer_closed``, and a state
whose function declares that its wait takes events (``@state(...,
events=(...))``) may map those.  They need no declaration among the function's
outcomes; mapping one where it can never happen is a problem, and one that can
happen but is not mapped gets a note (:func:`notes`) saying what the runtime
does instead (:data:`EVENT_DEFAULTS`).

Validation reports *every* problem with the file, line, state and key, and a table
with any problem is never compiled.  Besides the wiring (every outcome mapped,
every state reachable and able to end), it checks the functions' contracts (see
:mod:`afpa.machine.modules`): along every path from the start state, each state's needs
are provided by the states before it, and a need that one path leaves unmet is
reported with that path.  Compiling turns the table into
:class:`CompiledState` objects whose ``on`` dict maps an outcome straight to the
next state, so one step of a machine costs one dict lookup.  Compiled machines are
never mutated afterwards (only their counters move), so a connection can keep the
machine it started with while a new one is loaded beside it.
"""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import attrs

from afpa.machine.modules import (EVENTS, INPUT, PEER_CLOSED, TIMEOUT, Contract, ProtocolModule, Registry,
                                  StateFn, StateFunction)

WAIT, DONE, CLOSE = "@wait", "@done", "@close"
SPECIALS = (WAIT, DONE, CLOSE)
ENDS = (DONE, CLOSE)
_MACHINE_KEYS = {"name", "module", "start", "doc"}
_STATE_KEYS = {"run", "on", "doc"}


@attrs.frozen
class Problem:
    """One thing wrong with a table, located by file, line, state and key.

    ``str()`` gives ``file:line: [states.X] key: message`` (line, state and key
    when known)."""

    file: str
    state: str | None
    key: str | None
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        parts = []
        if self.state is not None:
            parts.append(f"[states.{self.state}]")
        if self.key is not None:
            parts.append(self.key)
        if parts:
            return f"{where}: {' '.join(parts)}: {self.message}"
        return f"{where}: {self.message}"


class TableError(Exception):
    """A table failed validation; ``problems`` lists everything found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@attrs.define(slots=True, eq=False, repr=False)
class CompiledState:
    """One state of a compiled machine (or one of the special targets, fn None).

    ``on`` maps outcome -> :class:`Edge`; filled once at compile time.
    """

    name: str
    index: int
    fn: StateFn | None
    function: str
    on: dict[str, Edge] = attrs.field(factory=dict)
    events: frozenset[str] = frozenset()  # runtime events its function's wait takes (parked)

    def __repr__(self) -> str:
        return f"<state {self.name}>"


@attrs.frozen(slots=True)
class Edge:
    """A transition: where an outcome leads, and its counter slot.  ``word`` is
    the outcome; ``close`` says the target is ``@close`` (read when a request
    ends, so the driver need not compare names)."""

    target: CompiledState
    index: int
    word: str = ""
    close: bool = False


@attrs.define(slots=True, eq=False)
class Machine:
    """A compiled, validated table.  Counters are plain lists indexed by the
    ``index`` of states and edges so the engine bumps them without a lookup."""

    name: str
    module: ProtocolModule
    start: CompiledState
    states: dict[str, CompiledState]
    edges: list[tuple[str, str, str]]  # (state, outcome, target) per edge index
    source: str
    text: str
    entries: list[int]
    transitions: list[int]
    errors: list[int]


@attrs.frozen
class TableSpec:
    """The parsed (not yet validated) table, kept for drawing and checking."""

    file: str
    text: str
    name: str
    module: str
    start: str
    states: dict[str, dict[str, Any]]


def _stem(name: str) -> str:
    return name[:-5] if name.endswith(".toml") else name


EVENT_DEFAULTS = {
    TIMEOUT: "the connection is closed (a backend exchange fails instead)",
    PEER_CLOSED: "the request is dropped (a backend exchange fails instead)",
    INPUT: "the input stays buffered until the state runs again",
}
"""What the runtime does with an event a table leaves unmapped where it happens."""


def receivable(body: dict[str, Any], fn: StateFunction | None) -> frozenset[str]:
    """The runtime events a state can be given as outcomes: ``timeout`` and
    ``peer_closed`` when it stops on ``@wait``, and whatever its function's
    wait declares (``@state(..., events=...)``)."""
    out = set(fn.events) if fn is not None else set()
    if WAIT in body["on"].values():
        out |= {TIMEOUT, PEER_CLOSED}
    return frozenset(out)


def shipped_table_path(name: str) -> Path:
    """Path of a shipped table by machine name (``http`` -> statetables/http.toml)."""
    return Path(str(resources.files("statetables").joinpath(f"{_stem(name)}.toml")))


def shipped_table_names() -> list[str]:
    """Names of every table shipped in ``statetables/``."""
    root = resources.files("statetables")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def module_table_path(module: ProtocolModule, name: str) -> Path:
    """Where ``module`` keeps its shipped table ``name`` (its ``table`` or a
    companion): in the module's own ``table_dir`` when it has one and the file is
    there, else in afpa's ``statetables/`` (a companion may be another module's
    machine, e.g. a shipped one)."""
    shipped = shipped_table_path(name)
    if module.table_dir is not None:
        own = Path(module.table_dir) / f"{_stem(name)}.toml"
        # Missing in both places: the error names the module's own directory.
        if own.is_file() or not shipped.is_file():
            return own
    return shipped


def known_tables(registry: Registry) -> dict[str, Path]:
    """Every table a name reaches (``afpa tables show NAME``): those shipped in
    ``statetables/`` and each registered module's own (its ``table`` and
    companions found in its ``table_dir``), by name.  A shipped name keeps its
    shipped table; a module's table of the same name is reached by its path."""
    out = {name: shipped_table_path(name) for name in shipped_table_names()}
    for name in sorted(registry.modules):
        module = registry.modules[name]
        if module.table_dir is None:
            continue
        for table in (module.table, *module.companions):
            path = Path(module.table_dir) / f"{_stem(table)}.toml"
            if path.is_file():
                out.setdefault(_stem(table), path)
    return dict(sorted(out.items()))


def parse(text: str, file: str) -> tuple[TableSpec | None, list[Problem]]:
    """Parse TOML into a :class:`TableSpec`, reporting shape problems."""
    problems: list[Problem] = []
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib says where ("... (at line 3, column 7)"); keep it one line.
        message = " ".join(str(exc).split())
        at = re.search(r"at line (\d+)", message)
        return None, [Problem(file, None, None, f"not valid TOML: {message}",
                              int(at.group(1)) if at else None)]
    for key in data:
        if key not in ("machine", "states"):
            problems.append(Problem(file, None, key, "unknown top-level key (expected [machine] and [states.*])"))
    machine = data.get("machine")
    if not isinstance(machine, dict):
        problems.append(Problem(file, None, "machine", "missing [machine] table"))
        machine = {}
    for key in machine:
        if key not in _MACHINE_KEYS:
            problems.append(Problem(file, None, f"machine.{key}", "unknown key"))
    fields = {}
    for key in ("name", "module", "start"):
        value = machine.get(key)
        if not isinstance(value, str) or not value:
            problems.append(Problem(file, None, f"machine.{key}", "missing or not a string"))
            value = ""
        fields[key] = value
    states = data.get("states")
    if not isinstance(states, dict) or not states:
        problems.append(Problem(file, None, "states", "no [states.*] tables"))
        states = {}
    clean: dict[str, dict[str, Any]] = {}
    for sname, body in states.items():
        if sname.startswith("@"):
            problems.append(Problem(file, sname, None, "state names may not start with '@' (reserved for special targets)"))
            continue
        if not isinstance(body, dict):
            problems.append(Problem(file, sname, None, "must be a table with 'run' and 'on'"))
            continue
        for key in body:
            if key not in _STATE_KEYS:
                problems.append(Problem(file, sname, key, "unknown key (expected run, on, doc)"))
        run = body.get("run")
        if not isinstance(run, str) or not run:
            problems.append(Problem(file, sname, "run", "missing or not a string"))
            run = ""
        on = body.get("on", {})
        if not isinstance(on, dict):
            problems.append(Problem(file, sname, "on", "must be a table of outcome = \"target\""))
            on = {}
        good_on = {}
        for outcome, target in on.items():
            if not isinstance(target, str):
                problems.append(Problem(file, sname, f"on.{outcome}", "target must be a string"))
            else:
                good_on[outcome] = target
        clean[sname] = {"run": run, "on": good_on, "doc": body.get("doc", "")}
    spec = TableSpec(file, text, fields["name"], fields["module"], fields["start"], clean)
    return spec, _with_lines(text, problems)


def validate(spec: TableSpec, registry: Registry) -> list[Problem]:
    """Every semantic problem of a parsed table against the registered functions."""
    f = spec.file
    problems: list[Problem] = []
    if spec.module and spec.module not in registry.modules:
        known = ", ".join(sorted(registry.modules)) or "none installed"
        problems.append(Problem(f, None, "machine.module", f"unknown protocol module {spec.module!r} (known: {known})"))
    if spec.start and spec.start not in spec.states:
        problems.append(Problem(f, None, "machine.start", f"start state {spec.start!r} is not defined"))
    for sname, body in spec.states.items():
        run = body["run"]
        declared = None
        fn = None
        if run:
            fn = registry.lookup(run, spec.module)
            if fn is None:
                problems.append(Problem(f, sname, "run", f"unknown function {run!r}"))
            else:
                declared = fn.outcomes
        on = body["on"]
        events = receivable(body, fn)
        for outcome, target in on.items():
            if target not in SPECIALS and target not in spec.states:
                problems.append(Problem(f, sname, f"on.{outcome}", f"unknown target state {target!r}"))
            if outcome in EVENTS and outcome not in (declared or ()):
                if fn is not None and outcome not in events:
                    problems.append(Problem(
                        f, sname, f"on.{outcome}",
                        f"runtime event {outcome!r} never reaches this state (it does not stop on @wait"
                        f" and {run!r} does not declare that its wait takes {outcome!r})"))
            elif declared is not None and outcome not in declared:
                problems.append(Problem(
                    f, sname, f"on.{outcome}",
                    f"function {run!r} never returns {outcome!r} (it returns: {', '.join(sorted(declared))})"))
        if declared is not None:
            for outcome in sorted(declared - on.keys()):
                problems.append(Problem(f, sname, f"on.{outcome}", f"outcome {outcome!r} of {run!r} has no transition"))
    problems.extend(_graph_problems(spec))
    problems.extend(_contract_problems(spec, registry))
    return _with_lines(spec.text, problems)


def _graph_problems(spec: TableSpec) -> list[Problem]:
    """Unreachable states and states from which no path leads to @done/@close."""
    states = spec.states
    if spec.start not in states:
        return []
    succ = {s: {t for t in b["on"].values() if t in states} for s, b in states.items()}
    seen, todo = {spec.start}, [spec.start]
    while todo:
        for nxt in succ[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    problems = [Problem(spec.file, s, None, f"unreachable from start state {spec.start!r}")
                for s in states if s not in seen]
    # Backwards from every state with an edge to an end.
    can_end = {s for s, b in states.items() if any(t in ENDS for t in b["on"].values())}
    changed = True
    while changed:
        changed = False
        for s in states:
            if s not in can_end and succ[s] & can_end:
                can_end.add(s)
                changed = True
    problems += [Problem(spec.file, s, "on", "no path from this state to @done or @close")
                 for s in states if s in seen and s not in can_end]
    return problems


def notes(spec: TableSpec, registry: Registry) -> list[Problem]:
    """Runtime events that can happen in a state whose table entry does not map
    them, each saying what the runtime does instead (not errors: the defaults
    are sensible; a table maps an event to do something else)."""
    out = []
    for sname, body in spec.states.items():
        fn = registry.lookup(body["run"], spec.module) if body["run"] else None
        for event in sorted(receivable(body, fn) - body["on"].keys()):
            if event == PEER_CLOSED and fn is not None and event not in fn.events:
                continue  # the other end left while nothing was under way: nothing to do
            out.append(Problem(spec.file, sname, f"on.{event}",
                               f"note: runtime event {event!r} can happen here and is not mapped: "
                               f"{EVENT_DEFAULTS[event]}"))
    return _with_lines(spec.text, out)


def check_text(text: str, file: str, registry: Registry) -> tuple[TableSpec | None, list[Problem]]:
    """Parse and validate; returns the spec and every problem found."""
    spec, problems = parse(text, file)
    if spec is not None:
        problems += validate(spec, registry)
    return spec, problems


def compile_spec(spec: TableSpec, registry: Registry) -> Machine:
    """Compile a spec that passed validation into a :class:`Machine`."""
    module = registry.modules[spec.module]
    states: dict[str, CompiledState] = {}
    for i, (sname, body) in enumerate(spec.states.items()):
        fn = registry.lookup(body["run"], spec.module)
        assert fn is not None
        states[sname] = CompiledState(sname, i, fn.fn, body["run"], events=fn.events)
    specials = {name: CompiledState(name, -1, None, "") for name in SPECIALS}
    edges: list[tuple[str, str, str]] = []
    for sname, body in spec.states.items():
        st = states[sname]
        for outcome, target in body["on"].items():
            # @wait means "this same state, later": the edge keeps the special
            # marker so the engine knows to stop, not to loop.
            dest = specials[target] if target in specials else states[target]
            st.on[outcome] = Edge(dest, len(edges), outcome, target == CLOSE)
            edges.append((sname, outcome, target))
    return Machine(
        name=spec.name, module=module, start=states[spec.start], states=states, edges=edges,
        source=spec.file, text=spec.text, entries=[0] * len(states),
        transitions=[0] * len(edges), errors=[0] * len(states))


def load(path: str | Path, registry: Registry) -> Machine:
    """Load, validate and compile the table at ``path``; raises :class:`TableError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TableError([Problem(str(path), None, None, f"cannot read: {exc}")]) from exc
    return load_text(text, str(path), registry)


def load_text(text: str, file: str, registry: Registry) -> Machine:
    """Like :func:`load` for table text already in memory."""
    spec, problems = check_text(text, file, registry)
    if problems or spec is None:
        raise TableError(problems)
    return compile_spec(spec, registry)


# -- line numbers ------------------------------------------------------------------
# tomllib keeps no positions, so problems are placed by scanning the text for the
# table header and the key they are about.  A best effort: a key written in an
# unusual TOML form falls back to its table's header line.

_HEADER = re.compile(r"^\s*\[\[?\s*([^\[\]]+?)\s*\]\]?\s*(?:#.*)?$")


class _Lines:
    """Where each table header and key of a TOML text is."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.sections: list[tuple[tuple[str, ...], int, int]] = []  # (path, first, end) 0-based
        path: tuple[str, ...] = ()
        first = 0
        for i, line in enumerate(self.lines):
            m = _HEADER.match(line)
            if m:
                self.sections.append((path, first, i))
                path = tuple(p.strip().strip("\"'") for p in m.group(1).split("."))
                first = i
        self.sections.append((path, first, len(self.lines)))

    def header(self, path: tuple[str, ...]) -> int | None:
        for p, first, _ in self.sections:
            if p == path and path:
                return first + 1
        return None

    def key(self, path: tuple[str, ...], key: str, inline: str | None = None) -> int | None:
        """Line of ``key = ...`` in the table at ``path`` (and, with ``inline``, of
        that key inside the inline table on that line)."""
        pat = re.compile(r"^\s*[\"']?" + re.escape(key) + r"[\"']?\s*[=.]")
        inner = re.compile(r"[{,.]\s*[\"']?" + re.escape(inline) + r"[\"']?\s*=") if inline else None
        for p, first, end in self.sections:
            if p != path:
                continue
            for i in range(first, end):
                line = self.lines[i]
                if pat.match(line) and (inner is None or inner.search(line)):
                    return i + 1
        return None

    def locate(self, state: str | None, key: str | None) -> int | None:
        if state is None:
            if key is None:
                return None
            head, _, rest = key.partition(".")
            if rest:
                return self.key((head,), rest) or self.header((head,))
            return self.header((head,)) or self.key((), head)
        base = ("states", state)
        found = None
        if key is not None:
            head, _, rest = key.partition(".")
            if head == "on" and rest:
                found = (self.key(base + ("on",), rest) or self.key(base, "on", rest)
                         or self.key(base, "on"))
            else:
                found = self.key(base, head)
            if found is None and head == "on":
                found = self.header(base + ("on",))
        return found or self.header(base) or self.key(("states",), state)


def _with_lines(text: str, problems: list[Problem]) -> list[Problem]:
    """The problems with their line numbers filled in where they can be found."""
    if not problems:
        return problems
    where = _Lines(text)
    return [p if p.line is not None else attrs.evolve(p, line=where.locate(p.state, p.key))
            for p in problems]


# -- contracts ------------------------------------------------------------------------

def _contracts(spec: TableSpec, registry: Registry) -> dict[str, Contract | None]:
    """Each state's contract; None for a function that declares none (or is unknown),
    which the analysis trusts to provide whatever its successors need."""
    out: dict[str, Contract | None] = {}
    for sname, body in spec.states.items():
        fn = registry.lookup(body["run"], spec.module) if body["run"] else None
        out[sname] = fn.contract if fn is not None else None
    return out


def _edges(spec: TableSpec) -> list[tuple[str, str, str]]:
    """(state, outcome, next state) for every transition between states.  @wait runs
    the same state again with the same request, so it adds nothing; @done and
    @close end the request, and the next one starts afresh."""
    return [(s, o, t) for s, b in spec.states.items() for o, t in b["on"].items()
            if t in spec.states]


def available_facts(spec: TableSpec, registry: Registry) -> dict[str, frozenset[str]]:
    """For every state reachable from the start, the facts that hold on entry along
    *every* path from the start state (a forward "must" data-flow analysis).

    ``in(start) = {}`` (a request starts with nothing); for every other state,
    ``in(s)`` is the intersection over each incoming edge ``p -o-> s`` of
    ``(in(p) - drops(p, o)) | provides(p, o)``; a state without a contract
    passes every fact on.  Solved by iterating from "everything" down to the
    greatest fixpoint."""
    contracts = _contracts(spec, registry)
    universe: set[str] = set()
    for c in contracts.values():
        if c is not None:
            universe |= c.needs
            for fs in (*c.provides.values(), *c.drops.values()):
                universe |= fs
    top = frozenset(universe)
    edges = _edges(spec)
    incoming: dict[str, list[tuple[str, str]]] = {s: [] for s in spec.states}
    for s, o, t in edges:
        incoming[t].append((s, o))
    reach = _reachable(spec)
    avail = {s: top for s in reach}
    avail[spec.start] = frozenset()

    def out(p: str, o: str) -> frozenset[str]:
        c = contracts[p]
        if c is None:
            return top
        return (avail[p] - c.drops.get(o, frozenset())) | c.provides.get(o, frozenset())

    changed = True
    while changed:
        changed = False
        for s in reach:
            if s == spec.start:
                continue
            new = top
            for p, o in incoming[s]:
                if p in reach:
                    new = new & out(p, o)
            if new != avail[s]:
                avail[s] = new
                changed = True
    return avail


def _reachable(spec: TableSpec) -> list[str]:
    """States reachable from the start, in breadth-first order."""
    if spec.start not in spec.states:
        return []
    order, seen = [spec.start], {spec.start}
    for s in order:
        for t in spec.states[s]["on"].values():
            if t in spec.states and t not in seen:
                seen.add(t)
                order.append(t)
    return order


def _path_without(spec: TableSpec, contracts: dict[str, Contract | None], fact: str,
                  goal: str) -> list[tuple[str, str, str]] | None:
    """One shortest path from the start to ``goal`` along which ``fact`` is never
    provided (or is dropped after the last time it was), as its edges
    ``(state, outcome, next)``; None if there is none."""
    edges: dict[str, list[tuple[str, str]]] = {s: [] for s in spec.states}
    for s, o, t in _edges(spec):
        edges[s].append((o, t))
    first = (spec.start, True)  # (state, fact missing on entry)
    parent: dict[tuple[str, bool], tuple[tuple[str, bool], str] | None] = {first: None}
    todo = [first]
    for node in todo:
        s, missing = node
        if s == goal and missing:
            steps = []
            while parent[node] is not None:
                prev, o = parent[node]
                steps.append((prev[0], o, node[0]))
                node = prev
            return steps[::-1]
        c = contracts[s]
        for o, t in edges[s]:
            if c is None:
                nxt = (t, False)
            else:
                nxt = (t, (missing or fact in c.drops.get(o, ())) and fact not in c.provides.get(o, ()))
            if nxt not in parent:
                parent[nxt] = (node, o)
                todo.append(nxt)
    return None


def _contract_problems(spec: TableSpec, registry: Registry) -> list[Problem]:
    """Every need of a reachable state that some path from the start leaves unmet."""
    contracts = _contracts(spec, registry)
    avail = available_facts(spec, registry)
    problems = []
    lines: _Lines | None = None
    for sname in spec.states:
        c = contracts[sname]
        if c is None or sname not in avail:
            continue
        for fact in sorted(c.needs - avail[sname]):
            path = _path_without(spec, contracts, fact, sname)
            if not path:
                problems.append(Problem(spec.file, sname, "run",
                                        f"needs {fact!r}, missing when a request starts here"))
                continue
            text = path[0][0] + "".join(f" -{o}-> {t}" for _, o, t in path)
            # The line is that of the last transition on the path: the wiring to look at.
            lines = lines or _Lines(spec.text)
            last, outcome, _ = path[-1]
            problems.append(Problem(spec.file, sname, "run", f"needs {fact!r}, missing on path {text}",
                                    lines.locate(last, f"on.{outcome}")))
    return problems
