"""Protocol modules and the registry the runtime finds them in.

A protocol module (``protocols/http``, a third-party package, ...) hands the runtime
one :class:`ProtocolModule`: its state functions with the outcomes each may return,
and factories for its global and request scopes.  Modules are discovered through the
``afpa.modules`` entry-point group, so the runtime never imports one by name; the
runtime's own intrinsic functions (the Send Engine) live under the ``afpa`` namespace
of the same registry.

The one signature every state function has::

    fn(g, conn, req) -> str | Deferred[str]

``g`` is the module's global scope, ``conn`` the connection scope, ``req`` the request
scope; the returned word is an *outcome* that the transition table maps to the next
state.  A function never names its successor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any, TypeAlias

import attrs
from twisted.internet.defer import Deferred

ENTRY_POINT_GROUP = "afpa.modules"
RUNTIME_NAMESPACE = "afpa"

StateFn: TypeAlias = Callable[[Any, Any, Any], "str | Deferred[str]"]
"""``fn(g, conn, req) -> outcome``: the signature of every state function."""


@attrs.frozen
class StateFunction:
    """A state function as the runtime knows it: callable plus declared outcomes."""

    name: str
    fn: StateFn
    outcomes: frozenset[str]
    doc: str = ""


def state(*outcomes: str) -> Callable[[StateFn], StateFn]:
    """Decorator declaring the outcomes a state function may return.

    The declaration is what table validation checks transitions against, so a
    function must never return a word it did not declare.
    """

    if not outcomes:
        raise ValueError("a state function must declare at least one outcome")

    def mark(fn: StateFn) -> StateFn:
        fn.__afpa_outcomes__ = frozenset(outcomes)  # type: ignore[attr-defined]
        return fn

    return mark


def collect(fns: Iterable[StateFn]) -> dict[str, StateFunction]:
    """Build the name -> StateFunction map from functions marked with :func:`state`."""
    out: dict[str, StateFunction] = {}
    for fn in fns:
        outcomes = getattr(fn, "__afpa_outcomes__", None)
        if outcomes is None:
            raise ValueError(f"{fn.__name__} has no @state(...) outcome declaration")
        doc = (fn.__doc__ or "").strip().splitlines()
        out[fn.__name__] = StateFunction(fn.__name__, fn, outcomes, doc[0] if doc else "")
    return out


@attrs.frozen
class ProtocolModule:
    """What a protocol module registers with the runtime.

    - ``functions``: its state functions by name.
    - ``table``: file name of its default table under ``statetables/``.
    - ``companions``: other machines the module runs (e.g. ``http-backend`` for
      backend connections); the server loads and validates them too and hands
      them over in ``runtime.machines``.
    - ``access_line(conn, req, now)``: one access-log line (with its newline)
      for a finished request, when the module supports ``--access-log``.
    - ``make_global(settings, runtime)``: builds the module's global scope once per
      server (``runtime`` is :class:`afpa.scopes.Runtime`).
    - ``make_request(conn)``: a fresh request scope (subclass of
      :class:`afpa.scopes.Request`).
    - ``fail(g, conn, req, status)``: fill ``req`` with the protocol's own error
      answer (HTTP: 500 when a state raised, 408 on a header timeout) or leave
      ``req.head`` empty when the protocol has none; the connection then closes.
    """

    name: str
    functions: Mapping[str, StateFunction]
    table: str
    make_global: Callable[[Any, Any], Any]
    make_request: Callable[[Any], Any]
    fail: Callable[[Any, Any, Any, int], None]
    companions: tuple[str, ...] = ()
    access_line: Callable[[Any, Any, float], str] | None = None


@attrs.define
class Registry:
    """Name -> module; ``afpa`` is reserved for runtime-intrinsic functions."""

    modules: dict[str, ProtocolModule] = attrs.field(factory=dict)
    intrinsics: dict[str, StateFunction] = attrs.field(factory=dict)

    def register(self, module: ProtocolModule) -> None:
        """Add a module; a second module of the same name is a configuration error."""
        if module.name == RUNTIME_NAMESPACE:
            raise ValueError(f"module name {module.name!r} is reserved for the runtime")
        old = self.modules.get(module.name)
        if old is not None and old is not module:
            raise ValueError(f"two protocol modules are named {module.name!r}")
        self.modules[module.name] = module

    def lookup(self, qualified: str, default_module: str) -> StateFunction | None:
        """Resolve ``run = "name"`` (machine's own module) or ``"module.name"``."""
        mod_name, _, fn_name = qualified.rpartition(".")
        mod_name = mod_name or default_module
        if mod_name == RUNTIME_NAMESPACE:
            return self.intrinsics.get(fn_name)
        module = self.modules.get(mod_name)
        return module.functions.get(fn_name) if module else None

    def discover(self) -> None:
        """Register every module advertised in the ``afpa.modules`` entry-point group."""
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            module = ep.load()
            if not isinstance(module, ProtocolModule):
                raise TypeError(f"entry point {ep.name!r} gave {module!r}, not a ProtocolModule")
            self.register(module)
