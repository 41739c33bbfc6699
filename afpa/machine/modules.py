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

A function may also declare a *contract*: the facts it needs on the request scope
when it runs, and the facts each outcome leaves there (``afpa tables check``
proves that every path from the start state meets every need)::

    @state("hit", "miss", "stale", needs=("request",),
           provides={"hit": ("response",), "stale": ("stale",)})

A fact is a short word a table editor can reason about; the runtime defines
``response`` (an answer on the request, ready for the Send Engine) and each module
documents its own words in :attr:`ProtocolModule.facts`.  A function declared
without a contract is trusted: the checker neither checks its needs nor blames it
for what follows it.
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


TIMEOUT, PEER_CLOSED, INPUT = "timeout", "peer_closed", "input"
EVENTS = frozenset({TIMEOUT, PEER_CLOSED, INPUT})
"""The runtime's event words.  The runtime knows no protocol: it says only that
a connection's deadline passed (``timeout``), that the other end closed
(``peer_closed``) or that more input arrived (``input``), and a machine's
table maps these words like any outcome.  They are allowed outcomes of every
state without being declared; see :mod:`afpa.machine.driver` for where each
can happen and what the runtime does when a table leaves one unmapped.

A state that raised is not an event word: the driver ends the request and asks
the module for its answer with the reason word ``failed`` (see
:attr:`ProtocolModule.fail`)."""

RUNTIME_FACTS: Mapping[str, str] = {
    "response": "an answer on the request scope, ready for the Send Engine",
}
"""Facts the runtime itself relies on (the Send Engine needs ``response``)."""


@attrs.frozen
class Contract:
    """What a state function needs on the request scope, and what each outcome
    provides (or drops: a fact that no longer holds after that outcome)."""

    needs: frozenset[str] = frozenset()
    # Left out of the hash (dicts have none) so a StateFunction stays hashable.
    provides: Mapping[str, frozenset[str]] = attrs.field(factory=dict, hash=False)
    drops: Mapping[str, frozenset[str]] = attrs.field(factory=dict, hash=False)

    @classmethod
    def build(cls, outcomes: Iterable[str], needs: Iterable[str] = (),
              provides: Mapping[str, Iterable[str]] | None = None,
              drops: Mapping[str, Iterable[str]] | None = None) -> Contract:
        """Check a declaration against the function's outcomes (ValueError if wrong)."""
        outcomes = frozenset(outcomes)

        def facts(value: Iterable[str], what: str) -> frozenset[str]:
            if isinstance(value, str):
                raise ValueError(f"{what}: give a tuple of fact names, not the string {value!r}")
            out = frozenset(value)
            for fact in out:
                if not isinstance(fact, str) or not fact.isidentifier():
                    raise ValueError(f"{what}: {fact!r} is not a fact name")
            return out

        def per_outcome(value: Mapping[str, Iterable[str]] | None, what: str) -> dict[str, frozenset[str]]:
            out = {}
            for outcome, fs in (value or {}).items():
                if outcome not in outcomes:
                    raise ValueError(f"{what}: {outcome!r} is not one of the declared outcomes")
                out[outcome] = facts(fs, f"{what}[{outcome!r}]")
            return out

        return cls(facts(needs, "needs"), per_outcome(provides, "provides"), per_outcome(drops, "drops"))


@attrs.frozen
class StateFunction:
    """A state function as the runtime knows it: callable, declared outcomes and,
    when declared, its :class:`Contract` (None: not declared, never checked)."""

    name: str
    fn: StateFn
    outcomes: frozenset[str]
    doc: str = ""
    contract: Contract | None = None
    events: frozenset[str] = frozenset()  # runtime events its wait takes as outcomes


def state(*outcomes: str, needs: Iterable[str] | None = None,
          provides: Mapping[str, Iterable[str]] | None = None,
          drops: Mapping[str, Iterable[str]] | None = None,
          events: Iterable[str] = ()) -> Callable[[StateFn], StateFn]:
    """Decorator declaring the outcomes a state function may return, and
    optionally its contract.

    The outcomes are what table validation checks transitions against, so a
    function must never return a word it did not declare.  ``needs`` names the
    facts that must hold on the request scope when the function runs;
    ``provides`` maps an outcome to the facts it leaves there; ``drops`` maps an
    outcome to facts that stop holding (e.g. a connection given up before a
    retry).  Giving any of the three declares a contract; giving none leaves the
    function unchecked, as before contracts existed.

    ``events`` names the runtime event words (:data:`EVENTS`: ``timeout``,
    ``peer_closed``, ``input``) the function's wait takes as outcomes: it
    returns a Deferred, and while it is parked on it the driver delivers those
    events to it (giving up the Deferred) so the table decides what runs next.
    A state that stops on ``@wait`` gets ``timeout`` (and ``peer_closed``) as
    outcomes without declaring them.
    """

    if not outcomes:
        raise ValueError("a state function must declare at least one outcome")
    events = frozenset(events)
    if isinstance(events, str) or not events <= EVENTS:
        raise ValueError(f"events: only runtime event words ({', '.join(sorted(EVENTS))})")
    contract = None
    if needs is not None or provides is not None or drops is not None:
        contract = Contract.build(outcomes, needs or (), provides, drops)

    def mark(fn: StateFn) -> StateFn:
        fn.__afpa_outcomes__ = frozenset(outcomes)  # type: ignore[attr-defined]
        fn.__afpa_contract__ = contract  # type: ignore[attr-defined]
        fn.__afpa_events__ = events  # type: ignore[attr-defined]
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
        out[fn.__name__] = StateFunction(fn.__name__, fn, outcomes, doc[0] if doc else "",
                                         getattr(fn, "__afpa_contract__", None),
                                         getattr(fn, "__afpa_events__", frozenset()))
    return out


