"""Mapping a request path to a file under the document root, safely.

Everything here may block on the disk, so it runs on a helper thread
(``g.helpers.run(open_target, ...)``) and returns a :class:`FileResult` for the
reactor thread to turn into a response.

No escape from the root:

- the request path arrives normalised (``protocols/http/wire/paths.py``, run by the
  parser): no dot segments, no empty segments, no encoded ``/``, ``\\`` or NUL;
  here what escapes remain are decoded and the segments joined under the root
  (a dot segment that still shows up is refused, never resolved a second way);
- a segment starting with a dot (``.git``, ``.env``, ``.htaccess``) is answered
  404 unless its name is allowed (``dotfiles_allow``);
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


def resolve(root: str, path: bytes, dotfiles_allow: tuple[str, ...] = ()) -> str | FileResult:
    """Filesystem path for a normalised request path (under ``root``), or an error result."""
    parts: list[str] = []
    for seg in unquote_to_bytes(path).split(b"/"):
        if not seg:
            continue
        if seg == b"." or seg == b".." or b"\x00" in seg:
            # The parser's normalisation removes these; a caller that skipped it is refused.
            return FileResult("error", 400, "path not normalised")
        name = os.fsdecode(seg)
        if name[0] == "." and name not in dotfiles_allow:
            # 404, not 403: do not tell a scanner that /.git or /.env exists.
            return FileResult("error", 404, "")
        parts.append(name)
    return os.path.join(root, *parts) if parts else root


def _inside(root: str, real: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def open_target(root: str, req_path: bytes, query: bytes, max_object: int,
                read_body: bool, stale_identity: tuple | None,
                dotfiles_allow: tuple[str, ...] = (), inflight: Any = None) -> FileResult:
    """Resolve, open and (if small enough and wanted) read the file for a
    request's normalised path.

    ``root`` must already be a real path.  Runs on a helper thread.  A file is
    read whole only if ``inflight`` (the cache's in-flight budget: ``reserve``,
    ``unreserve``) grants its size; otherwise it is left open to be streamed.
    """
    path = resolve(root, req_path, dotfiles_allow)
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
            if not req_path.endswith(b"/"):
                return FileResult("redirect", 301, location=directory_location(req_path, query))
            index = open_target(root, req_path + INDEX.encode(), query, max_object, read_body,
                                stale_identity, dotfiles_allow, inflight)
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


def directory_location(path: bytes, query: bytes) -> bytes:
    """``Location`` for a directory asked without its trailing slash: an absolute
    path on this host.  It never starts with ``//``, which a browser would read
    as a network-path reference to another host (an open redirect)."""
    return b"/" + path.lstrip(b"/") + b"/" + (b"?" + query if query else b"")


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
