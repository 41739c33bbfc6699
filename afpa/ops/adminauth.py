"""The admin API's refusals and answers: the bearer-token check every protected
endpoint runs, and its one-line JSON answers.  Apart from the resources (afpa.ops.admin,
afpa.ops.tracestream) so that each of them can use it."""

from __future__ import annotations

import hmac
import json
from typing import Any


class _Refused(Exception):
    """An admin write answered with ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


Refused = _Refused  # the public name, for backends that refuse a write


def _json(request: Any, status: int, value: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value, separators=(", ", ": ")).encode() + b"\n"


def authorize(request: Any, token: bytes | None) -> None:
    """Refuse (raise :class:`_Refused`) unless the request carries
    ``Authorization: Bearer <token>``: 401 without credentials, 403 with a wrong
    token, and 403 for everyone when no token is configured."""
    if token is None:
        raise _Refused(403, "this admin endpoint is disabled: no admin token is configured "
                            "(admin_token_file, --admin-token-file or AFPA_ADMIN_TOKEN)")
    header = request.getHeader(b"authorization") or b""
    scheme, _, given = header.strip().partition(b" ")
    given = given.strip()
    if scheme.lower() != b"bearer" or not given:
        request.setHeader(b"www-authenticate", b'Bearer realm="afpa admin"')
        raise _Refused(401, "this endpoint needs Authorization: Bearer <admin token>")
    if not hmac.compare_digest(given, token):
        raise _Refused(403, "wrong admin token")
