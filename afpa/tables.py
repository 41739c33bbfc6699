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

Validation reports *every* problem with the file, state and key, and a table with
any problem is never compiled.  Compiling turns the table into
:class:`CompiledState` objects whose ``on`` dict maps an outcome straight to the
next state, so one step of a machine costs one dict lookup.  Compiled machines are
never mutated afterwards (only their counters move), so a connection can keep the
machine it started with while a new one is loaded beside it.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import attrs

from afpa.modules import ProtocolModule, Registry, StateFn

WAIT, DONE, CLOSE = "@wait", "@done", "@close"
SPECIALS = (WAIT, DONE, CLOSE)
ENDS = (DONE, CLOSE)
_MACHINE_KEYS = {"name", "module", "start", "doc"}
_STATE_KEYS = {"run", "on", "doc"}


@attrs.frozen
class Problem:
    """One thing wrong with a table, located by file, state and key."""

    file: str
    state: str | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.state is not None:
            where += f": [states.{self.state}]"
        if self.key is not None:
            where += f" {self.key}"
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

    def __repr__(self) -> str:
        return f"<state {self.name}>"


@attrs.frozen(slots=True)
class Edge:
    """A transition: where an outcome leads, and its counter slot."""

    target: CompiledState
    index: int


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


def shipped_table_path(name: str) -> Path:
    """Path of a shipped table by machine name (``http`` -> statetables/http.toml)."""
    stem = name[:-5] if name.endswith(".toml") else name
    return Path(str(resources.files("statetables").joinpath(f"{stem}.toml")))


def shipped_table_names() -> list[str]:
    """Names of every table shipped in ``statetables/``."""
    root = resources.files("statetables")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def parse(text: str, file: str) -> tuple[TableSpec | None, list[Problem]]:
    """Parse TOML into a :class:`TableSpec`, reporting shape problems."""
    problems: list[Problem] = []
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [Problem(file, None, None, f"not valid TOML: {exc}")]
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
    return spec, problems


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
        if run:
            fn = registry.lookup(run, spec.module)
            if fn is None:
                problems.append(Problem(f, sname, "run", f"unknown function {run!r}"))
            else:
                declared = fn.outcomes
        on = body["on"]
        for outcome, target in on.items():
            if target not in SPECIALS and target not in spec.states:
                problems.append(Problem(f, sname, f"on.{outcome}", f"unknown target state {target!r}"))
            if declared is not None and outcome not in declared:
                problems.append(Problem(
                    f, sname, f"on.{outcome}",
                    f"function {run!r} never returns {outcome!r} (it returns: {', '.join(sorted(declared))})"))
        if declared is not None:
            for outcome in sorted(declared - on.keys()):
                problems.append(Problem(f, sname, f"on.{outcome}", f"outcome {outcome!r} of {run!r} has no transition"))
    problems.extend(_graph_problems(spec))
    return problems


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
        states[sname] = CompiledState(sname, i, fn.fn, body["run"])
    specials = {name: CompiledState(name, -1, None, "") for name in SPECIALS}
    edges: list[tuple[str, str, str]] = []
    for sname, body in spec.states.items():
        st = states[sname]
        for outcome, target in body["on"].items():
            # @wait means "this same state, later": the edge keeps the special
            # marker so the engine knows to stop, not to loop.
            dest = specials[target] if target in specials else states[target]
            st.on[outcome] = Edge(dest, len(edges))
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
