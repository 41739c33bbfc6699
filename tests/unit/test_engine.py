"""The engine's stepping loop, driven by a tiny module of its own (no HTTP)."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from afpa.machine import tables
from afpa.net.intrinsics import default_registry
from afpa.machine.modules import ProtocolModule, collect, state
from afpa.net.outbound import Exchange
from afpa.machine.scopes import Request

PARKED: list[Deferred] = []


@state("later")
def park(g, conn, req):
    """Wait on something outside the machine (a connect, a helper)."""
    d = Deferred()
    PARKED.append(d)
    return d


@state("closed", "open")
def look(g, conn, req):
    """See whether the connection closed while parked."""
    return "closed" if conn.closed else "open"


MODULE = ProtocolModule(name="enginetest", functions=collect([park, look]), table="",
                        make_global=lambda s, r: None, make_request=lambda conn: Request(),
                        fail=lambda g, conn, req, reason: None)
TABLE = """
[machine]
name = "enginetest"
module = "enginetest"
start = "park"

[states.park]
run = "park"
on = { later = "look" }

[states.look]
run = "look"
on = { closed = "@close", open = "@done" }
"""


class _Req(Request):
    result = "unset"

    def finish(self, close):
        self.result = "closed" if close else "open"

    def on_failure(self):
        self.result = "failed"


def test_outbound_machine_goes_on_when_its_connection_closed_while_parked():
    """A backend connection lost while a state waits is an event for the next state,
    never a reason to stop stepping (the client would wait for ever)."""
    reg = default_registry()
    reg.register(MODULE)
    machine = tables.load_text(TABLE, "enginetest.toml", reg)
    req = _Req()
    ex = Exchange(None, machine, req)
    done = []
    ex.start().addCallback(done.append)
    ex.lost(None)          # the connection goes away while `park` waits
    PARKED.pop().callback("later")
    assert done == ["closed"] and req.result == "closed"
