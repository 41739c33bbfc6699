"""The access log: one line per finished request, in a configurable format,
buffered here.

The format (``access_log_format``) is text with named fields, ``$name`` or
``${name}``, nginx style.  The runtime knows the fields every protocol has
(:data:`RUNTIME_FIELDS`: the peer, times, status, the state path); the protocol
module adds its own through ``access_field(name)`` (HTTP: ``$request``,
``$http_user_agent``, ...).  :func:`compile_format` turns a format into one
function once, at startup, so a line costs one call per field and a join; an
unknown field is refused then, with its name.

Lines are buffered in memory and flushed by the server's once-a-second sweep
(and on shutdown), so logging costs the fast path the line's fields and one
list append, not a write system call per request.  ``$states`` needs every
request traced (the server then runs the tracing loop, see afpa/machine/trace.py);
a format without it records nothing.  ``reopen()`` (on SIGHUP)
lets logrotate move the file away.

Several processes (the workers of one supervisor) may append to the same file:
it is opened ``O_APPEND`` and each flush is one ``os.write`` of whole lines, so
the kernel places every flush at the end of the file in one piece and the lines
of different workers never interleave mid-line.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import Any

Field = Callable[[Any, Any, float], str]
"""``(conn, req, now) -> str``: one field of a finished request's line."""


class _Clock:
    """A time text formatted once per second (the log's only per-request clock work)."""

    __slots__ = ("second", "text", "fmt", "local")

    def __init__(self, fmt: str, local: bool):
        self.second = -1
        self.text = ""
        self.fmt = fmt
        self.local = local

    def __call__(self, _conn: Any, _req: Any, now: float) -> str:
        second = int(now)
        if second != self.second:
            self.second = second
            self.text = time.strftime(self.fmt, time.localtime(second) if self.local else time.gmtime(second))
        return self.text


def _remote_addr(conn: Any, _req: Any, _now: float) -> str:
    label = conn.peer_label or conn.peer  # host:port, looked up once per connection
    return label[:label.rfind(":")]


def _remote_port(conn: Any, _req: Any, _now: float) -> str:
    return conn.peer.rsplit(":", 1)[-1]


def _status(_conn: Any, req: Any, _now: float) -> str:
    return str(req.status)


def _request_time(_conn: Any, req: Any, now: float) -> str:
    return f"{now - req.started:.3f}"


def _msec(_conn: Any, _req: Any, now: float) -> str:
    return f"{now:.3f}"


def _states(_conn: Any, req: Any, _now: float) -> str:
    trace = req.trace
    return "-" if trace is None else trace.compact()


def _machine(conn: Any, _req: Any, _now: float) -> str:
    return conn.machine.name


RUNTIME_FIELDS: dict[str, Field] = {
    "remote_addr": _remote_addr,
    "remote_port": _remote_port,
    "status": _status,
    "request_time": _request_time,   # seconds, millisecond resolution (1.234)
    "msec": _msec,                   # when the request ended, seconds since the epoch
    "states": _states,               # state:12us>state:8us (µs per state)
    "machine": _machine,
}
"""Fields of every protocol; ``$time_local`` and ``$time_iso8601`` are made per format."""
TRACE_FIELDS = frozenset({"states"})  # fields that need every request traced

_FIELD = re.compile(r"\$(?:\{([A-Za-z0-9_]*)\}|([A-Za-z0-9_]+))")


class FormatError(ValueError):
    """An access-log format that cannot be used (one line naming the field)."""


class LineFormat:
    """A compiled format: ``line(conn, req, now)`` gives the line with its newline;
    ``names`` are its fields and ``traces`` says whether it needs the state path."""

    def __init__(self, text: str, line: Callable[[Any, Any, float], str], names: tuple[str, ...]):
        self.text = text
        self.line = line
        self.names = names
        self.traces = any(n in TRACE_FIELDS for n in names)


