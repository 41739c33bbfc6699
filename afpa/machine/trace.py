"""Per-request traces and the live trace hub (protocol-neutral).

A :class:`Trace` records the states one request went through, each with when
it began and ended; the engine's tracing loop (``Driver.run_traced``) fills it.
Recording costs the untraced fast path nothing: a request is traced only when

- it asked to be (a module's state returns :func:`begin`'s marker instead of
  its outcome word: the HTTP module does so for ``Afpa-Trace: 1`` from a
  trusted peer, and the engine switches that request to the tracing loop), or
- someone wants every request (a :class:`TraceHub` subscriber, or an access
  log format that prints the state path): the server then runs every
  connection's machine with the tracing loop until nobody does.

A finished traced request becomes one JSON-able event (:func:`event`) that the
hub hands to each subscriber whose :class:`TraceFilter` it passes.  A machine
other than the client's (a backend exchange) records into the same trace with
its machine name as prefix (``http-backend:backend_connect``).

Times are the reactor's seconds; durations are reported in whole microseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.logger import Logger

_log = Logger(namespace="afpa.machine.trace")

# One recorded step: [label, start, end (None while it runs), note (None or e.g.
# "raised"), the state]: one list per state entered, nothing else allocated.


class Begin:
    """What a state returns (instead of its outcome word) to have the request
    traced from now on, with the trace written into its answer (see
    :func:`begin`)."""

    __slots__ = ("word",)

    def __init__(self, word: str):
        self.word = word


_BEGUN: dict[str, Begin] = {}


def begin(word: str) -> Begin:
    """The marker for outcome ``word`` that also starts tracing the request
    (the state that returns it is recorded as begun when the request began)."""
    marker = _BEGUN.get(word)
    if marker is None:
        marker = _BEGUN[word] = Begin(word)
    return marker


@attrs.define(slots=True, eq=False)
class Trace:
    """The states of one request with their times (``clock``: the driver's).

    ``header``: the request asked for its trace in its answer (the module
    writes :meth:`text` into the response before the Send Engine runs).
    """

    clock: Callable[[], float]
    header: bool = False
    steps: list = attrs.field(factory=list)   # steps in the order the states began
    open: dict = attrs.field(factory=dict)    # machine prefix -> its running step

    def enter(self, prefix: str, state: Any, now: float | None = None) -> None:
        """``state`` starts at ``now`` (default: the clock), unless it is the one
        still open (a re-run after waiting for input is the same step)."""
        cur = self.open.get(prefix)
        if cur is not None and cur[4] is state:
            return
        step = [prefix + state.name, self.clock() if now is None else now, None, None, state]
        self.steps.append(step)
        self.open[prefix] = step

    def move(self, prefix: str, state: Any, now: float) -> None:
        """The open step of machine ``prefix`` ends and ``state`` starts, at ``now``."""
        open_ = self.open
        cur = open_.get(prefix)
        if cur is not None:
            cur[2] = now
        step = open_[prefix] = [prefix + state.name, now, None, None, state]
        self.steps.append(step)

    def leave(self, prefix: str, now: float, note: str | None = None) -> None:
        """The open step of machine ``prefix`` ends (``note``: how, when not normally)."""
        step = self.open.pop(prefix, None)
        if step is not None:
            step[2] = now
            if note is not None:
                step[3] = note

    def path(self, now: float | None = None) -> list[list]:
        """``[[label, microseconds], ...]`` in the order the states began; a
        step still running counts up to ``now`` and gets a third item
        ``"running"``; a step that failed names how (``"raised"``)."""
        out = []
        for label, start, end, note, _ in self.steps:
            if end is None:
                item = [label, _us((now if now is not None else start) - start), "running"]
            else:
                item = [label, _us(end - start)]
                if note is not None:
                    item.append(note)
            out.append(item)
        return out

    def text(self, now: float) -> str:
        """The path as a response header value, e.g.
        ``derive_request 12us > derive_cached_response 8us > send_engine``: a step
        still running (the Send Engine about to write this very header, a
        state waiting for a backend) shows the time so far with a ``+``, or
        no time when it has only just begun."""
        parts = []
        for label, start, end, note, _ in self.steps:
            if end is None:
                us = _us(now - start)
                parts.append(f"{label} {us}us+" if us else label)
            else:
                parts.append(f"{label} {_us(end - start)}us" + (f" ({note})" if note else ""))
        return " > ".join(parts)

    def compact(self) -> str:
        """The path without spaces, for a log field: ``derive_request:12us>send_engine:30us``."""
        out = []
        for label, start, end, note, _ in self.steps:
            if note is None:
                out.append(f"{label}:{int(((end or start) - start) * 1e6 + 0.5)}us")
            else:
                out.append(f"{label}:{int(((end or start) - start) * 1e6 + 0.5)}us!{note}")
        return ">".join(out) if out else "-"


def _us(seconds: float) -> int:
    return int(round(seconds * 1e6)) if seconds > 0 else 0


def event(conn: Any, req: Any, machine: str, now: float, fields: Mapping[str, Any] | None = None) -> dict:
    """The JSON-able record of a finished request: when it began, the peer, the
    machine, its status and duration, the state path (``[[state, us], ...]``)
    and the protocol module's own fields (HTTP: method, host, path,
    cache_status, bytes)."""
    trace = req.trace
    out = {"time": round(req.started, 6), "peer": conn.peer, "machine": machine, "status": req.status,
           "duration_ms": round((now - req.started) * 1000, 3),
           "states": trace.path(now) if trace is not None else []}
    if fields:
        out.update(fields)
    return out


def format_event(ev: Mapping[str, Any]) -> str:
    """One readable line for an event (``afpa trace``): time, peer, the request,
    status, Cache-Status, size, duration and the state path."""
    import time

    when = ev.get("time", 0.0)
    parts = [time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when * 1000) % 1000:03d}",
             str(ev.get("peer", "-"))]
    if "method" in ev:
        target = str(ev.get("path", "")) + ("?" + str(ev["query"]) if ev.get("query") else "")
        parts.append(f"{ev['method']} {ev.get('host', '')}{target}")
    parts.append(str(ev.get("status", "-")))
    if "cache_status" in ev:
        parts.append(f"\"{ev['cache_status']}\"")
    if "bytes" in ev:
        parts.append(f"{ev['bytes']}B")
    parts.append(f"{ev.get('duration_ms', 0)}ms")
    steps = []
    for step in ev.get("states", ()):
        text = f"{step[0]} {step[1]}us"
        if len(step) > 2:
            text += f" ({step[2]})"
        steps.append(text)
    parts.append(" > ".join(steps) if steps else "-")
    return " ".join(parts)


class FilterError(ValueError):
    """A trace filter that cannot be used (one-line message naming the parameter)."""


class TraceFilter:
    """Which finished requests a subscriber wants: all of ``host`` (exact, case
    insensitive), ``path`` (prefix), ``status`` (``404``, or a class ``5xx``) and
    ``state`` (a state visited; a companion machine's states match with or
    without their ``machine:`` prefix) must hold; then 1 in ``sample`` is kept."""

    __slots__ = ("host", "path", "status", "status_class", "state", "sample", "seen")

    def __init__(self, host: str | None = None, path: str | None = None, status: str | int | None = None,
                 state: str | None = None, sample: int = 1):
        self.host = host.lower() if host else None
        self.path = path or None
        self.status: int | None = None
        self.status_class: int | None = None
        if status not in (None, ""):
            text = str(status).strip().lower()
            if len(text) == 3 and text[0] in "12345" and text[1:] == "xx":
                self.status_class = int(text[0])
            elif text.isdigit() and 100 <= int(text) <= 999:
                self.status = int(text)
            else:
                raise FilterError(f"status: expected a status like 404 or a class like 5xx, got {status!r}")
        self.state = state or None
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
            raise FilterError(f"sample: expected a whole number 1 or more (1 in N requests), got {sample!r}")
        self.sample = sample
        self.seen = 0

    @classmethod
    def from_query(cls, args: Mapping[str, Iterable[str] | str]) -> TraceFilter:
        """A filter from query parameters (``host``, ``path``, ``status``,
        ``state``, ``sample``); unknown or malformed ones raise :class:`FilterError`."""
        known = ("host", "path", "status", "state", "sample")
        values: dict[str, str] = {}
        for key, value in args.items():
            if key not in known:
                raise FilterError(f"unknown parameter {key!r} (known: {', '.join(known)})")
            if not isinstance(value, str):
                value = list(value)[-1] if value else ""
            values[key] = value
        sample = values.pop("sample", "") or "1"
        if not sample.isdigit():
            raise FilterError(f"sample: expected a whole number 1 or more (1 in N requests), got {sample!r}")
        return cls(sample=int(sample), **{k: v for k, v in values.items() if v})

    def describe(self) -> dict:
        """The filter as JSON-able data (what was asked)."""
        status = f"{self.status_class}xx" if self.status_class else self.status
        return {k: v for k, v in (("host", self.host), ("path", self.path), ("status", status),
                                  ("state", self.state), ("sample", self.sample)) if v is not None}

    def matches(self, ev: Mapping[str, Any]) -> bool:
        """Whether ``ev`` passes the conditions (sampling not included)."""
        if self.host is not None and str(ev.get("host", "")).lower() != self.host:
            return False
        if self.path is not None and not str(ev.get("path", "")).startswith(self.path):
            return False
        status = ev.get("status", 0)
        if self.status is not None and status != self.status:
            return False
        if self.status_class is not None and status // 100 != self.status_class:
            return False
        if self.state is not None:
            want = self.state
            for step in ev.get("states", ()):
                label = step[0]
                if label == want or label.partition(":")[2] == want:
                    break
            else:
                return False
        return True

    def take(self, ev: Mapping[str, Any]) -> bool:
        """Whether this subscriber gets ``ev``: it matches, and it is the Nth match."""
        if not self.matches(ev):
            return False
        self.seen += 1
        if self.seen >= self.sample:
            self.seen = 0
            return True
        return False


class TraceHub:
    """Fans finished requests out to live subscribers.

    ``subscribe(filter, callback)`` returns the function that unsubscribes;
    ``callback(event)`` runs in the reactor thread for each event the filter
    takes and must not block (queue it, write it).  ``publish(event)`` hands one
    event to every subscriber; it is also the way in for events made elsewhere
    (e.g. a supervisor merging the streams of its worker processes).
    ``on_change(active)`` is called when the first subscriber arrives and when
    the last one leaves, so whoever produces events records only while anyone
    listens.
    """

    def __init__(self, on_change: Callable[[bool], None] | None = None):
        self.subscribers: list[tuple[TraceFilter, Callable[[dict], None]]] = []
        self.on_change = on_change
        self.published = 0

    @property
    def active(self) -> bool:
        """Whether anyone listens."""
        return bool(self.subscribers)

    def subscribe(self, filter: TraceFilter | None, callback: Callable[[dict], None]) -> Callable[[], None]:
        """Start delivering events that pass ``filter`` (None: all) to ``callback``."""
        entry = (filter if filter is not None else TraceFilter(), callback)
        self.subscribers.append(entry)
        if len(self.subscribers) == 1 and self.on_change is not None:
            self.on_change(True)

        def unsubscribe() -> None:
            try:
                self.subscribers.remove(entry)
            except ValueError:
                return  # already gone
            if not self.subscribers and self.on_change is not None:
                self.on_change(False)

        return unsubscribe

    def publish(self, ev: dict) -> None:
        """Deliver ``ev`` to every subscriber whose filter takes it."""
        self.published += 1
        for flt, callback in list(self.subscribers):
            if flt.take(ev):
                try:
                    callback(ev)
                except Exception:
                    # One broken subscriber must not fail the request being finished.
                    _log.failure("trace subscriber {callback!r} raised", callback=callback)
