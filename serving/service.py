"""MedSR as a BentoML service: upscale files and arrays with the registry's champions.

Start: ``bentoml serve serving.service:MedSR --host 127.0.0.1 --port 3000 --arg device=auto``
(``make serve``). Endpoints (``README.md`` has a ``curl`` call for each, ``docs/serving.md`` the contract):

* ``POST /upscale`` (multipart: ``file``, ``scale``, optional ``model_version``, ``frame``,
  ``modality``): the same format back (DICOM, NIfTI, PNG, TIFF, JPEG), consistency score in the
  ``X-MedSR-Consistency-PSNR`` header, time per phase in ``Server-Timing``;
* ``POST /upscale_array`` (JSON ``{"images": [...]}``, adaptive batching): arrays in [0, 1] as
  nested lists or base64 float32, results the same way with their consistency scores;
* ``POST /demo`` (multipart): what the web page shows (:mod:`serving.web`);
* ``GET /`` the web page, ``GET /info``, ``GET /samples``, ``GET /samples/{id}``;
* ``GET /livez``, ``GET /readyz`` (ready once the largest scale's champion is loaded), ``GET /metrics``.

Errors, the gateway middleware and metrics: :mod:`serving.errors`, :mod:`serving.metrics`.
Logs hold request ids, sizes and timings, never file names or DICOM patient attributes.

The models come from the MLflow registry (``registry.model_names`` at ``serving.alias``) or,
inside a Bento that ``medsr package`` built, from the BentoML models it imported from the
registry (bento argument ``model_source=bentoml``).
"""

from __future__ import annotations

import base64
import collections
import gc
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from starlette.responses import Response

from medsr.dicom_log import scrub_pydicom_warnings
from medsr.consistency import ConsistencySettings
from medsr.inference import (
    PhaseTimer,
    Tiling,
    UnboundedReceptiveField,
    Upscaler,
    choose_memory_format,
    describe_size,
    forward,
    pick_device,
    receptive_radius,
)
from medsr.tracking import LoadedGenerator, ModelNotFoundError, load_registered_generator
from serving import load_config
from serving.admission import Admission
from serving.errors import (
    REQUEST_ID,
    ClientErrorLogFilter,
    GatewayMiddleware,
    ServiceNotReady,
    error_response,
    input_error_response,
    scrubbed,
)
from serving.jsonlimits import JSONLimits
from serving.metrics import (
    CONSISTENCY,
    INFERENCE_SECONDS,
    OUTPUT_MEGAPIXELS,
    bound_path_labels,
    observe_phases,
    server_timing,
)
from serving.packaging import load_bentoml_generator
from serving.protocol_errors import json_bad_request
from serving.schemas import AVAILABLE_SCALES, LIMITS, ArrayImage, ArrayResult
from serving.shutdown import bound_shutdown
from serving.threads import ThreadBudget
from serving.uploads import InputError, read_upload, upscale_file
from serving.web import png_data_url, public_samples, side_by_side, web_app

# A child of BentoML's logger: its handlers and format carry our lines into the server log.
logger = logging.getLogger("bentoml.medsr")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorLogFilter())
bound_path_labels()
scrub_pydicom_warnings()
json_bad_request()

CONFIG = load_config()
SERVING = CONFIG.serving
BATCHING: dict[str, Any] = SERVING["batching"]
SERVICE_SCALES: tuple[int, ...] = CONFIG.scales  # the first (largest) is required for readiness
LIMITS["max_array_output_pixels"] = int(SERVING["max_array_output_pixels"])

# Bento arguments: `--arg device=cpu` at serve time; `medsr package` stores model_source and
# the BentoML model tags in the Bento, so a built Bento loads what it carries.
ARGUMENTS = bentoml.use_arguments()
DEVICE_ARGUMENT = str(getattr(ARGUMENTS, "device", None) or SERVING["device"])
MODEL_SOURCE = str(getattr(ARGUMENTS, "model_source", None) or "mlflow")
PACKAGED_TAGS: dict[int, str] = {
    int(scale): tag for scale, tag in json.loads(str(getattr(ARGUMENTS, "bento_models", None) or "{}")).items()
}
EXPOSED_HEADERS = ("X-MedSR-Consistency-PSNR, X-MedSR-Consistency-Warning, X-MedSR-Converted, X-Request-ID, "
                   "Server-Timing")


