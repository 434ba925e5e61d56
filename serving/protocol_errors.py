"""Malformed HTTP answered in the one JSON error format.

uvicorn answers a request it cannot parse (a bad request line, an invalid header, a broken
chunked body) itself, before any ASGI app or middleware sees it, with ``400`` and a plain-text
body: the only response of the service outside ``{"error", "fix", "status", "request_id"}``.
uvicorn has no setting or hook for that body, so :func:`json_bad_request` replaces the method
that writes it on both HTTP implementations (h11 and httptools) it may pick.
"""

from __future__ import annotations

import json
from typing import Any

from serving.errors import error_body

FIX = ("send a valid HTTP/1.1 request (request line, headers and body as RFC 9112 has them); "
       "a client library does this for you")


def bad_request_bytes(parser_message: str) -> bytes:
    """The JSON body of the 400 for a request the HTTP parser refused with ``parser_message``."""
    body = error_body(400, f"malformed HTTP request: {parser_message.rstrip('.')}", FIX)
    return json.dumps(body).encode("utf-8")


def _send_json_400(self: Any, msg: str) -> None:
    """Drop-in for ``send_400_response`` of uvicorn's protocols: the same status and close, a JSON body."""
    body = bad_request_bytes(msg)
    head = [b"HTTP/1.1 400 Bad Request\r\n"]
    for name, value in getattr(self.server_state, "default_headers", []):
        head.append(name + b": " + value + b"\r\n")
    head += [b"content-type: application/json\r\n", b"content-length: " + str(len(body)).encode() + b"\r\n",
             b"connection: close\r\n", b"\r\n"]
    # Raw bytes, not h11 events: h11's state machine is in an error state after a parse failure.
    self.transport.write(b"".join(head) + body)
    self.transport.close()


def json_bad_request() -> list[str]:
    """Make uvicorn's own 400 JSON; returns the protocol classes changed (those importable)."""
    changed = []
    for module_name, class_name in (("uvicorn.protocols.http.h11_impl", "H11Protocol"),
                                    ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol")):
        try:
            module = __import__(module_name, fromlist=[class_name])
        except ImportError:  # httptools is optional
            continue
        setattr(getattr(module, class_name), "send_400_response", _send_json_400)
        changed.append(class_name)
    return changed
