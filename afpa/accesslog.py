"""The access log: one line per finished request, written by the protocol module's
``access_line`` and buffered here.

Lines are buffered in memory and flushed by the server's once-a-second sweep
(and on shutdown), so logging costs the fast path one string format and one
list append, not a write system call per request.  ``reopen()`` (on SIGHUP)
lets logrotate move the file away.

Several processes (the workers of one supervisor) may append to the same file:
it is opened ``O_APPEND`` and each flush is one ``os.write`` of whole lines, so
the kernel places every flush at the end of the file in one piece and the lines
of different workers never interleave mid-line.
"""

from __future__ import annotations

import os
from typing import Any

_STDOUT = 1


class AccessLog:
    """Appends request lines to ``path`` (``-`` for standard output)."""

    def __init__(self, path: str, line: Any):
        self.path = path
        self.line = line  # module's access_line(conn, req, now) -> str
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
