"""MedSR as a BentoML service: upscale files and arrays with the registry's champion.

Start: ``bentoml serve serving.service:MedSR --host 127.0.0.1 --port 3000 --arg device=auto``
(``make serve``). Endpoints (``README.md`` has a ``curl`` call for each):

* ``POST /upscale`` (multipart: ``file``, ``scale``, optional ``model_version``, ``frame``,
  ``modality``): the same format back (DICOM, NIfTI, PNG, TIFF, JPEG), consistency score in the
  ``X-MedSR-Consistency-PSNR`` header;
* ``POST /upscale_array`` (JSON ``{"images": [...]}``, adaptive batching): arrays in [0, 1] as
  nested lists or base64 float32, results the same way with their consistency scores;
* ``POST /demo`` (multipart): what the web page shows, LR | bicubic | model as PNG data URLs
  with PSNR/SSIM when the original is known;
* ``GET /`` the web page, ``GET /info``, ``GET /samples``, ``GET /samples/{id}``;
* ``GET /livez``, ``GET /readyz`` (ready once the x4 champion is loaded), ``GET /metrics``.

Every response carries ``X-Request-ID``; every error is JSON ``{"error", "fix", "status",
"request_id"}`` with a 4xx status for bad input, and the service goes on serving. Logs hold
request ids, sizes and timings, never file names or DICOM patient attributes.

The models come from the MLflow registry (``models:/medsr-x4@champion`` and ``medsr-x2`` when
registered) or, inside a Bento that ``medsr package`` built, from the BentoML models it
imported from the registry (bento argument ``model_source=bentoml``).
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextvars
import io
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import BaseModel, Field, PrivateAttr, model_validator
from pydantic_core import PydanticCustomError
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from medsr.inference import (
    REGISTERED_MODEL_NAMES,
    InputError,
    LoadedGenerator,
    ModelNotFoundError,
    Tiling,
    compare,
    consistency_psnr,
    describe_size,
    forward,
    load_bentoml_generator,
    load_registered_generator,
    pick_device,
    read_upload,
    upscale_file,
    upscale_image,
)
from serving import serving_params

# A child of BentoML's logger: its handlers and format carry our lines into the server log.
logger = logging.getLogger("bentoml.medsr")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

SERVING, DEGRADE = serving_params()
BATCHING: dict[str, Any] = SERVING["batching"]
STATIC_DIR = Path(__file__).resolve().parent / "static"
SERVICE_SCALES: tuple[int, ...] = tuple(REGISTERED_MODEL_NAMES)  # (4, 2): x4 required, x2 optional

# Bento arguments: `--arg device=cpu` at serve time; `medsr package` stores model_source and
# the BentoML model tags in the Bento, so a built Bento loads what it carries.
ARGUMENTS = bentoml.use_arguments()
DEVICE_ARGUMENT = str(getattr(ARGUMENTS, "device", None) or SERVING["device"])
MODEL_SOURCE = str(getattr(ARGUMENTS, "model_source", None) or "mlflow")
PACKAGED_TAGS: dict[int, str] = {
    int(scale): tag for scale, tag in json.loads(str(getattr(ARGUMENTS, "bento_models", None) or "{}")).items()
}

# The request id of the request being served (set by the gateway middleware; copied into the
# worker thread that runs a sync API method).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("medsr_request_id", default="-")

# Scales the loaded champions offer; read by request validation, written by the service.
AVAILABLE_SCALES: set[int] = set()


class ServiceNotReady(RuntimeError):
    """No champion is loaded yet (503)."""


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
                       else "body not read to the end (over serving.max_upload_bytes, or the client left)")
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = "request_id=%s invalid request to %s [%s]: %s"
            record.args = (REQUEST_ID.get(), *(record.args or ())[:2], problem)
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorLogFilter())

# --------------------------------------------------------------------------------------------
# Prometheus metrics (served on /metrics beside BentoML's own)
# --------------------------------------------------------------------------------------------

REQUESTS = bentoml.metrics.Counter(
    name="medsr_requests_total", documentation="MedSR requests by endpoint and HTTP status",
    labelnames=["endpoint", "status"])
INFERENCE_SECONDS = bentoml.metrics.Histogram(
    name="medsr_inference_seconds", documentation="Seconds from decoded input to encoded output",
    labelnames=["endpoint"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160))
CONSISTENCY = bentoml.metrics.Histogram(
    name="medsr_consistency_psnr_db", documentation="Consistency PSNR (dB) of results against their inputs",
    labelnames=["endpoint"], buckets=(15, 20, 25, 30, 35, 40, 45, 50, 60, 80, 100))
OUTPUT_MEGAPIXELS = bentoml.metrics.Histogram(
    name="medsr_output_megapixels", documentation="Megapixels per upscaled result",
    labelnames=["endpoint"], buckets=(0.01, 0.1, 0.5, 1, 4, 16, 32, 64, 128))

# --------------------------------------------------------------------------------------------
# Gateway middleware: request ids, body limits, content types, one error format
# --------------------------------------------------------------------------------------------

MULTIPART_ROUTES = frozenset({"/upscale", "/demo"})
JSON_ROUTES = frozenset({"/upscale_array"})
_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_DEFAULT_FIXES: dict[int, str] = {
    400: "check the request against the API description in README.md (multipart field `file` for /upscale "
         "and /demo, JSON {\"images\": [...]} for /upscale_array)",
    404: "check the URL: the endpoints are /, /upscale, /upscale_array, /demo, /info, /samples, /livez, "
         "/readyz, /metrics",
    405: "use POST for /upscale, /upscale_array and /demo, GET for the pages and probes",
    413: f"send at most serving.max_upload_bytes = {SERVING['max_upload_bytes']} bytes per request",
    415: "send a supported content type (see README.md)",
    422: "change the request as the error says",
    500: "retry; if it persists, report the X-Request-ID to the operators",
    503: "wait until /readyz answers 200 (the champion model is loading or not registered)",
}
_PYDANTIC_STATUS = {"medsr_too_large": 413, "medsr_unprocessable": 422}


def _endpoint_label(path: str) -> str:
    return path if path in MULTIPART_ROUTES | JSON_ROUTES | {"/", "/info", "/samples"} else "other"


def error_body(status: int, error: str, fix: str | None = None, **extra: Any) -> dict[str, Any]:
    """The one error format: what went wrong, what to do, and the request to quote."""
    return {"error": error, "fix": fix or _DEFAULT_FIXES.get(status, _DEFAULT_FIXES[400]), "status": status,
            "request_id": REQUEST_ID.get(), **extra}


def error_response(status: int, error: str, fix: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, error, fix), status_code=status)


def _normalised_error(status: int, body: bytes, content_type: str) -> tuple[int, dict[str, Any]]:
    """Any error body (ours, BentoML's, pydantic's, Starlette's plain text) in the one format.

    Returns the status to send: request validation errors raised as ``medsr_too_large`` or
    ``medsr_unprocessable`` (see :func:`_decoded`) become 413/422 instead of BentoML's 400.
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
                                  f"send `{field}` with a value of the documented type (README.md)")
    if isinstance(payload, dict) and "error" in payload:
        return status, error_body(status, str(payload["error"]))
    text = body.decode("utf-8", "replace").strip()[:300] if body else ""
    return status, error_body(status, text or f"HTTP {status}")


