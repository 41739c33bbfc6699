"""The quotes module as afpa sees it: settings, global scope and the
:class:`~afpa.machine.modules.ProtocolModule` the ``afpa.modules`` entry point
names (see pyproject.toml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from afpa.cache.store import CacheStore
from afpa.config import COUNT, PATH, SECONDS, TEXT
from afpa.machine.modules import ModuleSettings, Option, ProtocolModule, StreamLimits, collect
from afpa.machine.scopes import Runtime
from afpa_quotes import states


@attrs.frozen
class QuoteSettings:
    """The module's own settings; the defaults are its embedded configuration."""

    dir: str = "."              # where <key>.txt files are
    ttl: float = 60.0           # seconds a quote read from a file is answered from the cache
    greeting: str = "quotes ready"
    max_line: int = 512         # longest command line, in bytes
    line_timeout: float = 30.0  # seconds a begun line may take to arrive whole


def check_settings(s: QuoteSettings) -> None:
    """Rules a single option's kind cannot check (ValueError ``<key>: <problem>``)."""
    if not Path(s.dir).is_dir():
        raise ValueError(f"quotes.dir: not a directory: {s.dir}")
    if "\r" in s.greeting or "\n" in s.greeting:
        raise ValueError("quotes.greeting: must be one line")


SETTINGS = ModuleSettings(
    section="quotes",  # [quotes] in a config file
    cls=QuoteSettings,
    options=(
        Option(key="dir", field="dir", kind=PATH, flag="--quotes-dir",
               help="directory of <key>.txt files to answer from (default: .)"),
        Option(key="ttl", field="ttl", kind=SECONDS, flag="--quote-ttl",
               help="seconds a quote is answered from the cache (default: 60)"),
        Option(key="greeting", field="greeting", kind=TEXT, help="what the server says first"),
        Option(key="max_line", field="max_line", kind=COUNT, help="longest command line in bytes"),
        Option(key="line_timeout", field="line_timeout", kind=SECONDS,
               help="seconds a begun line may take to arrive whole"),
    ),
    check=check_settings,
)


@attrs.define(slots=True, eq=False)
class QuotesGlobal:
    """The global scope: one per server (and per configuration reload), built
    from the settings, shared by every connection."""

    runtime: Runtime            # the Send Engine and the states reach the runtime's services here
    cache: CacheStore
    dir: Path
    ttl: float
    max_line: int
    line_timeout: float
    greeting: bytes             # the whole greeting line, built once
    reads: int = 0              # quote files read (misses), for tests and curiosity

    @classmethod
    def build(cls, settings: Any, runtime: Runtime) -> QuotesGlobal:
        """``make_global``: ``settings`` is afpa's Settings; ours are in
        ``settings.module_settings`` (None when built from code: the defaults)."""
        own = settings.module_settings or QuoteSettings()
        return cls(runtime=runtime, cache=runtime.cache, dir=Path(own.dir), ttl=own.ttl,
                   max_line=own.max_line, line_timeout=own.line_timeout, greeting=b"+OK " + own.greeting.encode() + b"\r\n")


def fail(g: QuotesGlobal, conn: Any, req: states.QuoteRequest, reason: str) -> None:
    """The answer when a request cannot go on (``reason``: ``"failed"``, a
    state raised); the connection closes after it.  A slow client is not a
    failure: the table maps its ``timeout`` (see ``line_timeout``)."""
    req.head = b"-ERR server error\r\n"
    req.status = 500


def describe(g: QuotesGlobal) -> list[str]:
    """A line for the startup log."""
    return [f"quotes from {g.dir}/<key>.txt, cached {g.ttl:g}s"]


MODULE = ProtocolModule(
    name="quotes",
    functions=collect(states.FUNCTIONS),
    table="quotes.toml",
    table_dir=str(Path(__file__).parent / "tables"),
    make_global=QuotesGlobal.build,
    make_request=lambda conn: states.QuoteRequest(),
    fail=fail,
    facts={"line": "one command line read from the input", "key": "the key a GET asks for"},
    speaks_first=True,
    settings=SETTINGS,
    describe=describe,
    # The sweep looks for passed deadlines often enough for our shortest timer.
    stream_limits=lambda own: StreamLimits(message_timeout=own.line_timeout, max_unread=4 * own.max_line),
)
