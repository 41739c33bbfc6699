"""The runtime's own state functions, and the registry every server starts from.

Tables name these with the ``afpa.`` prefix (``run = "afpa.send_engine"``).
"""

from __future__ import annotations

from afpa.machine.modules import Contract, Registry, StateFunction
from afpa.net.sendengine import send_engine

INTRINSICS = {
    "send_engine": StateFunction(
        "send_engine", send_engine, frozenset({"sent", "close", "aborted"}),
        "write the response on the request scope (Send Engine)",
        Contract(needs=frozenset({"response"}))),
}


def default_registry() -> Registry:
    """The registry with the runtime intrinsics and every installed protocol module."""
    reg = Registry(intrinsics=dict(INTRINSICS))
    reg.discover()
    return reg
