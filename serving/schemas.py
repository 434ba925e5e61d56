"""The JSON of ``POST /upscale_array``: images in (nested lists or base64 float32), results out.

Validation happens while BentoML parses the request, so a bad item is refused before any work
with a ``medsr_unprocessable`` (422) or ``medsr_too_large`` (413) error that names the problem
and the fix (:func:`serving.errors.normalised_error` turns it into the one error format).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, PrivateAttr, model_validator
from pydantic_core import PydanticCustomError

# Scales the loaded champions offer; written by the service once they are loaded.
AVAILABLE_SCALES: set[int] = set()
# Output pixels one request may ask for (serving.max_array_output_pixels); set by the service.
LIMITS: dict[str, int] = {"max_array_output_pixels": 0}


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
        self._pixels = decoded(self)
        return self

    def pixels(self) -> np.ndarray:
        """The decoded contract image (1, h, w)."""
        return self._pixels


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


def _unprocessable(message: str, fix: str) -> PydanticCustomError:
    return PydanticCustomError("medsr_unprocessable", "{message} Fix: {fix}", {"message": message, "fix": fix})


def decoded(item: ArrayImage) -> np.ndarray:
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
    limit = LIMITS["max_array_output_pixels"]
    if total > limit:  # checked before decoding anything large
        raise PydanticCustomError(
            "medsr_too_large", "{message} Fix: {fix}",
            {"message": f"image too large: {height}x{width} at x{item.scale} gives {total} pixels, over "
                        f"serving.max_array_output_pixels = {limit}",
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