def compile_format(text: str, module_field: Callable[[str], Field | None] | None = None) -> LineFormat:
    """Compile ``text`` (see the module docstring); ``module_field(name)`` gives
    the protocol module's fields.  Raises :class:`FormatError` for an unknown
    field, a ``$`` without a name, or a line break in the format."""
    if "\n" in text or "\r" in text:
        raise FormatError("a format is one line (no line breaks)")
    getters: list[Field] = []
    names: list[str] = []
    code: list[str] = []
    pos = 0
    for m in [*_FIELD.finditer(text), None]:
        end = len(text) if m is None else m.start()
        literal = text[pos:end]
        if "$" in literal:
            raise FormatError(f"'$' without a field name at column {pos + literal.index('$') + 1} "
                              "(write $name or ${name})")
        if literal:
            code.append(repr(literal))
        if m is None:
            break
        name = m.group(1) if m.group(1) is not None else m.group(2)
        if not name:
            raise FormatError(f"empty field name '${{}}' at column {m.start() + 1}")
        getter = _field(name, module_field)
        if getter is None:
            hint = getattr(module_field, "hint", "")
            raise FormatError(f"unknown field ${name} (known: {', '.join('$' + n for n in known_fields(module_field))}"
                              f"{', ' + hint if hint else ''})")
        code.append(f"_f{len(getters)}(conn, req, now)")
        getters.append(getter)
        names.append(name)
        pos = m.end()
    code.append(repr("\n"))
    namespace = {f"_f{i}": g for i, g in enumerate(getters)}
    # One function per format, made once: a line is a tuple join, no loop.
    src = f"def line(conn, req, now):\n    return ''.join(({', '.join(code)},))\n"
    exec(compile(src, "<access_log_format>", "exec"), namespace)  # noqa: S102 - our own generated code
    return LineFormat(text, namespace["line"], tuple(names))


def module_format(module: Any, text: str | None) -> LineFormat | None:
    """The access-log format a protocol module writes with: ``text``
    (``access_log_format``) or the module's default, compiled; None when the
    module writes no access log.  Raises :class:`FormatError` (one line)."""
    if module.access_field is None:
        if text is not None:
            raise FormatError(f"protocol module {module.name!r} writes no access log")
        return None
    return compile_format(text if text is not None else module.access_format, module.access_field)


def _field(name: str, module_field: Callable[[str], Field | None] | None) -> Field | None:
    if name == "time_local":
        return _Clock("%d/%b/%Y:%H:%M:%S %z", True)
    if name == "time_iso8601":
        return _Clock("%Y-%m-%dT%H:%M:%S%z", True)
    getter = RUNTIME_FIELDS.get(name)
    if getter is None and module_field is not None:
        getter = module_field(name)
    return getter


def known_fields(module_field: Any = None) -> list[str]:
    """Every fixed field name (runtime and module), sorted."""
    names = set(RUNTIME_FIELDS) | {"time_local", "time_iso8601"}
    names |= set(getattr(module_field, "names", ()))
    return sorted(names)


_STDOUT = 1


class AccessLog:
    """Appends request lines to ``path`` (``-`` for standard output)."""

    def __init__(self, path: str, line: Any):
        self.path = path
        self.line = line  # a compiled format's line(conn, req, now) -> str
        self.pending: list[str] = []
        self.fd: int = self._open()

    def _open(self) -> int:
        if self.path == "-":
            return _STDOUT
        try:
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ValueError(f"{self.path}: access log: cannot open: {exc.strerror}") from exc

    def request(self, conn: Any, req: Any, now: float) -> None:
        """Record one finished request."""
        self.pending.append(self.line(conn, req, now))
        if len(self.pending) >= 4096:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered: whole lines, in one write where the kernel allows."""
        if self.pending:
            lines, self.pending = self.pending, []
            data = memoryview("".join(lines).encode("utf-8", "replace"))
            try:
                while data:  # a short write happens only on a full disk or a pipe
                    data = data[os.write(self.fd, data):]
            except OSError:
                pass  # a full disk must not stop the server; the lines are lost

    def reopen(self) -> None:
        """Flush, close and open the file again (after logrotate moved it)."""
        self.flush()
        if self.path != "-":
            os.close(self.fd)
            self.fd = self._open()

    def close(self) -> None:
        """Flush and close."""
        self.flush()
        if self.path != "-" and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
