"""The admin listener's connection handling (twisted.web on a Clock)."""

from __future__ import annotations

from twisted.internet.testing import StringTransport

from afpa.ops import admin


def test_silent_admin_connection_is_closed(mem):
    site = admin.admin_site(mem.server)
    channel = site.buildProtocol(None)
    channel.callLater = mem.clock.callLater  # twisted.web's timeout timer, on the test clock
    t = StringTransport()
    channel.makeConnection(t)
    channel.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
    mem.clock.advance(admin.TIMEOUT - 1)
    assert not t.disconnecting
    mem.clock.advance(2)
    assert t.disconnecting
    assert admin.TIMEOUT <= 60