class GatewayMiddleware:
    """ASGI middleware in front of every route.

    * ``X-Request-ID``: the client's (when it is a short token) or a new one, on every response
      and in every log line and error body;
    * bodies over ``max_upload_bytes`` get 413 before they are read (declared length) or as
      soon as they pass it (chunked uploads); empty bodies and wrong content types on the API
      routes get 400/415 with the fix;
    * every error response (status >= 400) is rewritten into :func:`error_body`'s format.
    """

    def __init__(self, app: Any, max_upload_bytes: int) -> None:
        self.app = app
        self.max_upload_bytes = int(max_upload_bytes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _REQUEST_ID_PATTERN.match(incoming) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"x-request-id"]
        scope["headers"].append((b"x-request-id", request_id.encode()))
        path, method = scope.get("path", ""), scope.get("method", "GET")
        endpoint = _endpoint_label(path)
        try:
            if method == "POST" and path in MULTIPART_ROUTES | JSON_ROUTES:
                rejection, receive = await self._screen(path, headers, receive)
                if rejection is not None:
                    status, error, fix = rejection
                    logger.info("request_id=%s endpoint=%s rejected status=%d: %s", request_id, path, status, error)
                    REQUESTS.labels(endpoint=endpoint, status=str(status)).inc()
                    await self._send_json(send, status, error_body(status, error, fix), request_id)
                    return
            await self._forward(scope, receive, send, request_id, endpoint)
        finally:
            REQUEST_ID.reset(token)

    async def _screen(self, path: str, headers: dict[str, str], receive: Any
                      ) -> tuple[tuple[int, str, str] | None, Any]:
        """Checks done before the app reads the body; returns (rejection, receive to use)."""
        content_type = headers.get("content-type", "")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_upload_bytes:
            return (413, f"request body too large: {int(declared)} bytes, over serving.max_upload_bytes = "
                    f"{self.max_upload_bytes}", "send a smaller file (crop or downsample it) or raise "
                    "serving.max_upload_bytes"), receive
        expected = "multipart/form-data" if path in MULTIPART_ROUTES else "application/json"
        if declared == "0":
            return (400, "empty request body", f"send the request as {expected} "
                    + ("with the image in field `file`" if expected.startswith("multipart") else
                       'like {"images": [{"image": [[0.0, 0.5], [0.5, 1.0]], "scale": 4}]}')), receive
        media_type = content_type.split(";")[0].strip().lower()
        if media_type != expected:
            return (415, f"unsupported content type {media_type or '(none)'!r} for {path}",
                    f"send {expected}" + (" (e.g. curl -F file=@image.dcm -F scale=4)" if expected.startswith("multipart")
                                          else " (e.g. curl -H 'Content-Type: application/json' -d @images.json)")), receive
        first = await receive()
        body = first.get("body", b"") if first.get("type") == "http.request" else b""
        if first.get("type") == "http.request" and not body and not first.get("more_body", False):
            return (400, "empty request body", f"send the request as {expected}"), receive
        if expected.startswith("multipart"):
            boundary = re.search(r'boundary="?([^";]+)"?', content_type)
            if boundary is None or not body.lstrip(b"\r\n").startswith(b"--" + boundary.group(1).encode("latin-1")):
                return (400, "malformed multipart body (it does not start with the declared boundary)",
                        "let your HTTP client build the multipart body (curl -F file=@image.dcm, "
                        "requests' files=..., the BentoML client)"), receive
        return None, self._replaying(first, receive)

    def _replaying(self, first: dict[str, Any], receive: Any) -> Any:
        """A receive that returns ``first`` again, then counts bytes up to the limit."""
        state = {"replayed": False, "received": len(first.get("body", b"")), "overflow": False}

        async def wrapped() -> dict[str, Any]:
            if not state["replayed"]:
                state["replayed"] = True
                return first
            message = await receive()
            state["received"] += len(message.get("body", b""))
            if state["received"] > self.max_upload_bytes:
                state["overflow"] = True
                return {"type": "http.disconnect"}
            return message

        wrapped.state = state  # type: ignore[attr-defined]
        return wrapped

    async def _forward(self, scope: dict[str, Any], receive: Any, send: Any, request_id: str, endpoint: str) -> None:
        held: dict[str, Any] = {}
        chunks: list[bytes] = []
        overflow_state = getattr(receive, "state", None)

        async def wrapped_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if overflow_state is not None and overflow_state["overflow"]:
                    status = 413
                response_headers = MutableHeaders(raw=list(message.get("headers", [])))
                response_headers["x-request-id"] = request_id
                message = {**message, "status": status, "headers": response_headers.raw}
                if endpoint != "other" or status >= 400:
                    REQUESTS.labels(endpoint=endpoint, status=str(status)).inc()
                if status >= 400:
                    held["start"] = message
                    return
                await send(message)
                return
            if message["type"] == "http.response.body" and "start" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                start = held.pop("start")
                status = int(start["status"])
                content_type = MutableHeaders(raw=start["headers"]).get("content-type", "")
                if overflow_state is not None and overflow_state["overflow"]:
                    payload = error_body(413, f"request body too large: over serving.max_upload_bytes = "
                                              f"{self.max_upload_bytes} bytes",
                                         "send a smaller file or raise serving.max_upload_bytes")
                else:
                    status, payload = _normalised_error(status, b"".join(chunks), content_type)
                if status >= 500:
                    logger.warning("request_id=%s endpoint=%s status=%d", request_id, scope.get("path"), status)
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


