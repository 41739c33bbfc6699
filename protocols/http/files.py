"""Mapping a request path to a file under the document root, safely.

Everything here may block on the disk, so it runs on a helper thread
(``g.helpers.run(open_target, ...)``) and returns a :class:`FileResult` for the
reactor thread to turn into a response.

No escape from the root:

- the path is percent-decoded once; NUL is refused (400), encoded ``/`` or ``\\``
  is refused (404, like Apache's default), dot segments are resolved and one
  that climbs above the root is refused (400);
- the resolved file's real path (symlinks followed) must still lie under the
  root's real path, else 403;
- only regular files are served (opened non-blocking, so a FIFO cannot hang a
  helper), a directory is served through its ``index.html``.
"""

from __future__ import annotations

import errno
import mimetypes
import os
import stat
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs

_TYPES = mimetypes.MimeTypes(filenames=())  # built-in table only: same answer on every machine
INDEX = "index.html"


@attrs.define(slots=True, eq=False)
class FileResult:
    """What a helper found.  ``kind``: ``object`` (``data`` read whole),
    ``stream`` (``fd`` left open), ``unchanged`` (the stale object is still
    current), ``redirect`` (``location``), or ``error`` (``status``, ``detail``)."""

    kind: str
    status: int = 200
    detail: str = ""
    data: bytes = b""
    fd: int = -1
    size: int = 0
    mtime: float = 0.0
    identity: tuple = ()
    content_type: bytes = b"application/octet-stream"
    location: bytes = b""
    reserved: int = 0     # in-flight bytes reserved for ``data`` (given back by the caller)
    busy: bool = False    # small enough to cache, streamed because the in-flight budget was full


def content_type(name: str) -> bytes:
    """Content-Type for a file name, by extension."""
    ctype, encoding = _TYPES.guess_type(name, strict=False)
    if ctype is None or encoding is not None:
        return b"application/octet-stream"
    if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
        return (ctype + "; charset=utf-8").encode()
    return ctype.encode()


def resolve(root: str, raw_path: bytes) -> str | FileResult:
    """Filesystem path for a request path (relative to ``root``), or an error result."""
    lowered = raw_path.lower()
    if b"%2f" in lowered or b"%5c" in lowered:
        return FileResult("error", 404, "encoded slash in path")
    decoded = unquote_to_bytes(raw_path)
    if b"\x00" in decoded:
        return FileResult("error", 400, "NUL in path")
    parts: list[bytes] = []
    for seg in decoded.split(b"/"):
        if seg in (b"", b"."):
            continue
        if seg == b"..":
            if not parts:
                return FileResult("error", 400, "path climbs above the document root")
            parts.pop()
            continue
        parts.append(seg)
    return os.path.join(root, *(os.fsdecode(p) for p in parts)) if parts else root


def _inside(root: str, real: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def open_target(root: str, raw_path: bytes, query: bytes, max_object: int,
                read_body: bool, stale_identity: tuple | None, inflight: Any = None) -> FileResult:
    """Resolve, open and (if small enough and wanted) read the file for a request.

    ``root`` must already be a real path.  Runs on a helper thread.  A file is
    read whole only if ``inflight`` (the cache's in-flight budget: ``reserve``,
    ``unreserve``) grants its size; otherwise it is left open to be streamed.
    """
    path = resolve(root, raw_path)
    if isinstance(path, FileResult):
        return path
    real = os.path.realpath(path)
    if not _inside(root, real):
        return FileResult("error", 403, "path leaves the document root")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return _os_error(exc)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            fd = -1
            if not raw_path.endswith(b"/"):
                loc = raw_path + b"/" + (b"?" + query if query else b"")
                return FileResult("redirect", 301, location=loc)
            index = open_target(root, raw_path + INDEX.encode(), query, max_object, read_body,
                                stale_identity, inflight)
            if index.kind == "error" and index.status == 404:
                return FileResult("error", 403, "directory has no index.html")
            return index
        if not stat.S_ISREG(st.st_mode):
            return FileResult("error", 403, "not a regular file")
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        result = FileResult("stream", size=st.st_size, mtime=st.st_mtime, identity=identity,
                            content_type=content_type(real))
        if stale_identity is not None and stale_identity == identity:
            result.kind = "unchanged"
            return result
        if st.st_size <= max_object:
            if not read_body:
                result.kind = "object"
                return result
            if inflight is None or inflight.reserve(st.st_size):
                result.kind = "object"
                result.reserved = st.st_size if inflight is not None else 0
                try:
                    result.data = _read_all(fd, st.st_size)
                except BaseException:
                    if inflight is not None:
                        inflight.unreserve(result.reserved)
                    raise
                result.size = len(result.data)
                return result
            result.busy = True
        result.fd, fd = fd, -1
        return result
    except OSError as exc:
        return _os_error(exc)
    finally:
        if fd >= 0:
            os.close(fd)


def _read_all(fd: int, size: int) -> bytes:
    """Read a whole (small) file; a file that shrinks meanwhile gives what is there."""
    chunks = []
    left = size
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _os_error(exc: OSError) -> FileResult:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP):
        return FileResult("error", 404, "")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return FileResult("error", 403, "")
    return FileResult("error", 500, f"cannot read file ({errno.errorcode.get(exc.errno, exc.errno)})")
