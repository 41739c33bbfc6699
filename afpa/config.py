"""Server settings: one attrs class with the embedded defaults, and the one place
every setting is checked.

``afpa serve`` with no options runs on exactly these values, so every default
here is one an operator could deploy.

Every setting has a :class:`Kind` (what values it accepts).  The same kind checks
a value from a config file (:func:`load_config`), from the command line (the
``afpa`` parser converts text with :meth:`Kind.from_text`) and from code
(``Settings(...)`` checks every field in ``__attrs_post_init__``), so a value is
accepted or refused the same way wherever it comes from.

Only the runtime's own, protocol-neutral settings live here (listeners, TLS,
admin, access log, cache budget, connection timeouts, processes).  A protocol
module's settings are its own attrs class, declared with
:class:`afpa.machine.modules.ModuleSettings` (HTTP's: ``protocols/http/settings.py``,
top-level keys such as ``root`` and ``[cache] grace``); :func:`load_config`
hands their values to the module's options.

Adding a runtime config key is one line in ``_FILE_KEYS``: ``"section.key": ("field", KIND)``
(plus the field itself on :class:`Settings`).  The field is then checked from
every source; a command-line flag, if wanted, is ``type=kind.from_text``.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Callable
from typing import Any

import attrs

from afpa.machine.modules import SettingError

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """``"256M"`` -> 268435456.  Units are binary (k = 1024); plain digits are bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 65536, 64k, 256M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``"127.0.0.1:8080"``, ``":8080"``, ``"[::1]:8080"`` or ``"8080"`` -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"not HOST:PORT: {text!r}")
    elif ":" in text:
        host, _, port = text.rpartition(":")
    else:
        host, port = "", text
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host or default_host, int(port)


# -- kinds of values ----------------------------------------------------------

_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
               dict: "a table", tuple: "an array"}


@attrs.frozen
class Kind:
    """What a setting accepts.  ``check`` takes a typed value (as TOML or code gives
    it) and returns it normalised, or raises ValueError/TypeError (optionally with
    a detail); ``text`` turns a command-line string into such a typed value."""

    expected: str
    check: Callable[[Any], Any]
    text: Callable[[str], Any] = str

    def __call__(self, value: Any) -> Any:
        """The normalised value; ValueError ``expected ..., got ...`` otherwise."""
        try:
            return self.check(value)
        except (TypeError, ValueError) as exc:
            raise self._refused(value, repr(value), exc) from None

    def from_text(self, text: str) -> Any:
        """A command-line value (``argparse`` ``type=``)."""
        try:
            return self.check(self.text(text))
        except (TypeError, ValueError) as exc:
            raise self._refused(text, repr(text), exc) from None

    def _refused(self, value: Any, got: str, exc: Exception) -> ValueError:
        if isinstance(exc, _Detail):
            return ValueError(str(exc))  # names the value itself
        if isinstance(exc, TypeError) and type(value) in _TYPE_NAMES:
            got += f" ({_TYPE_NAMES[type(value)]})"  # "false" looks like a boolean; say it is not
        return ValueError(f"expected {self.expected}, got {got}")


class _Detail(ValueError):
    """A refusal that says more than ``expected ..., got ...`` (and names the value)."""


Detail = _Detail
"""Raise it from a kind's check for a message of its own instead of ``expected ..., got ...``."""


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError
    return value


def _positive_seconds(value: Any) -> float:
    v = float(_number(value))
    if not (v > 0 and math.isfinite(v)):
        raise ValueError
    return v


def _seconds0(value: Any) -> float:
    v = float(_number(value))
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError
    return v


