"""Scoring upscalers against bicubic on held-out images, per degradation track.

One path for every number MedSR reports about quality: the ``benchmark`` stage (test and val
pair sets written by the degrade stage) and ``medsr evaluate`` (a user's own HR files, degraded
here with the same seeded operators) both call :func:`evaluate_images` and :func:`summarize`,
so the same image gives the same score whichever way it arrives.

Tracks (:data:`medsr.data.pairing.TRACKS`): ``clean`` is antialiased bicubic downsampling alone;
``realistic`` adds the blur ``degrade.blur_sigma`` before it and the modality's noise after it,
seeded by ``rng_for(degrade.seed, key, scale, "realistic")`` as the degrade stage does. Scores
follow :mod:`medsr.metrics` (border of ``scale`` px, data range 1.0, mean of per-image scores);
CT and MRI rows also carry foreground scores inside a body/brain mask of the HR image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsr import degradations as deg
from medsr.metrics import FOREGROUND_MODALITIES, foreground_mask, psnr, psnr_in_mask, ssim, ssim_in_mask

REFERENCE = "bicubic"
ALL = "all"


@dataclass(frozen=True)
class HeldOutImage:
    """One image to score on one track: ``key`` seeds its noise, ``source`` is the file it comes from."""

    key: str
    modality: str
    source: str
    track: str
    hr: np.ndarray  # (1, H, W), H and W multiples of the scale
    lr: np.ndarray  # (1, H/scale, W/scale)


def track_lr(hr: np.ndarray, scale: int, track: str, *, modality: str, key: str,
             degrade_params: Mapping[str, Any]) -> np.ndarray:
    """The LR image of ``hr`` on ``track``, exactly as the degrade stage writes it for that key."""
    if track == "clean":
        return deg.degrade_bicubic(hr, scale)
    if track == "realistic":
        noise = degrade_params["noise"][modality]
        rng = deg.rng_for(int(degrade_params["seed"]), key, scale, "realistic")
        return deg.degrade_standard(hr, scale, blur_sigma=float(degrade_params["blur_sigma"]),
                                    noise_kind=str(noise["kind"]), noise_level=float(noise["level"]), rng=rng)
    raise ValueError(f"unknown track {track!r}; known: clean, realistic")


def score_image(sr: np.ndarray, hr: np.ndarray, *, scale: int, modality: str) -> dict[str, float]:
    """PSNR/SSIM of one prediction, plus foreground PSNR/SSIM for CT and MRI (NaN where no mask)."""
    scores = {"psnr": psnr(sr, hr, border=scale), "ssim": ssim(sr, hr, border=scale),
              "psnr_fg": math.nan, "ssim_fg": math.nan}
    if modality in FOREGROUND_MODALITIES:
        mask = foreground_mask(hr, border=scale)
        if mask is not None:
            scores["psnr_fg"] = psnr_in_mask(sr, hr, mask, border=scale)
            scores["ssim_fg"] = ssim_in_mask(sr, hr, mask, border=scale)
    return scores


def evaluate_images(predict_all: Callable[[np.ndarray], Mapping[str, np.ndarray]], images: Iterable[HeldOutImage],
                    scale: int) -> list[dict[str, Any]]:
    """One record per image and named output of ``predict_all`` (LR -> {name: SR}), with its scores."""
    records: list[dict[str, Any]] = []
    for image in images:
        outputs = predict_all(image.lr)
        for name, sr in outputs.items():
            if sr.shape != image.hr.shape:
                raise ValueError(f"{image.key}: {name} output {sr.shape} does not match HR {image.hr.shape}")
            records.append({"model": name, "key": image.key, "modality": image.modality, "source": image.source,
                            "track": image.track, **score_image(sr, image.hr, scale=scale, modality=image.modality)})
    return records


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _rounded(value: float, digits: int = 4) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


def summarize(records: Sequence[Mapping[str, Any]], reference: str = REFERENCE) -> list[dict[str, Any]]:
    """Rows per (model, track, modality) and an ``all`` row per (model, track): means and gains over ``reference``.

    Every row has ``images`` and ``files`` (how many distinct sources), ``gain_db`` (PSNR minus the
    reference's on the same images), ``ssim_gain``, and the foreground versions where defined.
    """
    by_cell: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        for modality in (record["modality"], ALL):
            by_cell.setdefault((record["model"], record["track"], modality), []).append(record)
    rows = []
    for (model, track, modality), cell in by_cell.items():
        ref = {r["key"]: r for r in by_cell.get((reference, track, modality), [])}
        missing = [r["key"] for r in cell if r["key"] not in ref]
        if missing:
            raise ValueError(f"{model} {track} {modality}: no {reference} score for {missing[:3]}")
        keys = [r["key"] for r in cell]
        row: dict[str, Any] = {"model": model, "track": track, "modality": modality, "images": len(cell),
                               "files": len({r["source"] for r in cell})}
        for metric in ("psnr", "ssim", "psnr_fg", "ssim_fg"):
            mine = _mean([r[metric] for r in cell])
            theirs = _mean([ref[k][metric] for k in keys])
            row[metric] = _rounded(mine)
            row[f"{reference}_{metric}"] = _rounded(theirs)
        row["gain_db"] = _rounded(_mean([r["psnr"] - ref[r["key"]]["psnr"] for r in cell]))
        row["ssim_gain"] = _rounded(_mean([r["ssim"] - ref[r["key"]]["ssim"] for r in cell]))
        row["gain_fg_db"] = _rounded(_mean([r["psnr_fg"] - ref[r["key"]]["psnr_fg"] for r in cell]))
        row["ssim_fg_gain"] = _rounded(_mean([r["ssim_fg"] - ref[r["key"]]["ssim_fg"] for r in cell]))
        row["images_fg"] = sum(math.isfinite(r["psnr_fg"]) for r in cell)
        rows.append(row)
    order = {ALL: "~"}  # modalities alphabetically, then the all row
    return sorted(rows, key=lambda r: (r["model"] != reference, r["model"], r["track"], order.get(r["modality"], r["modality"])))
