"""The one protocol error of the HTTP module, carrying the status to answer with.

The parser and the state functions raise :class:`HttpError`; ``derive_request``
(and the other states) translate it into a response at the boundary, so no
caller has to know which status a given defect deserves.
"""

from __future__ import annotations

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 206: "Partial Content",
    301: "Moved Permanently", 304: "Not Modified",
    400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 411: "Length Required", 412: "Precondition Failed",
    413: "Content Too Large", 414: "URI Too Long", 416: "Range Not Satisfiable", 417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    """A request we will not serve: ``status`` is the answer, ``detail`` says why
    (it goes into the short plain-text body and the log, never user data)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"{status} {detail}")
        self.status = status
        self.detail = detail