class SettingError(ValueError):
    """A setting has a value its kind refuses, or one that does not fit with
    another; ``field`` names the attribute of the settings object at fault (the
    runtime's :class:`afpa.config.Settings` or a module's own settings class)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class UnmetNeed(Exception):
    """Raised by a state that finds a fact it needs missing from the request scope
    (a table wired it after a state that did not provide it).  The engine logs it
    as one line, counts it in ``afpa_state_errors`` and ends the request."""


@attrs.frozen
class Option:
    """One setting of a protocol module.

    ``key``: its name inside the module's config section (``upstreams`` is
    ``[dns] upstreams = [...]`` in a file); ``field``: the attribute of the
    module's settings class; ``kind``: an :class:`afpa.config.Kind` that checks
    a value from every source; ``flag``: its ``afpa serve`` option, if any
    (``--upstream``); ``repeat``: the flag may be given several times and its
    values are collected in a tuple (``kind`` then checks a list: each flag
    value is checked as a list of one, the tuple as a whole); ``help``: the flag's one-line help."""

    key: str
    field: str
    kind: Any
    flag: str | None = None
    repeat: bool = False
    help: str = ""
    metavar: str = ""


@attrs.frozen
class ModuleSettings:
    """A protocol module's own settings: its section of the config file, its
    command-line flags and the attrs class holding them.

    The runtime checks every value with its option's kind (file, flag or code
    alike), builds ``cls(**values)`` and hands it to the module as
    ``settings.module_settings``; the class's defaults are the module's embedded
    configuration.  ``section`` is the config file table the keys live in
    (``"dns"``: ``[dns]``; ``""``: top-level keys).  ``check(obj)`` runs after
    the object is built, for rules that tie fields together; it raises
    ValueError ``"<key>: <problem>"``."""

    section: str
    cls: type
    options: tuple[Option, ...] = ()
    check: Callable[[Any], None] | None = None

    def option(self, key: str) -> Option | None:
        """The option with config key ``key`` (None: not one of this module's)."""
        for opt in self.options:
            if opt.key == key:
                return opt
        return None

    def build(self, values: Mapping[str, Any]) -> Any:
        """The module's settings object from ``field -> value`` (each value is
        checked by its option's kind); ValueError ``"<key>: <problem>"``.

        The class itself and ``check`` may raise :class:`SettingError` naming a
        field: the message then names that field's config key instead."""
        by_field = {opt.field: opt for opt in self.options}
        checked = {}
        for field, value in values.items():
            opt = by_field.get(field)
            if opt is None:
                raise ValueError(f"{field}: not a setting of this module")
            try:
                checked[field] = opt.kind(value)
            except ValueError as exc:
                raise ValueError(f"{self.where(opt)}: {exc}") from None
        try:
            obj = self.cls(**checked)
            if self.check is not None:
                self.check(obj)
        except SettingError as exc:
            opt = by_field.get(exc.field)
            raise ValueError(f"{self.where(opt) if opt else exc.field}: {exc.problem}") from None
        return obj

    def key_of(self, field: str) -> str | None:
        """The config file key of the field ``field`` (None: it has none)."""
        for opt in self.options:
            if opt.field == field:
                return self.where(opt)
        return None

    def where(self, opt: Option) -> str:
        """The config file key of ``opt`` (``dns.upstreams``)."""
        return f"{self.section}.{opt.key}" if self.section else opt.key


TRANSPORTS = frozenset({"stream", "datagram"})


@attrs.frozen
class StreamLimits:
    """What the runtime enforces on a module's stream connections, in the
    module's own terms (its ``stream_limits(module_settings)`` gives them).

    ``message_timeout``: the shortest deadline the module's states arm on a
    connection (``conn.arm``; HTTP: ``timeouts.header``): the server's sweep
    looks for passed deadlines often enough for it (the ``timeout`` itself is an
    outcome the module's table maps); ``max_unread``: bytes received while a
    request is busy that are buffered before reading from the connection pauses
    (HTTP: ``limits.header_block``)."""

    message_timeout: float = 10.0
    max_unread: int = 64 << 10