def _consistency() -> ConsistencySettings:
    """The consistency step every endpoint applies after the network: ``params.yaml: consistency``
    when ``serving.refine`` is on, else none (``steps`` 0)."""
    return ConsistencySettings.from_params(CONFIG.consistency) if SERVING["refine"] else ConsistencySettings()


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

    if SERVICE_SCALES and SERVICE_SCALES[0] in PACKAGED_TAGS:
        packaged_first = bentoml.models.BentoModel(PACKAGED_TAGS[SERVICE_SCALES[0]])
    if len(SERVICE_SCALES) > 1 and SERVICE_SCALES[1] in PACKAGED_TAGS:
        packaged_second = bentoml.models.BentoModel(PACKAGED_TAGS[SERVICE_SCALES[1]])

    def __init__(self) -> None:
        import torch

        self.threads = ThreadBudget(int(SERVING["torch_threads"]))
        torch.set_num_threads(self.threads.share())
        self.device = pick_device(DEVICE_ARGUMENT)
        self.tiling = Tiling.from_params(SERVING)
        # The score re-degrades with the consistency step's own forward model, so the step and the score
        # agree on what "consistent with the input" means (the realistic track's blur is only the demo's default).
        # Two blurs, two meanings: the consistency step's forward model (what the served score
        # re-degrades with), and the training degradation's blur (reported by /info, used by nothing else).
        self.score_blur_sigma = ConsistencySettings.from_params(CONFIG.consistency).blur_sigma
        self.training_blur_sigma = float(CONFIG.degrade["blur_sigma"])
        self.consistency = _consistency()
        self.champions: dict[int, LoadedGenerator] = {}
        self.load_error: str | None = None
        self._versions: collections.OrderedDict[tuple[int, str], LoadedGenerator] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._last_attempt = 0.0
        self._load_champions()
        # Here, not at import: uvicorn installs its own handlers just before it builds the service.
        bound_shutdown(float(SERVING["shutdown_grace_s"]))

    # -- models ------------------------------------------------------------------------------

    def _packaged(self, scale: int) -> Any:
        return self.packaged_first if scale == SERVICE_SCALES[0] else self.packaged_second

    def _load_champions(self) -> None:
        """Load every scale's champion; the largest scale is required for readiness."""
        self._last_attempt = time.monotonic()
        alias = str(SERVING["alias"])
        for scale in SERVICE_SCALES:
            if scale in self.champions:
                continue
            try:
                if MODEL_SOURCE == "bentoml":
                    if scale not in PACKAGED_TAGS:
                        continue
                    stored = self._packaged(scale)
                    generator = load_bentoml_generator(stored.path, stored.info.metadata, scale, self.device)
                else:
                    generator = load_registered_generator(CONFIG.model_names[scale], scale, None, alias, self.device)
            except ModelNotFoundError as err:
                if scale == SERVICE_SCALES[0]:
                    self.load_error = str(err)
                    logger.error("no x%d model: %s; register one (make run) and alias it %r", scale, err, alias)
                continue
            self._prepare(generator)
            self.champions[scale] = generator
            AVAILABLE_SCALES.add(scale)
            logger.info("loaded %s version %s (%s, x%d) from %s on %s", generator.registered_name, generator.version,
                        generator.architecture, scale, generator.source, self.device)
        if SERVICE_SCALES[0] in self.champions:
            self.load_error = None
        # What is loaded now (torch, MLflow, the models) lives as long as the worker: out of the
        # collector's sight, a full collection no longer walks it, which stalled a request for
        # ~200 ms now and then (Instagram's gc.freeze pattern).
        gc.collect()
        gc.freeze()

    def _prepare(self, generator: LoadedGenerator) -> None:
        """Measure the receptive radius once (tiles need it), pick the faster weight layout, warm up."""
        try:
            radius = receptive_radius(generator.module)
        except UnboundedReceptiveField as err:
            logger.warning("%s: %s; large images run whole", generator.registered_name, err)
            radius = -1
        layout = choose_memory_format(generator.module, device=self.device)
        generator.spec = {**generator.spec, "receptive_radius": radius, "memory_format": layout}
        self.threads.follow_layers(generator.module)
        forward(generator.module, np.full((1, 1, 32, 32), 0.5, np.float32), self.device)

    def __is_ready__(self) -> bool:
        if SERVICE_SCALES[0] not in self.champions and time.monotonic() - self._last_attempt > 5.0:
            with self._lock:
                self._load_champions()  # the champion may have been registered since start-up
        return SERVICE_SCALES[0] in self.champions

    def generator(self, scale: int, version: int | str | None) -> LoadedGenerator:
        """The champion of ``scale``, or registry version ``version`` of it (loaded and cached).

        Raises:
            ServiceNotReady: nothing is loaded yet.
            InputError: no model for that scale or version.
        """
        if not self.champions:
            raise ServiceNotReady(self.load_error or "the champion model is not loaded yet")
        if scale not in self.champions:
            offered = sorted(self.champions, reverse=True)
            missing = (f", or register a {CONFIG.model_names[scale]} {SERVING['alias']}" if scale in CONFIG.model_names
                       else "")
            raise InputError("unprocessable", f"scale {scale} is not available: this service has "
                             + " and ".join(f"x{s}" for s in offered),
                             f"use scale {' or '.join(str(s) for s in offered)}{missing}")
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
                loaded = load_registered_generator(CONFIG.model_names[scale], scale, version, str(SERVING["alias"]),
                                                   self.device)
            except ModelNotFoundError as err:
                raise InputError("unprocessable", f"model_version {version} not found: {err}",
                                 f"leave model_version out for the champion (version {champion.version})") from None
            self._prepare(loaded)
            self._versions[key] = loaded
            while len(self._versions) > int(SERVING["max_cached_versions"]):
                self._versions.popitem(last=False)
            return loaded

    def tiling_for(self, generator: LoadedGenerator) -> Tiling:
        """The configured tiling, whole-image for a model without a finite receptive field."""
        if generator.spec.get("receptive_radius", 0) < 0:
            return Tiling(tile=1 << 30, batch_size=1, margin=0)
        return self.tiling

    def upscaler(self, generator: LoadedGenerator) -> Upscaler:
        """The one way every endpoint turns ``generator``'s input into its output and score."""
        return Upscaler(generator.module, generator.scale, consistency=self.consistency,
                        tiling=self.tiling_for(generator), device=self.device, score_blur_sigma=self.score_blur_sigma)

    def describe(self) -> dict[str, Any]:
        """What GET /info reports."""
        import torch

        return {
            "service": "medsr",
            "ready": SERVICE_SCALES[0] in self.champions,
            "load_error": self.load_error,
            "device": str(self.device),
            "threads": int(SERVING["threads"]),
            "torch_threads": int(torch.get_num_threads()),
            "model_source": MODEL_SOURCE,
            "models": {str(scale): {**generator.describe(), "receptive_radius": generator.spec.get("receptive_radius"),
                                    "memory_format": generator.spec.get("memory_format")}
                       for scale, generator in sorted(self.champions.items())},
            "scales": sorted(self.champions, reverse=True),
            "limits": {"max_output_pixels": int(SERVING["max_output_pixels"]),
                       "max_upload_bytes": int(SERVING["max_upload_bytes"]),
                       "max_array_output_pixels": int(SERVING["max_array_output_pixels"]),
                       "max_in_flight": int(SERVING["max_in_flight"]),
                       "max_wait_s": float(SERVING["max_wait_s"]),
                       "read_timeout_s": float(SERVING["read_timeout_s"]),
                       "compute_timeout_s": float(SERVING["compute_timeout_s"]),
                       "demo_max_side": int(SERVING["demo_max_side"])},
            "tiling": {"tile": self.tiling.tile, "batch_size": self.tiling.batch_size,
                       "margin": "each model's receptive_radius"},
            "refine": self.consistency.enabled,
            "batching": BATCHING,
            "consistency": {"blur_sigma": self.score_blur_sigma, "warning_db": float(SERVING["consistency_warning_db"])},
            "degradation": {"blur_sigma": self.training_blur_sigma, "noise": CONFIG.degrade.get("noise")},
            "samples": public_samples(),
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

        DICOM: a derived instance (new UIDs, Rows/Columns, PixelSpacing, ImagePositionPatient,
        ImageType DERIVED, DerivationDescription), values in the original units and dtype.
        NIfTI: every slice, affine and zooms updated. Headers: ``X-MedSR-Consistency-PSNR`` (dB)
        and ``X-MedSR-Consistency-Warning``, ``X-MedSR-Model``, ``X-MedSR-Model-Version``,
        ``Server-Timing`` (ms per phase). ``frame`` picks one frame of a multi-frame DICOM/TIFF.
        """
        request_id = REQUEST_ID.get()
        timer = PhaseTimer()
        try:
            generator = self.generator(int(scale), model_version)
            with self.threads.computing():
                result = upscale_file(file, generator, self.upscaler(generator),
                                      max_output_pixels=int(SERVING["max_output_pixels"]), modality=modality,
                                      frame=frame, name_hint=file.suffix, png_level=int(SERVING["png_level"]),
                                      timer=timer, before_compute=self.threads.apply)
        except InputError as err:
            logger.info("request_id=%s endpoint=/upscale rejected status=%d: %s", request_id,
                        input_error_response(err).status_code, err.error)
            return input_error_response(err)  # type: ignore[return-value]
        except ServiceNotReady as err:
            return error_response(503, f"not ready: {err}")  # type: ignore[return-value]
        except Exception as err:  # noqa: BLE001 - one bad request must not take the service down
            logger.error("request_id=%s endpoint=/upscale failed: %s", request_id,
                         scrubbed(err, [str(file), file.name, str(file.parent)]))
            return error_response(500, "internal error while upscaling")  # type: ignore[return-value]
        finally:
            file.unlink(missing_ok=True)
        warning = self._warning(result.consistency_psnr)
        observe_phases("/upscale", timer)
        INFERENCE_SECONDS.labels(endpoint="/upscale").observe(timer.elapsed())
        CONSISTENCY.labels(endpoint="/upscale").observe(result.consistency_psnr)
        OUTPUT_MEGAPIXELS.labels(endpoint="/upscale").observe(result.output_size[0] * result.output_size[1] * result.frames / 1e6)
        logger.info("request_id=%s endpoint=/upscale format=%s modality=%s frames=%d in=%dx%d out=%dx%d scale=%d "
                    "model=%s@%s consistency=%.2fdB seconds=%.3f", request_id, result.file_format, result.modality,
                    result.frames, *result.input_size, *result.output_size, generator.scale,
                    generator.registered_name, generator.version, result.consistency_psnr, timer.elapsed())
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
            "Server-Timing": server_timing(timer),
            "Access-Control-Expose-Headers": EXPOSED_HEADERS,
        }
        if result.converted:  # the output has one channel where the input had colour or alpha
            headers["X-MedSR-Converted"] = result.converted
        return Response(result.content, media_type=result.media_type, headers=headers)  # type: ignore[return-value]

    # -- POST /upscale_array -----------------------------------------------------------------

    @bentoml.api(route="/upscale_array", batchable=bool(BATCHING["enabled"]), batch_dim=0,
                 max_batch_size=int(BATCHING["max_batch_size"]), max_latency_ms=int(BATCHING["max_latency_ms"]))
    def upscale_array(self, images: list[ArrayImage]) -> list[ArrayResult]:
        """Upscale arrays in [0, 1] (adaptive batching merges concurrent requests).

        Body: ``{"images": [{"image": [[...]], "scale": 4}, {"data": "<base64 float32>",
        "shape": [h, w], "scale": 4}]}``. Each result comes back encoded as its input was, with
        ``consistency_psnr``. Images of the same size and scale run through the network together.
        At most ``serving.max_array_output_pixels`` output pixels per request (the gateway refuses
        more with 413 before any work).
        """
        with self.threads.computing():
            return self._upscale_arrays(images)

    def _upscale_arrays(self, images: list[ArrayImage]) -> list[ArrayResult]:
        timer = PhaseTimer()
        outputs: list[np.ndarray | None] = [None] * len(images)
        by_scale: dict[int, list[int]] = collections.defaultdict(list)
        for index, item in enumerate(images):
            by_scale[item.scale].append(index)
        upscalers = {scale: self.upscaler(self.generator(scale, None)) for scale in by_scale}
        for scale, members in by_scale.items():
            upscaler = upscalers[scale]
            lrs = [images[i].pixels() for i in members]
            raws = upscaler.network_batch(lrs, timer, max_batch=int(BATCHING["max_batch_size"]))
            for i, lr, raw in zip(members, lrs, raws, strict=True):
                outputs[i] = upscaler.refine(raw, lr, timer)
        groups = {(item.scale, *item.pixels().shape[1:]) for item in images}
        results = []
        for item, output in zip(images, outputs, strict=True):
            assert output is not None
            generator = self.champions[item.scale]
            score = upscalers[item.scale].score(output, item.pixels(), timer)
            CONSISTENCY.labels(endpoint="/upscale_array").observe(score)
            with timer.phase("encode"):
                encoded: dict[str, Any]
                if item.data is not None:
                    encoded = {"data": base64.b64encode(output[0].astype("<f4").tobytes()).decode("ascii")}
                else:
                    encoded = {"image": output[0].tolist()}
            results.append(ArrayResult(**encoded, shape=list(output.shape[1:]), scale=item.scale,
                                       consistency_psnr=score, consistency_warning=self._warning(score),
                                       model=f"{generator.registered_name}/{generator.architecture}",
                                       model_version=generator.version))
        observe_phases("/upscale_array", timer)
        INFERENCE_SECONDS.labels(endpoint="/upscale_array").observe(timer.elapsed())
        logger.info("endpoint=/upscale_array images=%d groups=%d seconds=%.3f", len(images), len(groups), timer.elapsed())
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
            noise_kind = str((CONFIG.degrade.get("noise") or {}).get(chosen_modality, {}).get("kind", "gaussian"))
            with self.threads.computing():
                view = side_by_side(images[index].pixels, self.upscaler(generator), noise_kind=noise_kind,
                                    noise_level=float(noise), blur_sigma=float(blur),
                                    known_original=bool(known_original), max_side=int(SERVING["demo_max_side"]),
                                    seed=int(seed))
        except InputError as err:
            logger.info("request_id=%s endpoint=/demo rejected status=%d: %s", request_id,
                        input_error_response(err).status_code, err.error)
            return input_error_response(err)  # type: ignore[return-value]
        except ServiceNotReady as err:
            return error_response(503, f"not ready: {err}")  # type: ignore[return-value]
        except Exception as err:  # noqa: BLE001
            logger.error("request_id=%s endpoint=/demo failed: %s", request_id,
                         scrubbed(err, [str(file), file.name, str(file.parent)]))
            return error_response(500, "internal error while building the comparison")  # type: ignore[return-value]
        finally:
            file.unlink(missing_ok=True)
        seconds = time.perf_counter() - started
        INFERENCE_SECONDS.labels(endpoint="/demo").observe(seconds)
        CONSISTENCY.labels(endpoint="/demo").observe(view.consistency_psnr)
        logger.info("request_id=%s endpoint=/demo format=%s modality=%s lr=%dx%d scale=%d consistency=%.2fdB "
                    "seconds=%.2f", request_id, file_format, chosen_modality, *view.lr.shape[1:], generator.scale,
                    view.consistency_psnr, seconds)
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
            "cropped": view.cropped,
            "sizes": {"lr": list(view.lr.shape[1:]), "output": list(view.sr.shape[1:])},
            "images": {"lr": png_data_url(view.lr), "bicubic": png_data_url(view.bicubic),
                       "model": png_data_url(view.sr),
                       "original": None if view.hr is None else png_data_url(view.hr)},
            "scores": view.scores,
            "consistency_psnr": view.consistency_psnr,
            "consistency_warning": self._warning(view.consistency_psnr),
            "download": {"filename": f"medsr_x{generator.scale}.png", "png16": png_data_url(view.sr, bits=16)},
            "seconds": seconds,
        }


MedSR.add_asgi_middleware(GatewayMiddleware, max_upload_bytes=int(SERVING["max_upload_bytes"]),
                          max_array_output_pixels=int(SERVING["max_array_output_pixels"]),
                          admission=Admission(computing=int(SERVING["threads"]),
                                              max_in_flight=int(SERVING["max_in_flight"]),
                                              max_wait_s=float(SERVING["max_wait_s"])),
                          read_timeout_s=float(SERVING["read_timeout_s"]),
                          compute_timeout_s=float(SERVING["compute_timeout_s"]),
                          json_limits=JSONLimits(max_bytes=int(SERVING["max_json_bytes"]),
                                                 max_depth=int(SERVING["max_json_depth"]),
                                                 max_number_chars=int(SERVING["max_json_number_chars"])),
                          form_fields={f"/{name}": tuple(MedSR.apis[name].input_spec.model_fields)
                                       for name in ("upscale", "demo")})
logger.debug("serving params: %s; largest output %s", {k: v for k, v in SERVING.items() if k != "batching"},
             describe_size(int(SERVING["max_output_pixels"])))
