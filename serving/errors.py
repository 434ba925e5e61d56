"""One error format for every failure, and the gateway middleware in front of every route.

Every error is JSON ``{"error", "fix", "status", "request_id"}`` with a 4xx status for bad
input. The middleware screens requests before the app reads them (size limits, content types,
multipart shape, the array endpoint's output size), renames uploaded files so that a client's
file name never reaches a path or a log, rewrites every error response (BentoML's, pydantic's,
Starlette's plain text) into the one format, and counts responses by the status actually sent.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse

from serving.admission import Admission, BodyBuffer, ReadDeadline, deadline_receive
from serving.jsonlimits import JSONLimitError, JSONLimits, parse_limited
from serving.metrics import REQUESTS, restore_path
from serving.multipart import MultipartScreen, Rejection
from serving.uploads import InputError

logger = logging.getLogger("bentoml.medsr")

# The request id of the request being served (set by the middleware; copied into the worker
# thread that runs a sync API method).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("medsr_request_id", default="-")

INPUT_ERROR_STATUS: dict[str, int] = {"malformed": 400, "unsupported_media": 415, "too_large": 413,
                                      "unprocessable": 422}
MULTIPART_ROUTES = frozenset({"/upscale", "/demo"})
JSON_ROUTES = frozenset({"/upscale_array"})
_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DEFAULT_FIXES: dict[int, str] = {
    400: "check the request against the API description in docs/serving.md (multipart field `file` for /upscale "
         "and /demo, JSON {\"images\": [...]} for /upscale_array)",
    404: "check the URL: the endpoints are /, /upscale, /upscale_array, /demo, /info, /samples, /livez, "
         "/readyz, /metrics",
    405: "use POST for /upscale, /upscale_array and /demo, GET for the pages and probes",
    413: "send a smaller request (see the limits in GET /info)",
    429: "retry after the Retry-After seconds",
    415: "send a supported content type (see docs/serving.md)",
    422: "change the request as the error says",
    500: "retry; if it persists, report the X-Request-ID to the operators",
    503: "wait until /readyz answers 200 (the champion model is loading or not registered)",
}
_PYDANTIC_STATUS = {"medsr_too_large": 413, "medsr_unprocessable": 422}


class ServiceNotReady(RuntimeError):
    """No champion is loaded yet (503)."""


def endpoint_label(path: str) -> str:
    return path if path in MULTIPART_ROUTES | JSON_ROUTES | {"/", "/info", "/samples"} else "other"


def error_body(status: int, error: str, fix: str | None = None, **extra: Any) -> dict[str, Any]:
    """The one error format: what went wrong, what to do, and the request to quote."""
    return {"error": error, "fix": fix or DEFAULT_FIXES.get(status, DEFAULT_FIXES[400]), "status": status,
            "request_id": REQUEST_ID.get(), **extra}


def error_response(status: int, error: str, fix: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, error, fix), status_code=status)


def input_error_response(err: InputError) -> JSONResponse:
    return error_response(INPUT_ERROR_STATUS[err.kind], err.error, err.fix)


def scrubbed(err: BaseException, names: list[str]) -> str:
    """An exception's text without the upload's path or name (they can hold patient names)."""
    text = f"{type(err).__name__}: {err}"
    for part in sorted(set(names), key=len, reverse=True):
        if part:
            text = text.replace(part, "<upload>")
    return text[:300]


class ClientErrorLogFilter(logging.Filter):
    """BentoML logs every request-validation failure (and an upload cut off at the size limit)
    as an ERROR with a traceback and pydantic's copy of the input. That is the client's error,
    not the server's: log it as one INFO line without the traceback or the input."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pydantic import ValidationError
        from starlette.requests import ClientDisconnect

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (ValidationError, ClientDisconnect)):
            problem = (f"{exc.error_count()} validation error(s)" if isinstance(exc, ValidationError)
                       else "body not read to the end (refused by the gateway, or the client left)")
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = "request_id=%s invalid request to %s [%s]: %s"
            record.args = (REQUEST_ID.get(), *(record.args or ())[:2], problem)
            record.exc_info, record.exc_text = None, None
        return True