@attrs.frozen
class Listener:
    """A listener a module asks for besides the client ones (HTTP: the sibling
    listener).  Its connections run the same machine, starting with
    ``entry(start_fn)`` instead of the start function itself; ``kind`` is
    their ``Connection.listener``; ``label`` names it in the startup log."""

    kind: str
    address: tuple[str, int]
    entry: Callable[[StateFn], StateFn]
    label: str = ""


@attrs.frozen
class Peering:
    """How the workers of one server become each other's peers, sharing one
    cache (HTTP: siblings).  A supervisor binds one loopback listener of kind
    ``listener`` per worker, hands every worker all their addresses and a shared
    token (in the environment variable ``token_env``), and tells the workers
    when one of them leaves or comes back.

    - ``join(module_settings, members, index)``: the module settings of worker
      ``index`` of ``members`` (their ``HOST:PORT`` addresses, in order).
    - ``configured(module_settings)``: a one-line problem when the operator set
      up peers of their own, which workers cannot add to (None: fine).
    - ``mark(g, index, up)``: worker ``index`` left (``up`` False) or is back.
    """

    listener: str
    token_env: str
    join: Callable[[Any, tuple[str, ...], int], Any]
    configured: Callable[[Any], str | None]
    mark: Callable[[Any, int, bool], None]


