"""Draw a table as Graphviz DOT or Mermaid, straight from the table's own data.

The picture is made from the same :class:`~afpa.machine.tables.TableSpec` the server
compiles, so what an operator sees is what runs.  ``@wait`` is drawn as a dashed
self-loop (the state runs again when more input arrives); ``@done`` and
``@close`` are end nodes.  Given the registry, each state also shows the facts
its function needs and each transition the facts it provides (``+fact``) or
drops (``-fact``), from the functions' declared contracts.
"""

from __future__ import annotations

from typing import Any

from afpa.machine.modules import RUNTIME_FACTS, Contract, Registry
from afpa.machine.tables import CLOSE, DONE, WAIT, TableSpec

_END_LABEL = {DONE: "done (next request)", CLOSE: "close connection"}


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _contracts(spec: TableSpec, registry: Registry | None) -> dict[str, Contract]:
    if registry is None:
        return {}
    out = {}
    for sname, body in spec.states.items():
        fn = registry.lookup(body["run"], spec.module) if body["run"] else None
        if fn is not None and fn.contract is not None:
            out[sname] = fn.contract
    return out


def _legend(spec: TableSpec, registry: Registry | None, contracts: dict[str, Contract],
            comment: str) -> list[str]:
    """What each fact used by the table means, as comment lines."""
    used: set[str] = set()
    for c in contracts.values():
        used |= c.needs
        for fs in (*c.provides.values(), *c.drops.values()):
            used |= fs
    if registry is None or not used:
        return []
    module = registry.modules.get(spec.module)
    meanings = {**(module.facts if module is not None else {}), **RUNTIME_FACTS}
    return [f"{comment} fact {f}: {meanings.get(f, '(not described by its module)')}" for f in sorted(used)]


def _needs(c: Contract | None) -> str:
    return f"needs: {', '.join(sorted(c.needs))}" if c is not None and c.needs else ""


def _facts(c: Contract | None, outcome: str) -> str:
    if c is None:
        return ""
    plus = [f"+{f}" for f in sorted(c.provides.get(outcome, ()))]
    minus = [f"-{f}" for f in sorted(c.drops.get(outcome, ()))]
    return "".join(" " + f for f in plus + minus)


def to_dot(spec: TableSpec, registry: Registry | None = None) -> str:
    """Graphviz DOT for a table (``dot -Tsvg`` draws it); with ``registry``, the
    functions' contracts are drawn too."""
    contracts: dict[str, Any] = _contracts(spec, registry)
    lines = [f"digraph {_q(spec.name or 'machine')} {{",
             "  rankdir=TB;",
             '  node [shape=box, style="rounded", fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=10];',
             *_legend(spec, registry, contracts, "  //"),
             '  "__start" [shape=point, width=0.15];',
             f"  \"__start\" -> {_q(spec.start)};"]
    used_ends = set()
    for sname, body in spec.states.items():
        label = _q(sname) if body["run"] == sname else _q(sname)[:-1] + "\\n" + _q(f"({body['run']})")[1:]
        needs = _needs(contracts.get(sname))
        if needs:
            label = label[:-1] + "\\n" + _q(needs)[1:]
        lines.append(f"  {_q(sname)} [label={label}];")
    for sname, body in spec.states.items():
        for outcome, target in body["on"].items():
            word = outcome + _facts(contracts.get(sname), outcome)
            if target == WAIT:
                lines.append(f"  {_q(sname)} -> {_q(sname)} [label={_q(word + ' (wait)')}, style=dashed];")
            elif target in _END_LABEL:
                used_ends.add(target)
                lines.append(f"  {_q(sname)} -> {_q(target)} [label={_q(word)}];")
            else:
                lines.append(f"  {_q(sname)} -> {_q(target)} [label={_q(word)}];")
    for end in sorted(used_ends):
        lines.append(f"  {_q(end)} [shape=doublecircle, label={_q(_END_LABEL[end])}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _mid(name: str) -> str:
    """Mermaid state ids may not contain '@' or '-'."""
    return name.replace("@", "end_").replace("-", "_").replace(".", "_")


def to_mermaid(spec: TableSpec, registry: Registry | None = None) -> str:
    """Mermaid ``stateDiagram-v2`` text for a table (with ``registry``, contracts too)."""
    contracts: dict[str, Any] = _contracts(spec, registry)
    lines = ["stateDiagram-v2", *_legend(spec, registry, contracts, "    %%"),
             f"    [*] --> {_mid(spec.start)}"]
    for sname, body in spec.states.items():
        if body["run"] != sname:
            lines.append(f"    {_mid(sname)} : {sname} ({body['run']})")
        needs = _needs(contracts.get(sname))
        if needs:
            lines.append(f"    {_mid(sname)} : {needs}")
    for sname, body in spec.states.items():
        for raw, target in body["on"].items():
            outcome = raw + _facts(contracts.get(sname), raw)
            if target == WAIT:
                lines.append(f"    {_mid(sname)} --> {_mid(sname)} : {outcome} (wait)")
            elif target in _END_LABEL:
                lines.append(f"    {_mid(sname)} --> [*] : {outcome} ({target[1:]})")
            else:
                lines.append(f"    {_mid(sname)} --> {_mid(target)} : {outcome}")
    return "\n".join(lines) + "\n"