def _int(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        if value < minimum:
            raise ValueError
        return value
    return check


def _size(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError
        n = parse_size(value)
        if n < minimum:
            raise ValueError
        return n
    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    if not value.strip():
        raise ValueError
    return value


def _hostport(value: Any) -> tuple[str, int]:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and _int(0)(value[1]) <= 65535:
        return value
    if not isinstance(value, str):
        raise TypeError
    return parse_hostport(value)


def _no(value: Any) -> Any:
    raise ValueError


def _workers(value: Any) -> int:
    if value == "auto":
        import os
        return os.cpu_count() or 1
    return _int(1)(value)


def _workers_text(text: str) -> Any:
    text = text.strip()
    return int(text) if text.isdigit() else text


def _fraction(value: Any) -> float:
    v = float(_number(value))
    if not 0.0 <= v <= 1.0:
        raise ValueError
    return v




SECONDS = Kind("a positive number of seconds", _positive_seconds, float)
SECONDS0 = Kind("a number of seconds, 0 or more", _seconds0, float)
SIZE = Kind("a size in bytes (e.g. 65536, 64k, 256M)", _size(0))
POSITIVE_SIZE = Kind("a positive size in bytes (e.g. 8192, 64k)", _size(1))
COUNT = Kind("a positive whole number", _int(1), int)
COUNT0 = Kind("a whole number, 0 or more", _int(0), int)
WORKERS = Kind('a positive whole number or "auto" (one per CPU)', _workers, _workers_text)
BOOL = Kind("true or false", _bool)
TEXT = Kind("a non-empty string", _text)
PATH = Kind("a file or directory path", _text)
HOSTPORT = Kind("HOST:PORT (e.g. 127.0.0.1:8080)", _hostport)
FRACTION = Kind("a number from 0 to 1 (e.g. 0.1)", _fraction, float)
ADMIN_AUTH = Kind('"writes" or "all"', lambda v: _text(v) if v in ("writes", "all") else _no(v))

# Kept for the plain names older lines of ``_FILE_KEYS`` used: a bare Python type
# there means its strict kind (``"true"`` is not a boolean, ``"5"`` not a number).
_SECONDS = SECONDS
_STRICT: dict[Any, Kind] = {bool: BOOL, int: COUNT0, float: SECONDS, str: TEXT,
                            parse_size: SIZE, parse_hostport: HOSTPORT}


DEFAULT_MODULE = "http"  # the protocol module served when none is named


@attrs.define(slots=True)
class Settings:
    """The runtime's settings, whatever the protocol; defaults are the embedded
    configuration.  The protocol module's own settings ride along as
    ``module_settings`` (HTTP's: :class:`protocols.http.settings.HttpSettings`;
    ``http_settings(**kw)`` there makes both from one set of keywords).

    Every field with a kind (see ``_FILE_KEYS``) is checked when the object is
    made; an unacceptable value raises :class:`SettingError`.
    """

    listen: tuple[str, int] = ("127.0.0.1", 8080)
    tls_certs: tuple = ()               # afpa.net.tls.Certificate: TLS on tls_listen, else on listen
    tls_listen: tuple[str, int] | None = None
    table: str | None = None            # None: the module's shipped table
    companion_tables: dict = attrs.field(factory=dict)  # e.g. {"http-backend": path}
    module: str = DEFAULT_MODULE
    # The protocol module's own settings object (its ModuleSettings.cls), built
    # from its config section and flags; None: the module's defaults.
    module_settings: Any = None
    admin: tuple[str, int] | None = None
    # Bearer token for the admin API's writes (purge, ban, tags): read from this
    # file, else from $AFPA_ADMIN_TOKEN; neither: every write is refused.
    admin_token_file: str | None = None
    # Which admin endpoints need that token: "writes" (purges; reads open to whoever
    # reaches the admin address) or "all" (every endpoint but /healthz and the
    # page shells, which show nothing until their data is fetched with the token).
    admin_auth: str = "writes"
    access_log: str | None = None       # path, or "-" for standard output
    # Fields of an access-log line ($remote_addr "$request" $status ... $states,
    # see afpa/ops/accesslog.py); None: the module's default (HTTP: combined log
    # format plus Cache-Status and the state path).  Checked when a server starts.
    access_log_format: str | None = None
    trace_loopback: bool = True         # loopback peers may ask for a trace (HTTP: Afpa-Trace)

    # Cache (the store every module's entries share)
    cache_bytes: int = 256 << 20
    max_object_bytes: int = 8 << 20     # larger entries are not stored (HTTP: files stream from disk)

    output_buffer: int = 256 << 10      # queued response bytes per client before it must drain (Send Engine)

    # Timeouts, seconds
    idle_timeout: float = 60.0          # keep-alive connection with no request started
    send_timeout: float = 60.0          # a response making no progress to a stalled client
    tls_handshake_timeout: float = 10.0  # from accept to a completed TLS handshake
    drain_timeout: float = 30.0         # on SIGTERM/SIGINT: in-flight work gets this long, then is cut

    # Disk helper threads (Flash's AMPED helpers)
    helper_threads: int = 8

    # Processes: 1 serves in this process; N >= 2 makes it a supervisor of N
    # workers sharing the listeners (afpa.process.supervisor).  A worker is told its slot
    # (0 .. worker_count - 1); the single process is worker 0 of 1.
    workers: int = 1
    worker_index: int = 0
    worker_count: int = 1

    def __attrs_post_init__(self) -> None:
        validate(self)


# Fields that may stay None (not set).
_DEFAULT_NONE = frozenset(a.name for a in attrs.fields(Settings) if a.default is None)

# Config file keys -> (Settings field, kind).  Sections flatten into fields.
_FILE_KEYS: dict[str, tuple[str, Any]] = {
    "listen": ("listen", HOSTPORT),
    "module": ("module", TEXT),
    "workers": ("workers", WORKERS),
    "admin": ("admin", HOSTPORT),
    "admin_token_file": ("admin_token_file", PATH),
    "admin_auth": ("admin_auth", ADMIN_AUTH),
    "access_log": ("access_log", PATH),
    "access_log_format": ("access_log_format", TEXT),
    "trace.loopback": ("trace_loopback", BOOL),
    "table": ("table", PATH),
    "backend_table": ("backend_table", PATH),
    "cache.size": ("cache_bytes", SIZE),
    "cache.max_object_size": ("max_object_bytes", SIZE),
    "limits.output_buffer": ("output_buffer", POSITIVE_SIZE),
    "timeouts.idle": ("idle_timeout", SECONDS),
    "timeouts.send": ("send_timeout", SECONDS),
    "timeouts.drain": ("drain_timeout", SECONDS),
    "timeouts.tls_handshake": ("tls_handshake_timeout", SECONDS),
    "tls.listen": ("tls_listen", HOSTPORT),
}

# Fields without a config key that are still checked when Settings are made.
_OTHER_KINDS: dict[str, Kind] = {"helper_threads": COUNT}

# Keys that used to exist: using one is an error that says what replaced it.
_REPLACED_KEYS = {
    "trust_forwarded": "replaced by trusted_proxies = [\"ADDRESS or CIDR\", ...]: the proxies whose "
                       "X-Forwarded-* fields are kept (everyone else's are removed)",
}


def _kind(convert: Any) -> Kind:
    return convert if isinstance(convert, Kind) else _STRICT.get(convert, Kind("a valid value", convert))


def field_kinds() -> dict[str, Kind]:
    """Settings field -> the kind that checks it."""
    kinds = {field: _kind(convert) for field, convert in _FILE_KEYS.values()}
    kinds.update(_OTHER_KINDS)
    return kinds


def file_key(field: str) -> str | None:
    """The config file key of a Settings field (None if it has none)."""
    for key, (name, _) in _FILE_KEYS.items():
        if name == field:
            return key
    return None


def validate(settings: Settings) -> None:
    """Check (and normalise) every field that has a kind; raise :class:`SettingError`.

    A field whose default is None (not set) may stay None."""
    for field, kind in field_kinds().items():
        if not hasattr(settings, field):
            continue  # a file key that is not a field (backend_table)
        value = getattr(settings, field)
        if value is None and field in _DEFAULT_NONE:
            continue
        try:
            setattr(settings, field, kind(value))
        except ValueError as exc:
            raise SettingError(field, str(exc)) from None


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _unknown(path: str, key: str, spec: Any = None) -> ValueError:
    if key in _REPLACED_KEYS:
        return ValueError(f"{path}: {key}: {_REPLACED_KEYS[key]}")
    known = list(_FILE_KEYS)
    if spec is not None and not spec.section:  # the module's keys sit among the runtime's
        known += [opt.key for opt in spec.options]
    close = difflib.get_close_matches(key, known, n=1)
    hint = (f"did you mean {close[0]!r}?" if close
            else f"known: {', '.join(sorted(known))}, [[tls.certificate]]")
    return ValueError(f"{path}: unknown key {key!r} ({hint})")


def load_config(path: str, module_settings: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Read a TOML config file into Settings keyword arguments.

    ``module_settings(name)`` gives the named protocol module's
    :class:`~afpa.machine.modules.ModuleSettings` (or None): the keys of its
    section (with section ``""``: its keys among the top-level ones, ``root``
    or ``cache.grace`` of HTTP) are checked by its options and returned, by
    field, under ``"module_values"`` (``ModuleSettings.build`` makes the object).
    Without it, only the runtime's own keys are known.

    Raises ValueError ``<file>: <key>: <problem>`` for anything unknown or of the
    wrong type, so a typo never silently falls back to a default.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    certs = data.get("tls", {}).pop("certificate", []) if isinstance(data.get("tls"), dict) else []
    kwargs: dict[str, Any] = {}
    module = data.get("module") if isinstance(data.get("module"), str) else DEFAULT_MODULE
    spec = module_settings(module) if module_settings is not None else None
    if spec is not None:
        kwargs["module_values"] = _module_values(path, data, spec)
    for key, value in _flatten(data).items():
        if key not in _FILE_KEYS:
            raise _unknown(path, key, spec)
        field, convert = _FILE_KEYS[key]
        try:
            kwargs[field] = _kind(convert)(value)
        except ValueError as exc:
            raise ValueError(f"{path}: {key}: {exc}") from None
    if "backend_table" in kwargs:
        kwargs["companion_tables"] = {"http-backend": kwargs.pop("backend_table")}
    if certs:
        from afpa.net.tls import Certificate
        if not isinstance(certs, list):
            raise ValueError(f"{path}: tls.certificate: must be an array of tables ([[tls.certificate]])")
        out = []
        for i, c in enumerate(certs, 1):
            if (not isinstance(c, dict) or set(c) != {"cert", "key"}
                    or not all(isinstance(v, str) and v for v in c.values())):
                raise ValueError(f"{path}: tls.certificate {i}: needs exactly cert and key (PEM file paths)")
            out.append(Certificate(c["cert"], c["key"]))
        kwargs["tls_certs"] = tuple(out)
    return kwargs


def _module_values(path: str, data: dict[str, Any], spec: Any) -> dict[str, Any]:
    """Take the module's keys out of ``data`` (its section, or its top-level keys
    when its section is ""), checked by their kinds: field -> value."""
    if spec.section:
        section = data.pop(spec.section, {})
        if not isinstance(section, dict):
            raise ValueError(f"{path}: {spec.section}: must be a table ([{spec.section}])")
        items = _flatten(section)
    else:
        items = {k: v for k, v in _flatten(data).items() if spec.option(k) is not None}
        for key in items:  # what is left is the runtime's
            *tables, last = key.split(".")
            where = data
            for name in tables:
                where = where[name]
            where.pop(last)
    out = {}
    for key, value in items.items():
        opt = spec.option(key)
        if opt is None:
            known = ", ".join(sorted(o.key for o in spec.options)) or "none"
            close = difflib.get_close_matches(key, [o.key for o in spec.options], n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {known}"
            raise ValueError(f"{path}: {spec.section}.{key}: unknown key ({hint})")
        try:
            out[opt.field] = opt.kind(value)
        except ValueError as exc:
            raise ValueError(f"{path}: {spec.where(opt)}: {exc}") from None
    return out


ADMIN_TOKEN_ENV = "AFPA_ADMIN_TOKEN"
MIN_TOKEN = 16  # characters; e.g. `openssl rand -hex 32` gives 64
_TOKEN = re.compile(r"[\x21-\x7e]+")  # what fits in "Authorization: Bearer <token>" as it is


def read_admin_token(settings: Settings, environ: Any = None) -> bytes | None:
    """The admin API's bearer token: the contents of ``admin_token_file``
    (surrounding whitespace removed), else ``$AFPA_ADMIN_TOKEN``, else None (admin
    writes refused).  Never from the command line, where every local user can
    read it.  Raises ValueError ``<where>: <problem>`` for a token that cannot be read
    or is too weak."""
    return read_token(settings.admin_token_file, "admin_token_file", ADMIN_TOKEN_ENV, _TOKEN, environ)


def read_token(path: str | None, key: str, env: str, allowed: re.Pattern, environ: Any,
               allowed_text: str = "printable ASCII") -> bytes | None:
    """A secret from the file ``path`` (``key`` names its setting), else from the
    environment variable ``env``, else None; it must be one word of ``allowed``.
    Raises ValueError ``<where>: <problem>``."""
    if path is not None:
        where = f"{path}: {key}"
        try:
            with open(path, "rb") as f:
                raw = f.read(4097)
        except OSError as exc:
            raise ValueError(f"{where}: cannot read: {exc.strerror}") from None
        try:
            token = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ValueError(f"{where}: the token must be {allowed_text}") from None
    else:
        import os
        environ = os.environ if environ is None else environ
        token = environ.get(env)
        if token is None:
            return None
        where = env
        token = token.strip()
    if len(token) > 4096:
        raise ValueError(f"{where}: the token is longer than 4096 characters")
    if len(token) < MIN_TOKEN:
        raise ValueError(f"{where}: the token is shorter than {MIN_TOKEN} characters "
                         f"(make one with: openssl rand -hex 32)")
    if allowed.fullmatch(token) is None:
        raise ValueError(f"{where}: the token must be one word of {allowed_text}")
    return token.encode("ascii")