@attrs.frozen
class ProtocolModule:
    """What a protocol module registers with the runtime.

    - ``functions``: its state functions by name.
    - ``table``: file name of its default table under ``statetables/``.
    - ``companions``: other machines the module runs (e.g. ``http-backend`` for
      backend connections); the server loads and validates them too and hands
      them over in ``runtime.machines``.
    - ``access_field(name)``: the access-log field ``$name`` as a function
      ``(conn, req, now) -> str``, or None when the module has no such field
      (see :mod:`afpa.ops.accesslog`); ``access_format``: the module's default
      format.  A module without them writes no access log.
    - ``trace_answer(req, text)``: put a request's trace (``text``) into the
      answer on ``req`` before it is sent (HTTP: the ``Afpa-Trace`` response
      field); ``trace_fields(conn, req)``: the module's fields of a traced
      request's event (HTTP: method, host, path, cache_status, bytes).
    - ``make_global(settings, runtime)``: builds the module's global scope once per
      server (``runtime`` is :class:`afpa.machine.scopes.Runtime`; its own
      settings are ``settings.module_settings``, see :meth:`own_settings`).
      What the runtime needs of it: :class:`afpa.machine.scopes.GlobalScope`.
    - ``make_request(conn)``: a fresh request scope (subclass of
      :class:`afpa.machine.scopes.Request`; the runtime's view of it is
      :class:`afpa.machine.scopes.RequestScope`).
    - ``facts``: the contract words its functions use, each with its meaning
      (shown by ``afpa tables graph``; :data:`RUNTIME_FACTS` are always known).
    - ``fail(g, conn, req, reason)``: fill ``req`` with the protocol's own error
      answer for the runtime's ``reason`` word (``"failed"``: a state raised or
      returned a word its table does not map; HTTP answers 500) or leave
      ``req.head`` empty when the protocol has none; the connection then closes.
      The runtime never names a protocol status: the module turns reasons into
      answers.
    - ``invalidation``: how the admin API's purge, ban and tag requests become
      cache keys (the store's keys are the module's own), or None when the module
      offers none.  An object with ``keys(spec, g) -> list`` (``g``: the
      module's global, for keys that depend on its configuration), ``predicate(spec) ->
      callable(key) -> bool`` and ``tag(text) -> tag``; ``spec`` is the request's
      JSON object, and a spec the module refuses raises ValueError (one line).
    - ``carry_over(old_g, new_g)``: on a configuration reload, move what must
      outlive a configuration (backend pools and their connections and queues,
      requests in flight, counters) from the old global scope into the new one,
      just before the new one starts serving; None: nothing carries over.
    - ``transports``: what the module speaks: ``"stream"`` (TCP, TLS: one
      connection scope per connection, requests parsed from its byte stream)
      and/or ``"datagram"`` (UDP: each datagram is one request; its connection
      scope names the peer and a reply goes back as one datagram).
    - ``speaks_first``: on a stream, the machine's start state runs as soon
      as the connection is made, before any input (a greeting, as SMTP or FTP
      servers send); otherwise it first runs when input arrives.
    - ``settings``: the module's own settings (:class:`ModuleSettings`), handed
      to it as ``settings.module_settings``; None: it has none.
    - ``table_dir``: the directory its shipped tables (``table``, companions)
      are read from; None: afpa's own ``statetables/``.  A third-party module
      sets it to a directory inside its package.
    - ``alpn``: the TLS application protocols it speaks, most preferred first
      (offered in the TLS handshake; empty: none offered).
    - ``url_schemes``: ``(plain, tls)`` URL schemes of its stream listeners,
      for the startup lines (HTTP: ``("http", "https")``, giving
      ``http://127.0.0.1:8080/``); empty: listeners are shown as ``tcp`` /
      ``tls`` addresses.
    - ``describe(g) -> list[str]``: lines for the startup log (listeners aside:
      where misses go, upstreams); None: nothing to add.
    - ``sweep(g, now)``: called once a second by the server (expire what the
      module keeps besides the cache); None: nothing to sweep.
    - ``metrics(g) -> iterable of prometheus_client metric families``: what
      the module counts itself (HTTP: backend pools), added to ``/metrics``;
      None: nothing to add.
    - ``listeners(g) -> list[Listener]``: listeners besides the client ones
      (HTTP: the sibling listener); None: none.
    - ``stream_limits(module_settings) -> StreamLimits``: its shortest timer
      and the input buffer bound of its stream connections; None: the defaults.
    - ``peering``: how its workers share one cache (:class:`Peering`); None:
      workers do not peer.
    """

    name: str
    functions: Mapping[str, StateFunction]
    table: str
    make_global: Callable[[Any, Any], Any]
    make_request: Callable[[Any], Any]
    fail: Callable[[Any, Any, Any, str], None]
    companions: tuple[str, ...] = ()
    access_field: Callable[[str], Callable[[Any, Any, float], str] | None] | None = None
    access_format: str = ""
    trace_answer: Callable[[Any, str], None] | None = None
    trace_fields: Callable[[Any, Any], dict] | None = None
    facts: Mapping[str, str] = attrs.field(factory=dict)
    invalidation: Any = None
    carry_over: Callable[[Any, Any], None] | None = None
    transports: frozenset[str] = attrs.field(default=frozenset({"stream"}), converter=frozenset)
    speaks_first: bool = False
    settings: ModuleSettings | None = None
    table_dir: str | None = None
    alpn: tuple[bytes, ...] = ()
    url_schemes: tuple[str, str] | tuple[()] = ()
    describe: Callable[[Any], list[str]] | None = None
    sweep: Callable[[Any, float], None] | None = None
    metrics: Callable[[Any], Iterable[Any]] | None = None
    listeners: Callable[[Any], list[Listener]] | None = None
    stream_limits: Callable[[Any], StreamLimits] | None = None
    peering: Peering | None = None

    def own_settings(self, settings: Any) -> Any:
        """This module's settings object in the runtime's ``settings``: the one
        built from its config section and flags, else its defaults (None: the
        module declares no settings)."""
        if settings.module_settings is not None:
            return settings.module_settings
        return self.settings.cls() if self.settings is not None else None

    def listener_label(self, host: str, port: int, tls: bool) -> str:
        """How the startup lines show one of its stream listeners."""
        if self.url_schemes:
            return f"{self.url_schemes[1 if tls else 0]}://{host}:{port}/"
        return f"{'tls' if tls else 'tcp'} {host}:{port}"

    def limits(self, settings: Any) -> StreamLimits:
        """The :class:`StreamLimits` of its stream connections under ``settings``."""
        if self.stream_limits is None:
            return StreamLimits()
        return self.stream_limits(self.own_settings(settings))

    @transports.validator
    def _known_transports(self, _attr: Any, value: frozenset[str]) -> None:
        unknown = value - TRANSPORTS
        if not value or unknown:
            raise ValueError(f"module {self.name!r}: transports must be some of {sorted(TRANSPORTS)}, "
                             f"got {sorted(value)}")


@attrs.define
class Registry:
    """Name -> module; ``afpa`` is reserved for runtime-intrinsic functions."""

    modules: dict[str, ProtocolModule] = attrs.field(factory=dict)
    intrinsics: dict[str, StateFunction] = attrs.field(factory=dict)
    broken: dict[str, str] = attrs.field(factory=dict)  # entry-point name -> why it was not loaded

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
        """Register every module advertised in the ``afpa.modules`` entry-point group.

        A module that cannot be loaded (its import fails, or it is not a
        :class:`ProtocolModule`) is left out and its problem kept, one line, in
        :attr:`broken`: one broken package never stops afpa serving the others."""
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                module = ep.load()
            except Exception as exc:  # any error in someone else's package
                self.broken[ep.name] = f"{ep.value}: {type(exc).__name__}: {exc}".splitlines()[0]
                continue
            if not isinstance(module, ProtocolModule):
                self.broken[ep.name] = f"{ep.value} is {type(module).__name__}, not a ProtocolModule"
                continue
            self.register(module)