# --------------------------------------------------------------------------------------------
# The web page and its GET routes (mounted at / beside the API)
# --------------------------------------------------------------------------------------------


def _sample_catalogue() -> dict[str, dict[str, Any]]:
    """The embedded samples (the ones the `sample` data source uses), by short id."""
    from medsr.data.sample_files import sample_file
    from medsr.data.sources.sample import SAMPLE_FILES

    catalogue: dict[str, dict[str, Any]] = {}
    for modality, files in SAMPLE_FILES.items():
        for sample in files:
            stem = Path(sample.relative).name.split(".")[0].lower().replace("_", "-")
            try:
                path = sample_file(sample.package, sample.relative)
            except FileNotFoundError:
                continue
            catalogue[f"{modality}-{stem}"] = {"id": f"{modality}-{stem}", "modality": modality, "path": path,
                                               "file_name": Path(sample.relative).name,
                                               "description": sample.description, "licence": sample.licence}
    return catalogue


SAMPLES = _sample_catalogue()


async def index_page(_: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


async def info_page(_: Request) -> Response:
    service = bentoml.get_current_service()
    return JSONResponse(service.describe())


async def samples_page(_: Request) -> Response:
    return JSONResponse({"samples": [{k: v for k, v in sample.items() if k != "path"} for sample in SAMPLES.values()]})


async def sample_file_page(request: Request) -> Response:
    sample = SAMPLES.get(request.path_params["sample_id"])
    if sample is None:
        return error_response(404, f"no sample {request.path_params['sample_id']!r}",
                              f"use one of: {', '.join(SAMPLES)} (GET /samples lists them)")
    return FileResponse(sample["path"], media_type="application/octet-stream", filename=sample["file_name"])


web_app = Starlette(routes=[
    Route("/", index_page),
    Route("/info", info_page),
    Route("/samples", samples_page),
    Route("/samples/{sample_id}", sample_file_page),
    Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
])

# --------------------------------------------------------------------------------------------
# Array endpoint I/O
# --------------------------------------------------------------------------------------------


def _max_array_pixels() -> int:
    return int(SERVING["max_output_pixels"])


class ArrayImage(BaseModel):
    """One image for /upscale_array: ``image`` (rows of floats) or ``data`` + ``shape``.

    Values in [0, 1] (the array contract: window your data first); ``data`` is base64 of
    little-endian float32, row-major, ``shape`` = [height, width].
    """

    image: list[list[float]] | None = None
    data: str | None = None
    shape: list[int] | None = None
    scale: int = 4

    _pixels: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _valid(self) -> ArrayImage:
        self._pixels = _decoded(self)
        return self

    def pixels(self) -> np.ndarray:
        """The decoded contract image (1, h, w)."""
        return self._pixels


def _unprocessable(message: str, fix: str) -> PydanticCustomError:
    return PydanticCustomError("medsr_unprocessable", "{message} Fix: {fix}", {"message": message, "fix": fix})


def _decoded(item: ArrayImage) -> np.ndarray:
    """The item as a contract image (1, h, w), or a validation error naming the problem."""
    if (item.image is None) == (item.data is None):
        raise _unprocessable("give exactly one of `image` (nested lists) and `data` (base64 float32)",
                             'send {"image": [[...], ...]} or {"data": "<base64>", "shape": [h, w]}')
    if item.scale not in AVAILABLE_SCALES:
        raise _unprocessable(f"scale {item.scale} is not available",
                             f"use scale {' or '.join(str(s) for s in sorted(AVAILABLE_SCALES)) or '4 (once a champion is registered)'}")
    if item.image is not None:
        widths = {len(row) for row in item.image}
        if not item.image or len(widths) != 1 or 0 in widths:
            raise _unprocessable("`image` must be a non-empty rectangle: every row the same length",
                                 "send a 2-D array as a list of equal-length rows")
        height, width = len(item.image), widths.pop()
    else:
        if not item.shape or len(item.shape) != 2 or min(item.shape) < 1:
            raise _unprocessable("`data` needs `shape` = [height, width] with positive sides",
                                 'add "shape": [height, width]')
        height, width = item.shape
    total = height * width * item.scale**2
    if total > _max_array_pixels():  # checked before decoding anything large
        raise PydanticCustomError(
            "medsr_too_large", "{message} Fix: {fix}",
            {"message": f"image too large: {height}x{width} at x{item.scale} gives {total} pixels, over "
                        f"serving.max_output_pixels = {_max_array_pixels()}",
             "fix": "send smaller images (or tiles), or use /upscale which tiles large files"})
    if item.image is not None:
        array = np.asarray(item.image, dtype=np.float32)
    else:
        try:
            raw = base64.b64decode(item.data or "", validate=True)
        except (binascii.Error, ValueError):
            raise _unprocessable("`data` is not valid base64", "base64-encode the float32 bytes") from None
        if len(raw) != height * width * 4:
            raise _unprocessable(f"`data` holds {len(raw)} bytes, shape {height}x{width} needs {height * width * 4}",
                                 "send little-endian float32 values, row-major, matching `shape`")
        array = np.frombuffer(raw, dtype="<f4").reshape(height, width).astype(np.float32)
    if not np.isfinite(array).all():
        raise _unprocessable("the image holds NaN or infinite values", "replace non-finite values before sending")
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise _unprocessable(f"values must lie in [0, 1], got {array.min():.4g}..{array.max():.4g}",
                             "window the image to [0, 1] first (the MedSR array contract)")
    return array[None]


class ArrayResult(BaseModel):
    """One upscaled image, encoded as its input was, with its consistency score."""

    image: list[list[float]] | None = None
    data: str | None = None
    shape: list[int]
    scale: int
    consistency_psnr: float = Field(description="PSNR (dB) of the re-degraded output against the input")
    consistency_warning: bool = Field(description="consistency below serving.consistency_warning_db")
    model: str
    model_version: str


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _png_data_url(image: np.ndarray, bits: int = 8) -> str:
    """A contract image as a grayscale PNG data URL (8-bit for display, 16-bit for download)."""
    from PIL import Image

    plane = image[0].astype(np.float64)
    if bits == 16:
        pil = Image.fromarray(np.rint(plane * 65535.0).astype(np.uint16))
    else:
        pil = Image.fromarray(np.rint(plane * 255.0).astype(np.uint8))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _scrubbed(err: BaseException, path: Path | None) -> str:
    """An exception's text without the upload's path or name (they can hold patient names)."""
    text = f"{type(err).__name__}: {err}"
    if path is not None:
        for part in {str(path), path.name, str(path.parent)}:
            text = text.replace(part, "<upload>")
    return text[:300]


# --------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------


@bentoml.asgi_app(web_app, path="/")
@bentoml.service(
    name="medsr",
    workers=1,
    threads=int(SERVING["threads"]),
    traffic={"timeout": 900},
    logging={"access": {"enabled": True, "request_content_length": True, "response_content_length": True}},
)
class MedSR:
    """Super-resolution of medical images with the registry's champion generators."""

    if 4 in PACKAGED_TAGS:
        packaged_x4 = bentoml.models.BentoModel(PACKAGED_TAGS[4])
    if 2 in PACKAGED_TAGS:
        packaged_x2 = bentoml.models.BentoModel(PACKAGED_TAGS[2])

    def __init__(self) -> None:
        import torch

        if int(SERVING.get("torch_threads") or 0) > 0:
            torch.set_num_threads(int(SERVING["torch_threads"]))
        self.device = pick_device(DEVICE_ARGUMENT)
        self.tiling = Tiling.from_params(SERVING)
        self.blur_sigma = float(DEGRADE["blur_sigma"])
        self.champions: dict[int, LoadedGenerator] = {}
        self.load_error: str | None = None
        self._versions: collections.OrderedDict[tuple[int, str], LoadedGenerator] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._last_attempt = 0.0
        self._load_champions()

    # -- models ------------------------------------------------------------------------------

    def _load_champions(self) -> None:
        """Load every scale's champion; x4 is required for readiness, x2 is optional."""
        self._last_attempt = time.monotonic()
        for scale in SERVICE_SCALES:
            if scale in self.champions:
                continue
            try:
                if MODEL_SOURCE == "bentoml":
                    if scale not in PACKAGED_TAGS:
                        continue
                    stored = getattr(self, f"packaged_x{scale}")
                    generator = load_bentoml_generator(stored.path, stored.info.metadata, scale, self.device)
                else:
                    generator = load_registered_generator(scale, None, self.device, alias=str(SERVING["alias"]))
            except ModelNotFoundError as err:
                if scale == SERVICE_SCALES[0]:
                    self.load_error = str(err)
                    logger.error("no x%d model: %s; register one (make run) and alias it %r", scale, err,
                                 SERVING["alias"])
                continue
            self.champions[scale] = generator
            AVAILABLE_SCALES.add(scale)
            logger.info("loaded %s version %s (%s, x%d) from %s on %s", generator.registered_name, generator.version,
                        generator.architecture, scale, generator.source, self.device)
        if SERVICE_SCALES[0] in self.champions:
            self.load_error = None

    def __is_ready__(self) -> bool:
        if SERVICE_SCALES[0] not in self.champions and time.monotonic() - self._last_attempt > 5.0:
            with self._lock:
                self._load_champions()  # the champion may have been registered since start-up
        return SERVICE_SCALES[0] in self.champions

    def generator(self, scale: int, version: int | str | None) -> LoadedGenerator:
        """The champion of ``scale``, or registry version ``version`` of it (loaded and cached).

        Raises:
            InputError: no model for that scale or version (422), or none loaded yet (503 via kind).
        """
        if not self.champions:
            raise ServiceNotReady(self.load_error or "the champion model is not loaded yet")
        if scale not in self.champions:
            offered = " and ".join(f"x{s}" for s in sorted(self.champions, reverse=True))
            raise InputError("unprocessable", f"scale {scale} is not available: this service has {offered}",
                             f"use scale {' or '.join(str(s) for s in sorted(self.champions, reverse=True))}"
                             + (", or register a medsr-x2 champion" if scale == 2 else ""))
        champion = self.champions[scale]
        version = None if version is None else str(version).strip()
        if version is None or version in ("", champion.version, str(SERVING["alias"])):
            return champion
        if not version.isdigit():
            raise InputError("unprocessable", f"model_version {version!r} is not a registry version number",
                             f"pass a version number such as {champion.version}, or leave model_version out")
        if MODEL_SOURCE == "bentoml":
            raise InputError("unprocessable", f"model_version {version} is not in this Bento (it carries "
                             f"{champion.registered_name} version {champion.version})",
                             "leave model_version out, or serve from the MLflow registry to pick versions")
        key = (scale, version)
        with self._lock:
            if key in self._versions:
                self._versions.move_to_end(key)
                return self._versions[key]
            try:
                loaded = load_registered_generator(scale, version, self.device)
            except ModelNotFoundError as err:
                raise InputError("unprocessable", f"model_version {version} not found: {err}",
                                 f"leave model_version out for the champion (version {champion.version})") from None
            self._versions[key] = loaded
            while len(self._versions) > int(SERVING["max_cached_versions"]):
                self._versions.popitem(last=False)
            return loaded

    def describe(self) -> dict[str, Any]:
        """What GET /info reports."""
        return {
            "service": "medsr",
            "ready": SERVICE_SCALES[0] in self.champions,
            "load_error": self.load_error,
            "device": str(self.device),
            "torch_threads": _torch_threads(),
            "model_source": MODEL_SOURCE,
            "models": {str(scale): generator.describe() for scale, generator in sorted(self.champions.items())},
            "scales": sorted(self.champions, reverse=True),
            "limits": {"max_output_pixels": int(SERVING["max_output_pixels"]),
                       "max_upload_bytes": int(SERVING["max_upload_bytes"]),
                       "demo_max_side": int(SERVING["demo_max_side"])},
            "tiling": {"tile": self.tiling.tile, "overlap": self.tiling.overlap},
            "batching": BATCHING,
            "consistency": {"blur_sigma": self.blur_sigma, "warning_db": float(SERVING["consistency_warning_db"])},
            "degradation": {"blur_sigma": self.blur_sigma, "noise": DEGRADE["noise"]},
            "samples": [{k: v for k, v in sample.items() if k != "path"} for sample in SAMPLES.values()],
        }

    def _warning(self, score: float) -> bool:
        return bool(score < float(SERVING["consistency_warning_db"]))

    # -- POST /upscale -----------------------------------------------------------------------

    @bentoml.api(route="/upscale")
    def upscale(
        self,
        file: Annotated[Path, bentoml.validators.ContentType("*/*")],
        scale: int = 4,
        model_version: int | None = None,
        frame: int | None = None,
        modality: str | None = None,
    ) -> Annotated[Path, bentoml.validators.ContentType("application/octet-stream")]:
        """Upscale a DICOM, NIfTI, PNG, TIFF or JPEG file; the same format comes back.

        DICOM: a derived instance (new UIDs, Rows/Columns, PixelSpacing, ImageType DERIVED,
        DerivationDescription), values in the original units and dtype. NIfTI: every slice,
        affine and zooms updated. Headers: ``X-MedSR-Consistency-PSNR`` (dB) and
        ``X-MedSR-Consistency-Warning``, ``X-MedSR-Model``, ``X-MedSR-Model-Version``.
        ``frame`` picks one frame of a multi-frame DICOM/TIFF.
        """
        request_id = REQUEST_ID.get()
        try:
            generator = self.generator(int(scale), model_version)
            result = upscale_file(file, generator, max_output_pixels=int(SERVING["max_output_pixels"]),
                                  tiling=self.tiling, device=self.device, blur_sigma=self.blur_sigma,
                                  modality=modality, frame=frame, name_hint=file.suffix)
        except InputError as err:
            logger.info("request_id=%s endpoint=/upscale rejected status=%d: %s", request_id, err.status, err.error)
            return error_response(err.status, err.error, err.fix)
        except ServiceNotReady as err:
            return error_response(503, f"not ready: {err}")
        except Exception as err:  # noqa: BLE001 - one bad request must not take the service down
            logger.error("request_id=%s endpoint=/upscale failed: %s", request_id, _scrubbed(err, file))
            return error_response(500, "internal error while upscaling")
        finally:
            file.unlink(missing_ok=True)
        warning = self._warning(result.consistency_psnr)
        INFERENCE_SECONDS.labels(endpoint="/upscale").observe(result.seconds)
        CONSISTENCY.labels(endpoint="/upscale").observe(result.consistency_psnr)
        OUTPUT_MEGAPIXELS.labels(endpoint="/upscale").observe(result.output_size[0] * result.output_size[1] * result.frames / 1e6)
        logger.info("request_id=%s endpoint=/upscale format=%s modality=%s frames=%d in=%dx%d out=%dx%d scale=%d "
                    "model=%s@%s consistency=%.2fdB seconds=%.2f", request_id, result.file_format, result.modality,
                    result.frames, *result.input_size, *result.output_size, generator.scale,
                    generator.registered_name, generator.version, result.consistency_psnr, result.seconds)
        headers = {
            "Content-Disposition": f'attachment; filename="{result.filename}"',
            "X-MedSR-Consistency-PSNR": f"{result.consistency_psnr:.3f}",
            "X-MedSR-Consistency-Min-PSNR": f"{result.consistency_min_psnr:.3f}",
            "X-MedSR-Consistency-Warning": "true" if warning else "false",
            "X-MedSR-Model": f"{generator.registered_name}/{generator.architecture}",
            "X-MedSR-Model-Version": generator.version,
            "X-MedSR-Scale": str(generator.scale),
            "X-MedSR-Format": result.file_format,
            "X-MedSR-Modality": result.modality,
            "X-MedSR-Frames": str(result.frames),
            "X-MedSR-Input-Size": "x".join(map(str, result.input_size)),
            "X-MedSR-Output-Size": "x".join(map(str, result.output_size)),
            "Access-Control-Expose-Headers": "X-MedSR-Consistency-PSNR, X-MedSR-Consistency-Warning, X-Request-ID",
        }
        return Response(result.content, media_type=result.media_type, headers=headers)  # type: ignore[return-value]

    # -- POST /upscale_array -----------------------------------------------------------------

    @bentoml.api(route="/upscale_array", batchable=bool(BATCHING["enabled"]), batch_dim=0,
                 max_batch_size=int(BATCHING["max_batch_size"]), max_latency_ms=int(BATCHING["max_latency_ms"]))
    def upscale_array(self, images: list[ArrayImage]) -> list[ArrayResult]:
        """Upscale arrays in [0, 1] (adaptive batching merges concurrent requests).

        Body: ``{"images": [{"image": [[...]], "scale": 4}, {"data": "<base64 float32>",
        "shape": [h, w], "scale": 4}]}``. Each result comes back encoded as its input was, with
        ``consistency_psnr``. Images of the same size and scale run through the network together.
        """
        started = time.perf_counter()
        outputs: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple[int, int, int], list[int]] = collections.defaultdict(list)
        for index, item in enumerate(images):
            _, height, width = item.pixels().shape
            groups[(item.scale, height, width)].append(index)
        for (scale, height, width), members in groups.items():
            generator = self.generator(scale, None)
            if max(height, width) <= self.tiling.tile:
                step = int(BATCHING["max_batch_size"])
                for start in range(0, len(members), step):
                    chunk = members[start:start + step]
                    batch = np.stack([images[i].pixels() for i in chunk])
                    for i, result in zip(chunk, forward(generator.module, batch, self.device), strict=True):
                        outputs[i] = result
            else:
                for i in members:
                    outputs[i] = upscale_image(generator.module, images[i].pixels(), scale, tiling=self.tiling,
                                               device=self.device)
        results = []
        for item, output in zip(images, outputs, strict=True):
            assert output is not None
            generator = self.champions[item.scale]
            score = consistency_psnr(output, item.pixels(), item.scale, self.blur_sigma)
            CONSISTENCY.labels(endpoint="/upscale_array").observe(score)
            encoded: dict[str, Any]
            if item.data is not None:
                encoded = {"data": base64.b64encode(output[0].astype("<f4").tobytes()).decode("ascii")}
            else:
                encoded = {"image": output[0].tolist()}
            results.append(ArrayResult(**encoded, shape=list(output.shape[1:]), scale=item.scale,
                                       consistency_psnr=score, consistency_warning=self._warning(score),
                                       model=f"{generator.registered_name}/{generator.architecture}",
                                       model_version=generator.version))
        seconds = time.perf_counter() - started
        INFERENCE_SECONDS.labels(endpoint="/upscale_array").observe(seconds)
        logger.info("endpoint=/upscale_array images=%d groups=%d seconds=%.3f", len(images), len(groups), seconds)
        return results

    # -- POST /demo --------------------------------------------------------------------------

    @bentoml.api(route="/demo")
    def demo(
        self,
        file: Annotated[Path, bentoml.validators.ContentType("*/*")],
        scale: int = 4,
        noise: float = 0.01,
        blur: float = 0.6,
        known_original: bool = True,
        frame: int | None = None,
        modality: str | None = None,
        model_version: int | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """The web page's comparison: LR | bicubic | model (and the original when known).

        ``known_original=true``: the upload is the high-resolution original; the model's input
        is made from it (blur ``blur`` px, bicubic down by ``scale``, the modality's noise at
        level ``noise``), so PSNR/SSIM against it are reported. ``false``: the upload itself,
        with the sliders' blur and noise, is the input. A central crop of at most
        ``serving.demo_max_side`` pixels keeps the page fast. Images come as PNG data URLs.
        """
        request_id = REQUEST_ID.get()
        started = time.perf_counter()
        try:
            if not (0.0 <= noise <= 0.5 and math.isfinite(noise)) or not (0.0 <= blur <= 10.0 and math.isfinite(blur)):
                raise InputError("unprocessable", f"noise {noise} or blur {blur} out of range",
                                 "use noise in [0, 0.5] and blur in [0, 10] pixels")
            generator = self.generator(int(scale), model_version)
            file_format, images, chosen_modality = read_upload(
                file, scale=1, max_output_pixels=int(SERVING["max_output_pixels"]), modality=modality,
                name_hint=file.suffix)
            index = len(images) // 2 if frame is None else frame
            if not 0 <= index < len(images):
                raise InputError("unprocessable", f"frame {index} out of range: the file holds {len(images)}",
                                 f"pass frame between 0 and {len(images) - 1}")
            noise_kind = str(DEGRADE["noise"].get(chosen_modality, {}).get("kind", "gaussian"))
            comparison = compare(images[index].pixels, generator, noise_kind=noise_kind, noise_level=float(noise),
                                 blur_sigma=float(blur), consistency_blur_sigma=self.blur_sigma,
                                 known_original=bool(known_original), max_side=int(SERVING["demo_max_side"]),
                                 tiling=self.tiling, device=self.device, seed=int(seed))
        except InputError as err:
            logger.info("request_id=%s endpoint=/demo rejected status=%d: %s", request_id, err.status, err.error)
            return error_response(err.status, err.error, err.fix)  # type: ignore[return-value]
        except ServiceNotReady as err:
            return error_response(503, f"not ready: {err}")  # type: ignore[return-value]
        except Exception as err:  # noqa: BLE001
            logger.error("request_id=%s endpoint=/demo failed: %s", request_id, _scrubbed(err, file))
            return error_response(500, "internal error while building the comparison")  # type: ignore[return-value]
        finally:
            file.unlink(missing_ok=True)
        seconds = time.perf_counter() - started
        INFERENCE_SECONDS.labels(endpoint="/demo").observe(seconds)
        CONSISTENCY.labels(endpoint="/demo").observe(comparison.consistency_psnr)
        logger.info("request_id=%s endpoint=/demo format=%s modality=%s lr=%dx%d scale=%d consistency=%.2fdB "
                    "seconds=%.2f", request_id, file_format, chosen_modality, *comparison.lr.shape[1:], generator.scale,
                    comparison.consistency_psnr, seconds)
        return {
            "request_id": request_id,
            "model": generator.describe(),
            "format": file_format,
            "modality": chosen_modality,
            "frames": len(images),
            "frame": index,
            "scale": generator.scale,
            "known_original": bool(known_original),
            "noise": {"kind": noise_kind, "level": float(noise)},
            "blur_sigma": float(blur),
            "cropped": comparison.cropped,
            "sizes": {"lr": list(comparison.lr.shape[1:]), "output": list(comparison.sr.shape[1:])},
            "images": {"lr": _png_data_url(comparison.lr), "bicubic": _png_data_url(comparison.bicubic),
                       "model": _png_data_url(comparison.sr),
                       "original": None if comparison.hr is None else _png_data_url(comparison.hr)},
            "scores": comparison.scores,
            "consistency_psnr": comparison.consistency_psnr,
            "consistency_warning": self._warning(comparison.consistency_psnr),
            "download": {"filename": f"medsr_x{generator.scale}.png", "png16": _png_data_url(comparison.sr, bits=16)},
            "seconds": seconds,
        }


MedSR.add_asgi_middleware(GatewayMiddleware, max_upload_bytes=int(SERVING["max_upload_bytes"]))
logger.debug("serving params: %s; largest output %s", {k: v for k, v in SERVING.items() if k != "batching"},
             describe_size(int(SERVING["max_output_pixels"])))
