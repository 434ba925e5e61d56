"""The web page: its GET routes (mounted at / beside the API) and the comparison /demo shows.

The page (``serving/static``) uploads a file or picks an embedded sample and shows LR | bicubic |
model (and the original when known) with PSNR/SSIM; :func:`side_by_side` computes that view.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from medsr.degradations import gaussian_blur
from medsr.inference import Upscaler
from medsr.metrics import psnr
from serving.errors import error_response
from serving.uploads import InputError

STATIC_DIR = Path(__file__).resolve().parent / "static"


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


def public_samples() -> list[dict[str, Any]]:
    return [{k: v for k, v in sample.items() if k != "path"} for sample in SAMPLES.values()]


async def index_page(_: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


async def info_page(_: Request) -> Response:
    service = bentoml.get_current_service()
    return JSONResponse(service.describe())


async def samples_page(_: Request) -> Response:
    return JSONResponse({"samples": public_samples()})


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


def png_data_url(image: np.ndarray, bits: int = 8) -> str:
    """A contract image as a grayscale PNG data URL (8-bit for display, 16-bit for download)."""
    import imagecodecs

    plane = image[0].astype(np.float64)
    pixels = np.rint(plane * 65535.0).astype(np.uint16) if bits == 16 else np.rint(plane * 255.0).astype(np.uint8)
    return "data:image/png;base64," + base64.b64encode(imagecodecs.png_encode(pixels, level=1)).decode("ascii")


@dataclass
class SideBySide:
    """LR input, bicubic and model outputs (and the original when known), with their scores.

    ``sr`` is the :class:`medsr.inference.Upscaler`'s output, the pixels /upscale returns for
    this LR input; ``scores`` and ``consistency_psnr`` are of that output."""

    lr: np.ndarray
    bicubic: np.ndarray
    sr: np.ndarray
    hr: np.ndarray | None
    scores: dict[str, dict[str, float]]  # {"bicubic": {"psnr", "ssim"}, "model": {...}} when hr is known
    consistency_psnr: float
    cropped: bool


def center_crop(image: np.ndarray, max_side: int, multiple: int = 1) -> tuple[np.ndarray, bool]:
    """The central ``max_side`` square (at most), with sides cut to a multiple of ``multiple``."""
    _, height, width = image.shape
    new_h = min(height, max_side) // multiple * multiple
    new_w = min(width, max_side) // multiple * multiple
    if new_h < 1 or new_w < 1:
        raise InputError("unprocessable", f"image of {height}x{width} pixels is smaller than the scale {multiple}",
                         "upload a larger image or use a smaller scale")
    top, left = (height - new_h) // 2, (width - new_w) // 2
    cropped = np.ascontiguousarray(image[:, top:top + new_h, left:left + new_w])
    return cropped, (new_h, new_w) != (height, width)


def side_by_side(image: np.ndarray, upscaler: Upscaler, *, noise_kind: str, noise_level: float,
                 blur_sigma: float, known_original: bool, max_side: int, seed: int = 0) -> SideBySide:
    """What the web page shows: degrade the input as the sliders say, upscale it two ways, score.

    ``known_original``: the image is treated as the high-resolution original and the model's
    input is made from it (blur, bicubic down by the scale, noise), so PSNR/SSIM against it are
    known. Otherwise the image itself (with the sliders' blur and noise) is the model's input.
    """
    from medsr.degradations import add_modality_noise, degrade_standard, rng_for, upsample_bicubic
    from medsr.metrics import ssim

    scale = upscaler.scale
    rng = rng_for(seed, "serving-demo")
    if known_original:
        hr, cropped = center_crop(image, max_side, scale)
        lr = degrade_standard(hr, scale, blur_sigma=blur_sigma, noise_kind=noise_kind, noise_level=noise_level, rng=rng)
    else:
        source, cropped = center_crop(image, max(1, max_side // scale))
        hr = None
        lr = add_modality_noise(gaussian_blur(source, blur_sigma), noise_kind, noise_level, rng)
    bicubic = upsample_bicubic(lr, scale)
    upscaled = upscaler(lr)
    sr = upscaled.output
    scores: dict[str, dict[str, float]] = {}
    if hr is not None:
        for name, candidate in (("bicubic", bicubic), ("model", sr)):
            scores[name] = {"psnr": psnr(candidate, hr, border=scale)}
            try:
                scores[name]["ssim"] = ssim(candidate, hr, border=scale)
            except ValueError:  # too small for the SSIM window
                pass
    return SideBySide(lr=lr, bicubic=bicubic, sr=sr, hr=hr, scores=scores,
                      consistency_psnr=upscaled.consistency_psnr, cropped=cropped)


