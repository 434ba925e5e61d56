"""Medical image data: loading, sources, metadata table, validation, split and pair storage.

The array contract (one for the whole code base)
------------------------------------------------
Every image that leaves a loader, and every array a degradation, model, loss or metric
receives, is

* ``numpy.float32`` (``torch.float32`` once batched),
* channel-first: ``(1, H, W)`` for one image, ``(N, 1, H, W)`` for a batch,
* finite, with values in ``[0, 1]``,
* already windowed: the modality's intensity window (DICOM modality LUT then VOI LUT,
  NIfTI or raster robust percentile window) is applied once, at load time, and nowhere else.

``Window`` records how to go back from ``[0, 1]`` to the original units (HU for CT, stored
values for X-ray/MRI) so a result can be written back in the source's own dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

MODALITIES: tuple[str, ...] = ("xray", "ct", "mri")

MODALITY_OF_DICOM: dict[str, str] = {
    "CR": "xray", "DX": "xray", "MG": "xray", "RF": "xray", "XA": "xray",  # projection radiography
    "CT": "ct",
    # PET is a reconstructed tomographic slice with Poisson counting noise: CT's model, not X-ray's.
    "PT": "ct",
    "MR": "mri",
}
"""DICOM Modality (0008,0060) -> one of :data:`MODALITIES`; a code not listed has no modality of
its own (an upload then counts as X-ray-like, as a PNG does; ``medsr evaluate`` asks for one)."""


@dataclass(frozen=True)
class Window:
    """Linear window mapping original units ``[low, high]`` onto ``[0, 1]``."""

    low: float
    high: float
    method: str  # "voi_lut", "dicom_window", "percentile", "dtype_range"
    inverted: bool = False  # MONOCHROME1: 1.0 is black in the original

    def to_units(self, image: np.ndarray) -> np.ndarray:
        """Map a contract image back to original units (float64)."""
        values = 1.0 - image.astype(np.float64) if self.inverted else image.astype(np.float64)
        return self.low + values * (self.high - self.low)


@dataclass
class MedImage:
    """One 2-D image that satisfies the array contract, plus what is needed to trace it."""

    pixels: np.ndarray  # float32 (1, H, W) in [0, 1]
    modality: str
    source: str  # path of the file it came from, relative to the raw folder
    patient_key: str  # salted hash of the patient identity, never the raw PatientID
    original_dtype: str
    window: Window
    spacing: tuple[float, float] | None = None  # (row, col) in mm
    frame: int | None = None  # frame or slice index inside a multi-frame/volume file
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_contract(self.pixels, self.source)

    def window_dict(self) -> dict[str, Any]:
        return asdict(self.window)


class ContractError(ValueError):
    """An array does not satisfy the contract above."""


def check_contract(pixels: np.ndarray, name: str = "array") -> None:
    """Raise :class:`ContractError` unless ``pixels`` is float32 (1, H, W), finite, in [0, 1]."""
    if not isinstance(pixels, np.ndarray):
        raise ContractError(f"{name}: expected a numpy array, got {type(pixels).__name__}")
    if pixels.dtype != np.float32:
        raise ContractError(f"{name}: expected float32, got {pixels.dtype}")
    if pixels.ndim != 3 or pixels.shape[0] != 1:
        raise ContractError(f"{name}: expected shape (1, H, W), got {pixels.shape}")
    if not np.isfinite(pixels).all():
        raise ContractError(f"{name}: contains NaN or inf values")
    if pixels.size and (pixels.min() < 0.0 or pixels.max() > 1.0):
        raise ContractError(f"{name}: values outside [0, 1] ({pixels.min()}..{pixels.max()})")
