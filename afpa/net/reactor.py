"""The reactor for ``afpa serve``.

Twisted's epoll reactor wraps every ready descriptor's handler in
``log.callWithLogger``, which builds a logging context per event so that
old-style log lines carry the connection's prefix.  On the fast path that
context costs about a tenth of a cache hit's time, so afpa's reactor calls the
handler directly (:func:`afpa.net.twisted_private.epoll_reactor_class`: it needs
the reactor's private parts).  On the public path (``AFPA_NO_TWISTED_PRIVATES``
or an unverified Twisted) Twisted's own epoll reactor runs unchanged.
"""

from __future__ import annotations

import sys
from typing import Any

from afpa.net import twisted_private


def install() -> Any:
    """Install afpa's reactor if no reactor is installed yet and epoll is available;
    returns the reactor in use either way."""
    if "twisted.internet.reactor" not in sys.modules:
        cls = twisted_private.epoll_reactor_class()
        if cls is not None:
            from twisted.internet.main import installReactor
            installReactor(cls())
        else:
            try:
                from twisted.internet import epollreactor
            except ImportError:  # not Linux: Twisted's default reactor it is
                pass
            else:
                epollreactor.install()
    from twisted.internet import reactor
    return reactor
