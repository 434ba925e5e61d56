"""Prometheus metrics of the MedSR service (served on /metrics beside BentoML's own)."""

from __future__ import annotations

from typing import Any

import bentoml

from medsr.inference import PhaseTimer

PHASES: tuple[str, ...] = ("read", "decode", "window", "forward", "refine", "consistency", "encode", "write")
"""Every phase a request's time is split into, in pipeline order (see :mod:`serving.uploads`)."""

REQUESTS = bentoml.metrics.Counter(
    name="medsr_requests_total", documentation="MedSR requests by endpoint and HTTP status (as sent)",
    labelnames=["endpoint", "status"])
INFERENCE_SECONDS = bentoml.metrics.Histogram(
    name="medsr_inference_seconds", documentation="Seconds from decoded input to encoded output",
    labelnames=["endpoint"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160))
PHASE_SECONDS = bentoml.metrics.Histogram(
    name="medsr_phase_seconds", documentation="Seconds per request phase (read, decode, window, forward, refine, "
    "consistency, encode, write)", labelnames=["endpoint", "phase"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
CONSISTENCY = bentoml.metrics.Histogram(
    name="medsr_consistency_psnr_db", documentation="Consistency PSNR (dB) of results against their inputs",
    labelnames=["endpoint"], buckets=(15, 20, 25, 30, 35, 40, 45, 50, 60, 80, 100))
OUTPUT_MEGAPIXELS = bentoml.metrics.Histogram(
    name="medsr_output_megapixels", documentation="Megapixels per upscaled result",
    labelnames=["endpoint"], buckets=(0.01, 0.1, 0.5, 1, 4, 16, 32, 64, 128))


def observe_phases(endpoint: str, timer: PhaseTimer) -> None:
    for phase, seconds in timer.seconds.items():
        PHASE_SECONDS.labels(endpoint=endpoint, phase=phase).observe(seconds)


def server_timing(timer: PhaseTimer) -> str:
    """The ``Server-Timing`` header value: one ``phase;dur=ms`` entry per phase that ran, and
    ``total``, the wall-clock time in the worker (less than the sum where phases overlapped)."""
    entries = [f"{phase};dur={seconds * 1000.0:.2f}" for phase, seconds in timer.seconds.items()]
    return ", ".join([*entries, f"total;dur={timer.elapsed() * 1000.0:.2f}"])


# Paths that are labels on BentoML's own request metrics as they are; any other path is one label
# (a client's URL is its text: every random path was a new series, and /patient/Doe%5EJohn a
# patient's name in /metrics).
METRIC_PATHS = frozenset({"/", "/upscale", "/upscale_array", "/demo", "/info", "/samples", "/livez", "/readyz",
                          "/healthz", "/metrics", "/docs", "/docs.json", "/schema.json"})
METRIC_PREFIXES: tuple[tuple[str, str], ...] = (("/samples/", "/samples/{sample_id}"), ("/static/", "/static/{path}"))
OTHER_PATH = "/{other}"
_REAL_PATH = "medsr.real_path"


def path_label(path: str) -> str:
    """The ``endpoint`` label of a request path: a route, a route template, or ``/{other}``."""
    if path in METRIC_PATHS:
        return path
    for prefix, label in METRIC_PREFIXES:
        if path.startswith(prefix):
            return label
    return OTHER_PATH


def restore_path(scope: dict[str, Any]) -> dict[str, Any]:
    """The scope with the request's real path back (see :func:`bound_path_labels`)."""
    return {**scope, "path": scope[_REAL_PATH]} if _REAL_PATH in scope else scope


def bound_path_labels() -> None:
    """Make BentoML's traffic metrics and access log see requests by :func:`path_label`.

    Its metrics middleware reads ``scope["path"]`` for the label before calling the app, and the
    service's own middlewares run inside it (inside the access log too, which would log a URL's
    text: /patient/Doe%5EJohn). So the metrics middleware class is replaced, before the app is
    built (it is looked up by name then), by one that puts the label in ``scope["path"]``; the
    gateway middleware gives the app the real path back (:func:`restore_path`).
    """
    from bentoml._internal.server.http import instruments

    base = instruments.RunnerTrafficMetricsMiddleware
    if getattr(base, "medsr_bounded", False):
        return

    class BoundedPathMetrics(base):  # type: ignore[misc, valid-type]
        medsr_bounded = True

        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope.get("type") == "http" and path_label(scope.get("path", "")) != scope.get("path"):
                scope = {**scope, _REAL_PATH: scope["path"], "path": path_label(scope["path"])}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = BoundedPathMetrics
