"""The DNS caching forwarder as the runtime sees it (registered through the
``afpa.modules`` entry point, like any module).

It speaks both transports on the ``listen`` address: UDP (each datagram one
query, :mod:`afpa.net.datagram`) and TCP (length-framed queries on a stream
connection, answered in order).
"""

from __future__ import annotations

from typing import Any

from afpa.machine.modules import ProtocolModule, collect
from protocols.dns import invalidation, states
from protocols.dns.scopes import DnsGlobal, DnsRequest, describe, rcode_name, type_name
from protocols.dns.settings import SETTINGS
from protocols.dns.wire import qname_text

FACTS = {
    "query": "a parsed DNS query (question, EDNS size, cache key)",
    "flight": "an upstream query under way for this question (this request asks, or waits for it)",
    "upstream_answer": "an upstream's answer to this question, checked (ID, source, question)",
}
"""The contract words of the DNS state functions (plus the runtime's ``response``)."""


def _qname(_conn: Any, req: Any, _now: float) -> str:
    q = req.query
    return qname_text(q.qname) if q is not None else "-"


def _qtype(_conn: Any, req: Any, _now: float) -> str:
    q = req.query
    return type_name(q.qtype) if q is not None else "-"


def _rcode(_conn: Any, req: Any, _now: float) -> str:
    return rcode_name(req.rcode) if req.rcode >= 0 else "-"


def _cache_status(_conn: Any, req: Any, _now: float) -> str:
    return req.cache_status


def _transport(conn: Any, _req: Any, _now: float) -> str:
    return "udp" if conn.kind == "datagram" else "tcp"


def _size(_conn: Any, req: Any, _now: float) -> str:
    return str(len(req.head))


def _upstream(_conn: Any, req: Any, _now: float) -> str:
    up = req.upstream
    return f"{up[0]}:{up[1]}" if up is not None else "-"


FIELDS = {"qname": _qname, "qtype": _qtype, "rcode": _rcode, "cache_status": _cache_status,
          "transport": _transport, "bytes": _size, "upstream": _upstream}
DEFAULT_FORMAT = "$time_iso8601 $remote_addr $transport $qname $qtype $rcode $cache_status $request_time"


def access_field(name: str) -> Any:
    """The access-log field ``$name`` of a DNS query (None: not one)."""
    return FIELDS.get(name)


access_field.names = tuple(FIELDS)  # type: ignore[attr-defined]


def trace_fields(conn: Any, req: Any) -> dict:
    """A traced query's own fields (``afpa trace``, ``GET /trace``)."""
    return {"qname": _qname(conn, req, 0), "qtype": _qtype(conn, req, 0), "rcode": _rcode(conn, req, 0),
            "cache_status": req.cache_status, "transport": _transport(conn, req, 0), "bytes": len(req.head)}


MODULE = ProtocolModule(
    name="dns",
    functions=collect(states.FUNCTIONS),
    table="dns.toml",
    make_global=DnsGlobal.build,
    make_request=lambda conn: DnsRequest(),
    fail=states.fail,
    access_field=access_field,
    access_format=DEFAULT_FORMAT,
    trace_fields=trace_fields,
    facts=FACTS,
    transports=frozenset({"datagram", "stream"}),
    settings=SETTINGS,
    describe=describe,
    invalidation=invalidation,
    sweep=DnsGlobal.sweep,
    metrics=DnsGlobal.metrics,
)
