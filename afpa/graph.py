"""Draw a table as Graphviz DOT or Mermaid, straight from the table's own data.

The picture is made from the same :class:`~afpa.tables.TableSpec` the server
compiles, so what an operator sees is what runs.  ``@wait`` is drawn as a dashed
self-loop (the state runs again when more input arrives); ``@done`` and
``@close`` are end nodes.
"""

from __future__ import annotations

from afpa.tables import CLOSE, DONE, WAIT, TableSpec

_END_LABEL = {DONE: "done (next request)", CLOSE: "close connection"}


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(spec: TableSpec) -> str:
    """Graphviz DOT for a table (``dot -Tsvg`` draws it)."""
    lines = [f"digraph {_q(spec.name or 'machine')} {{",
             "  rankdir=TB;",
             '  node [shape=box, style="rounded", fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=10];',
             '  "__start" [shape=point, width=0.15];',
             f"  \"__start\" -> {_q(spec.start)};"]
    used_ends = set()
    for sname, body in spec.states.items():
        label = _q(sname) if body["run"] == sname else _q(sname)[:-1] + "\\n" + _q(f"({body['run']})")[1:]
        lines.append(f"  {_q(sname)} [label={label}];")
    for sname, body in spec.states.items():
        for outcome, target in body["on"].items():
            if target == WAIT:
                lines.append(f"  {_q(sname)} -> {_q(sname)} [label={_q(outcome + ' (wait)')}, style=dashed];")
            elif target in _END_LABEL:
                used_ends.add(target)
                lines.append(f"  {_q(sname)} -> {_q(target)} [label={_q(outcome)}];")
            else:
                lines.append(f"  {_q(sname)} -> {_q(target)} [label={_q(outcome)}];")
    for end in sorted(used_ends):
        lines.append(f"  {_q(end)} [shape=doublecircle, label={_q(_END_LABEL[end])}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _mid(name: str) -> str:
    """Mermaid state ids may not contain '@' or '-'."""
    return name.replace("@", "end_").replace("-", "_").replace(".", "_")


def to_mermaid(spec: TableSpec) -> str:
    """Mermaid ``stateDiagram-v2`` text for a table."""
    lines = ["stateDiagram-v2", f"    [*] --> {_mid(spec.start)}"]
    for sname, body in spec.states.items():
        if body["run"] != sname:
            lines.append(f"    {_mid(sname)} : {sname} ({body['run']})")
    for sname, body in spec.states.items():
        for outcome, target in body["on"].items():
            if target == WAIT:
                lines.append(f"    {_mid(sname)} --> {_mid(sname)} : {outcome} (wait)")
            elif target in _END_LABEL:
                lines.append(f"    {_mid(sname)} --> [*] : {outcome} ({target[1:]})")
            else:
                lines.append(f"    {_mid(sname)} --> {_mid(target)} : {outcome}")
    return "\n".join(lines) + "\n"