def normalised_error(status: int, body: bytes, content_type: str) -> tuple[int, dict[str, Any]]:
    """Any error body (ours, BentoML's, pydantic's, Starlette's plain text) in the one format.

    Returns the status to send: request validation errors raised as ``medsr_too_large`` or
    ``medsr_unprocessable`` (see :mod:`serving.schemas`) become 413/422 instead of BentoML's 400.
    """
    payload: Any = None
    if "json" in content_type:
        try:
            payload = json.loads(body or b"null")
        except ValueError:
            payload = None
    if isinstance(payload, list) and payload and isinstance(payload[0], dict):
        payload = payload[0]  # BentoML wraps some errors in a one-element list
    if isinstance(payload, dict) and "fix" in payload and "error" in payload:
        return status, {**payload, "status": status, "request_id": REQUEST_ID.get()}
    if isinstance(payload, dict) and isinstance(payload.get("detail"), list) and payload["detail"]:
        first = payload["detail"][0]
        kind = str(first.get("type", ""))
        field = ".".join(str(part) for part in first.get("loc", []) if part != "body") or "body"
        message = str(first.get("msg", "invalid value"))
        if kind.startswith("medsr_"):
            status = _PYDANTIC_STATUS.get(kind, status)
            error, _, fix = message.partition(" Fix: ")
            return status, error_body(status, error, fix or None)
        if kind == "missing":
            return status, error_body(status, f"missing field `{field}`",
                                      f"send `{field}` (for /upscale and /demo the image goes in multipart field `file`)")
        if kind == "json_invalid":
            return status, error_body(status, f"the request body is not valid JSON ({message})",
                                      'send JSON like {"images": [{"image": [[0.0, 0.5], [0.5, 1.0]], "scale": 4}]}')
        return status, error_body(status, f"invalid field `{field}`: {message}",
                                  f"send `{field}` with a value of the documented type (docs/serving.md)")
    if isinstance(payload, dict) and "error" in payload:
        return status, error_body(status, str(payload["error"]))
    text = body.decode("utf-8", "replace").strip()[:300] if body else ""
    return status, error_body(status, text or f"HTTP {status}")


def _plain_query(raw: bytes) -> str:
    """A query string's parameter names (never their values: a client's text), "" for none."""
    from urllib.parse import parse_qsl

    names = [name for name, _ in parse_qsl(raw.decode("latin-1"), keep_blank_values=True)]
    if raw and not names:
        return "(unparsed)"
    return "&".join(dict.fromkeys(name if re.match(r"^[A-Za-z0-9_.-]{1,40}$", name) else "..." for name in names))


def _array_output_pixels(payload: Any) -> int | None:
    """Output pixels an /upscale_array body asks for (all images together); None when it is not
    the documented shape (request validation then names the problem)."""
    try:
        total = 0
        for item in payload["images"]:
            scale = int(item.get("scale", 4))
            if item.get("image") is not None:
                height, width = len(item["image"]), max((len(row) for row in item["image"]), default=0)
            else:
                height, width = (int(side) for side in item["shape"])
            total += max(height, 0) * max(width, 0) * scale * scale
        return total
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
        return None


