"""The access log: one line per finished request, written by the protocol module's
``access_line`` and buffered here.

Lines are buffered in memory and flushed by the server's once-a-second sweep
(and on shutdown), so logging costs the fast path one string format and one
list append, not a write system call per request.  ``reopen()`` (on SIGHUP)
lets logrotate move the file away.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


class AccessLog:
    """Appends request lines to ``path`` (``-`` for standard output)."""

    def __init__(self, path: str, line: Any):
        self.path = path
        self.line = line  # module's access_line(conn, req, now) -> str
        self.pending: list[str] = []
        self.file: TextIO = self._open()

    def _open(self) -> TextIO:
        if self.path == "-":
            return sys.stdout
        try:
            return open(self.path, "a", encoding="utf-8", errors="replace")
        except OSError as exc:
            raise ValueError(f"{self.path}: access log: cannot open: {exc.strerror}") from exc

    def request(self, conn: Any, req: Any, now: float) -> None:
        """Record one finished request."""
        self.pending.append(self.line(conn, req, now))
        if len(self.pending) >= 4096:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered."""
        if self.pending:
            lines, self.pending = self.pending, []
            try:
                self.file.write("".join(lines))
                self.file.flush()
            except OSError:
                pass  # a full disk must not stop the server; the lines are lost

    def reopen(self) -> None:
        """Flush, close and open the file again (after logrotate moved it)."""
        self.flush()
        if self.path != "-":
            self.file.close()
            self.file = self._open()

    def close(self) -> None:
        """Flush and close."""
        self.flush()
        if self.path != "-":
            self.file.close()
