"""What Pillow's modes hide about a raster file, and how it is shown.

Pillow opens a 16-bit RGB, RGBA or grey+alpha PNG as 8-bit ``RGB``/``RGBA`` (the low byte is
dropped), a signed 16-bit TIFF as 32-bit ``I``, and does not apply EXIF orientation. The loader
(:func:`medsr.data.loading.load_raster`) and the writer use these helpers to keep the file's
own depth and signedness and to work on the image as viewers show it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, as Pillow's convert("L")
_ORIENTATION_TAG = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = {2: "rgb", 4: "la", 6: "rgba"}
_TIFF_BITS, _TIFF_SAMPLE_FORMAT = 258, 339


def converted_label(mode: str) -> str:
    """The ``X-MedSR-Converted`` value for a colour, palette or alpha input: ``rgb->luma``..."""
    names = {"P": "palette", "PA": "palette", "1": "bilevel", "YCbCr": "ycbcr", "PALETTE COLOR": "palette"}
    name = names.get(mode, mode.lower().replace(" ", "").replace("_", ""))
    if name.startswith(("ybr", "rgb")) and "a" not in name[3:]:
        name = "rgb"
    return f"{name}->luma"


def orientation(image: Any) -> int:
    """The EXIF orientation (1..8) of a Pillow image, 1 when it has none."""
    try:
        value = int(image.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except (AttributeError, TypeError, ValueError, SyntaxError):
        return 1
    return value if 1 <= value <= 8 else 1


def upright(image: Any) -> Any:
    """The image as viewers show it: its EXIF orientation applied (the same image when none)."""
    from PIL import ImageOps

    return image if orientation(image) == 1 else ImageOps.exif_transpose(image)


def oriented(array: np.ndarray, value: int) -> np.ndarray:
    """``array`` (H, W) turned as EXIF orientation ``value`` says (as ``ImageOps.exif_transpose``)."""
    turns = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1], 5: lambda a: a.T,
             6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].T, 8: lambda a: np.rot90(a, 1)}
    return np.ascontiguousarray(turns[value](array)) if value in turns else array


def png_colour16(path: Path) -> str | None:
    """``rgb``/``la``/``rgba`` for a 16-bit colour or grey+alpha PNG (Pillow would read 8 bits), else None."""
    with open(path, "rb") as handle:
        head = handle.read(26)
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR" or head[24] != 16:
        return None
    return _PNG_COLOUR_TYPES.get(head[25])


def png16_luma(path: Path, kind: str) -> np.ndarray:
    """The 16-bit luma of a 16-bit colour/grey+alpha PNG (alpha dropped), as float64 (H, W)."""
    import imagecodecs

    samples = np.asarray(imagecodecs.png_decode(Path(path).read_bytes()), dtype=np.float64)
    if kind == "la":
        return samples[..., 0]
    return samples[..., :3] @ LUMA_WEIGHTS


def tiff_integer_dtype(image: Any) -> str | None:
    """``int16``/``uint16``/``int8`` for an integer TIFF page Pillow widened to mode ``I``, else None."""
    tags = getattr(image, "tag_v2", None)
    if tags is None or image.mode != "I":
        return None
    bits = tags.get(_TIFF_BITS)
    fmt = tags.get(_TIFF_SAMPLE_FORMAT, 1)
    bits = int(bits[0] if isinstance(bits, tuple) else bits or 0)
    fmt = int(fmt[0] if isinstance(fmt, tuple) else fmt or 1)
    if bits in (8, 16) and fmt in (1, 2):
        return f"{'int' if fmt == 2 else 'uint'}{bits}"
    return None


def tiff_layout_pillow_lacks(path: Path) -> str | None:
    """``"64-bit float"`` (etc.) for a readable TIFF whose samples Pillow cannot open, else None."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            dtype = np.dtype(tif.pages[0].dtype)
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads either: the caller's error stands
        return None
    if dtype.itemsize <= 4 and dtype.kind != "c":
        return None
    kind = {"f": "float", "i": "signed integer", "u": "unsigned integer", "c": "complex"}.get(dtype.kind, dtype.kind)
    return f"{dtype.itemsize * 8}-bit {kind}"