class GatewayMiddleware:
    """ASGI middleware in front of every route.

    * ``X-Request-ID``: the client's (when it is a short token) or a new one, on every response
      and in every log line and error body;
    * bodies over ``max_upload_bytes`` get 413 before they are read (declared length) or as
      soon as they pass it (chunked uploads); empty bodies and wrong content types on the API
      routes get 400/415 with the fix; multipart part headers are screened (:class:`MultipartScreen`);
    * /upscale_array requests whose results would exceed ``max_array_output_pixels`` get 413
      before any work (the response, not only the request, is bounded);
    * bodies are read here, within ``read_timeout_s`` (else 408), before a file request
      (/upscale, /demo) is admitted, so a slow upload holds no compute slot; admission is by
      expected wait (:class:`serving.admission.Admission`: 429 with ``Retry-After`` = that wait);
    * an admitted request not answered within ``compute_timeout_s`` gets 503 (its computation
      keeps its slot until it ends, so the worker is not oversubscribed);
    * every error response (status >= 400) is rewritten into :func:`error_body`'s format, and
      every response is counted in ``medsr_requests_total`` by the status actually sent.
    """

    def __init__(self, app: Any, max_upload_bytes: int, max_array_output_pixels: int, admission: Admission,
                 read_timeout_s: float = math.inf, compute_timeout_s: float = math.inf,
                 json_limits: JSONLimits | None = None, form_fields: dict[str, tuple[str, ...]] | None = None) -> None:
        self.app = app
        self.admission = admission
        self.read_timeout_s = float(read_timeout_s)
        self.compute_timeout_s = float(compute_timeout_s)
        self.form_fields = dict(form_fields or {})
        self.json_limits = json_limits or JSONLimits(max_bytes=int(max_upload_bytes))
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_array_output_pixels = int(max_array_output_pixels)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope = restore_path(scope)  # the outer middlewares saw only its label
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _REQUEST_ID_PATTERN.match(incoming) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"x-request-id"]
        scope["headers"].append((b"x-request-id", request_id.encode()))
        path, method = scope.get("path", ""), scope.get("method", "GET")
        endpoint = endpoint_label(path)
        try:
            if method == "POST" and path in MULTIPART_ROUTES | JSON_ROUTES:
                await self._api_request(scope, receive, send, headers, request_id, endpoint)
            else:
                await self._forward(scope, receive, send, request_id, endpoint, {})
        finally:
            REQUEST_ID.reset(token)

    async def _api_request(self, scope: dict[str, Any], receive: Any, send: Any, headers: dict[str, str],
                           request_id: str, endpoint: str) -> None:
        """Screen and read the whole body (read deadline), admit, then forward (compute deadline)."""
        path, state = scope["path"], {}
        timed = deadline_receive(receive, self.read_timeout_s)
        body = BodyBuffer()
        try:
            try:
                rejection, screened = await self._screen(path, headers, timed, state,
                                                         _plain_query(scope.get("query_string", b"")))
                if rejection is None:
                    rejection = await self._read_whole(screened, body, state)
            except ReadDeadline:
                rejection = (408, f"the request body did not arrive within serving.read_timeout_s = "
                             f"{self.read_timeout_s:g} s", "send the file in one go from a faster connection, or "
                             "split it; the deadline counts from the request's first byte")
            if rejection is not None:
                await self._reject(send, rejection, request_id, path, endpoint)
                return
            admission = self.admission if path in MULTIPART_ROUTES else None
            if admission is not None and not await admission.admit():
                wait = admission.expected_wait()
                await self._reject(send, (429, f"busy: the expected wait is {wait:.1f} s ({admission.in_flight} "
                                          f"requests computing or queued), over serving.max_wait_s = "
                                          f"{admission.max_wait_s:g} s", "retry after the Retry-After seconds, "
                                          "or add workers"), request_id, path, endpoint,
                                   retry_after=admission.retry_after())
                return
            await self._compute(scope, body.replay(receive), send, request_id, endpoint, state, admission)
        finally:
            body.close()

    async def _read_whole(self, receive: Any, body: BodyBuffer, state: dict[str, Any]) -> Rejection | None:
        """Drain the screened body into ``body``; a rejection when the screen or limit refuses it."""
        while True:
            message = await receive()
            if "rejection" in state:
                return state["rejection"]
            if message.get("type") != "http.request":
                return (400, "the client left before sending the whole body", "send the whole request body")
            body.write(message.get("body", b""))
            if not message.get("more_body", False):
                screen = state.get("screen")
                if screen is not None and not screen.closed:
                    return (400, "malformed multipart body: it ends before its closing delimiter (--boundary--)",
                            "let your HTTP client build the multipart body (curl -F file=@image.dcm, requests' files=...)")
                return None

    async def _compute(self, scope: dict[str, Any], receive: Any, send: Any, request_id: str, endpoint: str,
                       state: dict[str, Any], admission: Admission | None) -> None:
        """Forward to the app; past ``compute_timeout_s`` answer 503 and let the work end on its own."""
        granted = time.monotonic()

        def finished(_task: Any = None) -> None:
            if admission is not None:
                admission.release(time.monotonic() - granted)

        task = asyncio.ensure_future(self._forward(scope, receive, send, request_id, endpoint, state))
        try:
            limit = self.compute_timeout_s if math.isfinite(self.compute_timeout_s) else None
            done, _pending = await asyncio.wait({task}, timeout=limit)
        except asyncio.CancelledError:
            task.cancel()
            finished()
            raise
        if task in done or state.get("responded"):
            if task not in done:
                await task  # the response is already on its way: let it finish
            finished()
            task.result()
            return
        state["abandoned"] = True  # the app's response, when it comes, goes nowhere
        task.add_done_callback(finished)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieve, so nothing warns
        await self._reject(send, (503, f"the computation did not finish within serving.compute_timeout_s = "
                                  f"{self.compute_timeout_s:g} s", "send a smaller image or a smaller scale, or "
                                  "retry later; the worker goes on with the others"),
                           request_id, scope.get("path", ""), endpoint, retry_after=max(1, math.ceil(
                               admission.expected_wait() if admission is not None else 1)))

    async def _reject(self, send: Any, rejection: Rejection, request_id: str, path: str, endpoint: str,
                      retry_after: int | None = None) -> None:
        status, error, fix = rejection
        logger.info("request_id=%s endpoint=%s rejected status=%d: %s", request_id, path, status, error)
        REQUESTS.labels(endpoint=endpoint, status=str(status)).inc()
        extra = [(b"retry-after", str(retry_after).encode())] if retry_after is not None else None
        await self._send_json(send, status, error_body(status, error, fix), request_id, base_headers=extra)

    async def _screen(self, path: str, headers: dict[str, str], receive: Any, state: dict[str, Any],
                      query: str = "") -> tuple[Rejection | None, Any]:
        """Checks done before the app reads the body; returns (rejection, receive to use)."""
        if query:
            where = "multipart form fields" if path in MULTIPART_ROUTES else "the JSON body"
            return (400, f"query parameters are not read by {path} (the URL has ?{'...' if len(query) > 40 else query})",
                    f"send the options as {where} (e.g. curl -F file=@image.dcm -F scale=2), not in the URL"), receive
        content_type = headers.get("content-type", "")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_upload_bytes:
            return (413, f"request body too large: {int(declared)} bytes, over serving.max_upload_bytes = "
                    f"{self.max_upload_bytes}", "send a smaller file (crop or downsample it) or raise "
                    "serving.max_upload_bytes"), receive
        expected = "multipart/form-data" if path in MULTIPART_ROUTES else "application/json"
        example = ("with the image in field `file`" if expected.startswith("multipart") else
                   'like {"images": [{"image": [[0.0, 0.5], [0.5, 1.0]], "scale": 4}]}')
        if declared == "0":
            return (400, "empty request body", f"send the request as {expected} {example}"), receive
        media_type = content_type.split(";")[0].strip().lower()
        if media_type != expected:
            return (415, f"unsupported content type {media_type or '(none)'!r} for {path}",
                    f"send {expected}" + (" (e.g. curl -F file=@image.dcm -F scale=4)" if expected.startswith("multipart")
                                          else " (e.g. curl -H 'Content-Type: application/json' -d @images.json)")), receive
        first = await receive()
        body = first.get("body", b"") if first.get("type") == "http.request" else b""
        more = bool(first.get("more_body", False))
        if first.get("type") == "http.request" and not body and not more:
            return (400, "empty request body", f"send the request as {expected} {example}"), receive
        if expected.startswith("multipart"):
            boundary = re.search(r'boundary="?([^";]+)"?', content_type)
            if boundary is None or not body.lstrip(b"\r\n").startswith(b"--" + boundary.group(1).encode("latin-1")):
                return (400, "malformed multipart body (it does not start with the declared boundary)",
                        "let your HTTP client build the multipart body (curl -F file=@image.dcm, "
                        "requests' files=..., the BentoML client)"), receive
            screen = state["screen"] = MultipartScreen(boundary.group(1).encode("latin-1"), self.form_fields.get(path),
                                                       path)
            first = {**first, "body": screen.feed(body, final=not more)}
            if screen.rejection is not None:
                return screen.rejection, receive
            return None, self._screened(first, receive, screen, state)
        # JSON: the whole body is read here (bounded by max_json_bytes) and parsed with limits
        # (serving.jsonlimits) before the app sees it, to bound the response and the parse.
        limit = min(self.max_upload_bytes, self.json_limits.max_bytes)
        chunks, received = [body], len(body)
        while more:
            message = await receive()
            if message.get("type") != "http.request":
                return (400, "the client left before sending the whole body", "send the whole request body"), receive
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            more = bool(message.get("more_body", False))
            if received > limit:
                return (413, f"request body too large: over {limit} bytes (serving.max_json_bytes, max_upload_bytes)",
                        "send fewer or smaller images per request, or use /upscale, which tiles large files"), receive
        whole = b"".join(chunks)
        try:
            payload = parse_limited(whole, self.json_limits)
        except JSONLimitError as err:
            return (err.status, err.error, err.fix), receive
        wanted = _array_output_pixels(payload)
        if wanted is not None and wanted > self.max_array_output_pixels:
            return (413, f"response too large: the results would hold {wanted} pixels, over "
                    f"serving.max_array_output_pixels = {self.max_array_output_pixels}",
                    "send fewer or smaller images per request (base64 `data` is 4x more compact than lists), "
                    "or use /upscale, which tiles large files"), receive
        return None, self._replaying({"type": "http.request", "body": whole, "more_body": False}, receive, None, state)

    def _screened(self, first: dict[str, Any], receive: Any, screen: MultipartScreen, state: dict[str, Any]) -> Any:
        return self._replaying(first, receive, screen, state)

    def _replaying(self, first: dict[str, Any], receive: Any, screen: MultipartScreen | None,
                   state: dict[str, Any]) -> Callable[[], Awaitable[dict[str, Any]]]:
        """A receive that returns ``first`` again, then screens and counts bytes up to the limit.

        A refused body ends as a disconnect; the response the app then sends is replaced by
        ``state["rejection"]``.
        """
        progress = {"replayed": False, "received": len(first.get("body", b""))}

        async def wrapped() -> dict[str, Any]:
            if not progress["replayed"]:
                progress["replayed"] = True
                return first
            if "rejection" in state:
                return {"type": "http.disconnect"}
            message = await receive()
            if message.get("type") != "http.request":
                return message
            body = message.get("body", b"")
            progress["received"] += len(body)
            if progress["received"] > self.max_upload_bytes:
                state["rejection"] = (413, f"request body too large: over serving.max_upload_bytes = "
                                      f"{self.max_upload_bytes} bytes",
                                      "send a smaller file or raise serving.max_upload_bytes")
                return {"type": "http.disconnect"}
            if screen is not None:
                body = screen.feed(body, final=not message.get("more_body", False))
                if screen.rejection is not None:
                    state["rejection"] = screen.rejection
                    return {"type": "http.disconnect"}
                message = {**message, "body": body}
            return message

        return wrapped

    async def _forward(self, scope: dict[str, Any], receive: Any, send: Any, request_id: str, endpoint: str,
                       state: dict[str, Any]) -> None:
        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def wrapped_send(message: dict[str, Any]) -> None:
            if state.get("abandoned"):
                return  # answered 503 at the compute deadline
            state["responded"] = True
            if message["type"] == "http.response.start":
                status = int(message["status"])
                response_headers = MutableHeaders(raw=list(message.get("headers", [])))
                response_headers["x-request-id"] = request_id
                message = {**message, "headers": response_headers.raw}
                if status >= 400 or "rejection" in state:
                    held["start"] = message
                    return
                if endpoint != "other":
                    REQUESTS.labels(endpoint=endpoint, status=str(status)).inc()
                await send(message)
                return
            if message["type"] == "http.response.body" and "start" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                start = held.pop("start")
                if "rejection" in state:
                    status, error, fix = state["rejection"]
                    payload = error_body(status, error, fix)
                    logger.info("request_id=%s endpoint=%s rejected status=%d: %s", request_id, scope.get("path"),
                                status, error)
                else:
                    content_type = MutableHeaders(raw=start["headers"]).get("content-type", "")
                    status, payload = normalised_error(int(start["status"]), b"".join(chunks), content_type)
                if status >= 500:
                    logger.warning("request_id=%s endpoint=%s status=%d", request_id, scope.get("path"), status)
                REQUESTS.labels(endpoint=endpoint, status=str(status)).inc()
                await self._send_json(send, status, payload, request_id, base_headers=start["headers"])
                return
            await send(message)

        await self.app(scope, receive, wrapped_send)

    @staticmethod
    async def _send_json(send: Any, status: int, payload: dict[str, Any], request_id: str,
                         base_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        body = json.dumps(payload).encode()
        headers = MutableHeaders(raw=[(k, v) for k, v in (base_headers or [])
                                      if k.lower() not in (b"content-length", b"content-type")])
        headers["content-type"] = "application/json"
        headers["content-length"] = str(len(body))
        headers["x-request-id"] = request_id
        await send({"type": "http.response.start", "status": status, "headers": headers.raw})
        await send({"type": "http.response.body", "body": body, "more_body": False})
