"""The running machines as JSON-able data, for the admin's live machine page.

:func:`machine_view` reads a server's live counters (the same plain lists the
engine bumps and ``/metrics`` exports) and returns one dict per machine: its
states with their entry and error counts, its transitions with theirs, the
special targets and how often each was reached, and the table's own text.  It is
a snapshot: the caller (the admin resource, a supervisor collecting from its
workers) turns it into JSON.  Every count only grows, so snapshots of several
processes running the same tables add up: :func:`merge_views` does that.

Schema (every count is an int, ``time`` is the server's clock in seconds)::

    {"time": float,
     "machines": [
       {"name": str, "module": str, "doc": str, "source": str, "text": str,
        "start": str, "requests": int,
        "states": [{"name": str, "function": str, "doc": str,
                    "entries": int, "errors": int}],
        "transitions": [{"from": str, "outcome": str, "to": str, "count": int}],
        "specials": [{"name": "@wait" | "@done" | "@close", "doc": str, "count": int}]}]}

``to`` of a transition is a state name or a special target; a special's
``count`` is the sum of the transitions into it.  ``requests`` counts the
requests the machine finished (0 for a machine that keeps no request counters).
The list is in the server's order: the client machine first, then its companions.
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from typing import Any

from afpa.machine import tables

SPECIAL_DOCS = {
    tables.WAIT: "stop; the same state runs again when more input arrives",
    tables.DONE: "the request is finished; the connection goes on",
    tables.CLOSE: "the request is finished; the connection closes",
}


@lru_cache(maxsize=32)
def _docs(text: str) -> tuple[str, dict[str, str]]:
    """(machine doc, state -> doc) from a table's text: compiled machines keep no
    docs, and a page polling every second should not parse TOML each time."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return "", {}

    def doc(table: Any) -> str:
        value = table.get("doc", "") if isinstance(table, dict) else ""
        return value if isinstance(value, str) else ""

    states = data.get("states")
    return doc(data.get("machine")), {name: doc(body) for name, body in
                                      (states.items() if isinstance(states, dict) else ())}


def machine_dict(machine: tables.Machine, requests: int = 0) -> dict[str, Any]:
    """One machine's structure and live counters (see the module doc for the schema)."""
    machine_doc, docs = _docs(machine.text)
    states = [{"name": st.name, "function": st.function, "doc": docs.get(st.name, ""),
               "entries": machine.entries[st.index], "errors": machine.errors[st.index]}
              for st in machine.states.values()]
    transitions = []
    specials: dict[str, int] = {}
    for i, (state, outcome, target) in enumerate(machine.edges):
        count = machine.transitions[i]
        transitions.append({"from": state, "outcome": outcome, "to": target, "count": count})
        if target in SPECIAL_DOCS:
            specials[target] = specials.get(target, 0) + count
    return {
        "name": machine.name, "module": machine.module.name, "doc": machine_doc,
        "source": machine.source, "text": machine.text, "start": machine.start.name,
        "requests": requests, "states": states, "transitions": transitions,
        "specials": [{"name": name, "doc": SPECIAL_DOCS[name], "count": specials[name]}
                     for name in tables.SPECIALS if name in specials],
    }


def machine_view(server: Any) -> dict[str, Any]:
    """Every machine the server runs (client, backend companion, any module's) with
    its live counters, and the server's time (see the module doc for the schema)."""
    out = []
    for m in server.machines():
        stats = server.request_stats.get(m.name)
        out.append(machine_dict(m, stats.count if stats is not None else 0))
    return {"time": server.reactor.seconds(), "machines": out}


def merge_views(views: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up the views of several processes (e.g. workers running the same tables).

    Machines, states, transitions and specials are matched by name (a transition by
    its ``from``, ``outcome`` and ``to``); counts add up; the structure and text are
    the first view's that has the machine (a process still on an older table
    contributes only to what both tables share).  ``time`` is the latest."""
    merged: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for view in views:
        for m in view.get("machines", []):
            name = m["name"]
            if name not in merged:
                merged[name] = _copy_machine(m)
                order.append(name)
                continue
            into = merged[name]
            into["requests"] += m.get("requests", 0)
            _add(into["states"], m["states"], ("name",), ("entries", "errors"))
            _add(into["transitions"], m["transitions"], ("from", "outcome", "to"), ("count",))
            _add(into["specials"], m["specials"], ("name",), ("count",))
    return {"time": max((v.get("time", 0.0) for v in views), default=0.0),
            "machines": [merged[name] for name in order]}


def _copy_machine(m: dict[str, Any]) -> dict[str, Any]:
    out = dict(m)
    for key in ("states", "transitions", "specials"):
        out[key] = [dict(item) for item in m[key]]
    return out


def _add(into: list[dict[str, Any]], more: list[dict[str, Any]], key: tuple[str, ...],
         counts: tuple[str, ...]) -> None:
    index = {tuple(item[k] for k in key): item for item in into}
    for item in more:
        mine = index.get(tuple(item[k] for k in key))
        if mine is not None:
            for c in counts:
                mine[c] += item[c]
