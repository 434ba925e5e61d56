"""Prometheus metrics of the MedSR service (served on /metrics beside BentoML's own)."""

from __future__ import annotations

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
