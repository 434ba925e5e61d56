"""Scoring upscalers against bicubic on held-out images, per degradation track.

One path for every number MedSR reports about quality: the ``benchmark`` stage (test and val
pair sets written by the degrade stage) and ``medsr evaluate`` (a user's own HR files, degraded
here with the same seeded operators) both call :func:`evaluate_images` and :func:`summarize`,
so the same image gives the same score whichever way it arrives.

Tracks (:data:`medsr.data.pairing.TRACKS`, LR images from :func:`medsr.data.pairing.track_lr`):
``clean`` is antialiased bicubic downsampling alone; ``realistic`` adds the blur
``degrade.blur_sigma`` before it and the modality's noise after it, seeded by
``rng_for(degrade.seed, key, scale, "realistic")`` as the degrade stage does. Scores
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
from medsr.data.pairing import track_lr
from medsr.metrics import score_image

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


# --------------------------------------------------------------------------- a user's own folder
# `medsr evaluate`: HR files the project never saw, degraded here on both tracks, scored per image.

def load_upscaler(spec: str, scale: int, *, registry_names: Mapping[int, str] | None = None,
                  device: str = "cpu") -> tuple[Any, str]:
    """A generator from ``spec``: ``models:/name@alias`` or ``models:/name/version`` (MLflow registry), a bare
    version number (of ``registry_names[scale]``), or a ``.pt`` checkpoint file; returns it and a label.

    Raises ValueError naming the spec and what to pass instead.
    """
    from pathlib import Path

    from medsr.models import check_scale

    scale = check_scale(scale)
    if spec.isdigit():
        name = (registry_names or {}).get(scale, f"medsr-x{scale}")
        spec = f"models:/{name}/{spec}"
    if spec.startswith("models:/"):
        from medsr.tracking import load_logged_generator

        generator, info = load_logged_generator(spec, device)
        if int(info.get("scale", scale)) != scale:
            raise ValueError(f"{spec} is a x{info.get('scale')} model, not x{scale}: pass --scale {info.get('scale')}")
        return generator, spec
    path = Path(spec)
    if path.suffix == ".pt" and path.is_file():
        from medsr.training.checkpoint import checkpoint_info, load_generator

        info = checkpoint_info(path)
        if int(info["scale"]) != scale:
            raise ValueError(f"{path} is a x{info['scale']} checkpoint, not x{scale}: pass --scale {info['scale']}")
        return load_generator(path, device), f"{info['model']} ({path}, step {info.get('step')}, phase {info.get('phase')})"
    raise ValueError(f"model {spec!r} is neither models:/NAME@ALIAS, models:/NAME/VERSION, a version number "
                     "nor an existing .pt checkpoint; e.g. --model models:/medsr-x4@champion")


def guess_modality(path: Any, requested: str | None) -> str:
    """``requested`` when given; else the folder name (xray/ct/mri) or the DICOM Modality tag."""
    from pathlib import Path

    from medsr.data import MODALITIES, MODALITY_OF_DICOM

    if requested:
        if requested not in MODALITIES:
            raise ValueError(f"--modality {requested!r}: use one of {', '.join(MODALITIES)}")
        return requested
    path = Path(path)
    for part in reversed(path.parent.parts):
        if part in MODALITIES:
            return part
    try:
        import pydicom

        tag = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality", "")).upper()
        if tag in MODALITY_OF_DICOM:
            return MODALITY_OF_DICOM[tag]
    except Exception:  # not DICOM or unreadable: the loader says so later, with the file named
        pass
    raise ValueError(f"{path.name}: cannot tell its modality (no xray/ct/mri folder, no DICOM Modality of "
                     f"{', '.join(sorted(MODALITY_OF_DICOM))}): "
                     "pass --modality xray|ct|mri")


def folder_images(folder: Any, scale: int, tracks: Sequence[str], degrade_params: Mapping[str, Any], *,
                  modality: str | None = None, tile_size: int = 256, max_pixels: int = 100_000_000
                  ) -> tuple[list[HeldOutImage], list[str]]:
    """Every image of every supported file under ``folder``, tiled and degraded on each track.

    Images are windowed as the pipeline loads them, cut into ``tile_size`` tiles as the pipeline
    does, cropped to a multiple of ``scale``. A single-image file is keyed by its file name without
    extension (the realistic track's noise seed; the relative path when two files share a name),
    others by that, frame and tile. Returns the
    images and one line per file that could not be used (the file named, with the fix).
    """
    from pathlib import Path

    from medsr.data.loading import SUPPORTED_SUFFIXES, LoadError, load_image
    from medsr.data.tiling import tile_image

    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder; pass a folder of DICOM, NIfTI, PNG or TIFF files")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
                   and (p.name.lower().endswith(SUPPORTED_SUFFIXES) or "." not in p.name))
    if not files:
        raise ValueError(f"{root}: no DICOM, NIfTI, PNG or TIFF files in it")
    images: list[HeldOutImage] = []
    skipped: list[str] = []
    used_stems: dict[str, str] = {}
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            kind = guess_modality(path, modality)
            loaded = load_image(path, kind, root=root, max_pixels=max_pixels)
        except (LoadError, ValueError) as err:
            skipped.append(f"{rel}: {err}")
            continue
        tiles = [(image, y, x, tile) for image in loaded for y, x, tile in tile_image(image, tile_size)]
        for image, y, x, tile in tiles:
            if min(tile.pixels.shape[-2:]) < scale * 4:
                skipped.append(f"{rel}: a {tile.pixels.shape[-2]}x{tile.pixels.shape[-1]} image is too small for x{scale}")
                continue
            name = path.name.removesuffix(".gz")
            stem = name.rsplit(".", 1)[0] if "." in name else name
            stem = stem if stem not in used_stems or used_stems[stem] == rel else rel  # a clash: the path keeps it apart
            used_stems.setdefault(stem, rel)
            key = stem if len(tiles) == 1 else f"{stem}#f{image.frame}y{y}x{x}"
            hr = deg.crop_to_multiple(tile.pixels, scale)
            for track in tracks:
                images.append(HeldOutImage(key=key, modality=kind, source=rel, track=track, hr=hr,
                                           lr=track_lr(hr, scale, track, modality=kind, key=key,
                                                       degrade_params=degrade_params)))
    return images, skipped


def load_folder(folder: Any, scale: int, params: Mapping[str, Any], *,
                modality: str | None = None) -> tuple[list[HeldOutImage], list[str]]:
    """:func:`folder_images` with the project's params (tracks, tile size, pixel limit); raises
    ValueError when nothing in the folder can be used."""
    degrade_params = params["degrade"]
    data = params.get("data") or {}
    images, skipped = folder_images(folder, scale, list(degrade_params.get("tracks", deg.TRACKS)),
                                    degrade_params, modality=modality, tile_size=int(data.get("tile_size", 256)),
                                    max_pixels=int(data.get("max_pixels", 100_000_000)))
    if not images:
        raise ValueError(f"{folder}: no usable image; " + ("; ".join(skipped[:3]) or "nothing readable"))
    return images, skipped


def evaluate_folder(folder: Any, generator: Any, scale: int, params: Mapping[str, Any], *, label: str,
                    modality: str | None = None, consistency: bool = True,
                    loaded: tuple[list[HeldOutImage], list[str]] | None = None) -> dict[str, Any]:
    """Everything ``medsr evaluate`` reports for one model on one folder (see :func:`folder_images`).

    ``loaded``: the folder's :func:`load_folder` result at this scale, when several models are scored
    on it (``medsr registry review --evaluate``), so it is read and degraded once.
    Returns ``{"model", "scale", "tracks", "consistency", "summary": rows per track and modality,
    "per_image": one row per image and track, "skipped": lines}``. Raises ValueError when nothing
    in the folder can be used.
    """
    from medsr.consistency import ConsistencySettings
    from medsr.inference import Upscaler
    from medsr.models import build_generator

    tracks = list(params["degrade"].get("tracks", deg.TRACKS))
    settings = ConsistencySettings.from_params(params.get("consistency") if consistency else None)
    images, skipped = loaded if loaded is not None else load_folder(folder, scale, params, modality=modality)
    baseline = Upscaler(build_generator("bicubic", scale), scale)
    upscaler = Upscaler(generator, scale, consistency=settings)  # what the service returns, on whole images
    records = evaluate_images(lambda lr: {"bicubic": baseline.network(lr),
                                          "model": upscaler(lr, score=False).output}, images, scale)
    by_key = {(r["key"], r["track"], r["model"]): r for r in records}
    per_image = []
    for r in records:
        if r["model"] != "model":
            continue
        ref = by_key[(r["key"], r["track"], "bicubic")]
        per_image.append({"image": r["key"], "file": r["source"], "modality": r["modality"], "track": r["track"],
                          "psnr": round(r["psnr"], 4), "ssim": round(r["ssim"], 4),
                          "bicubic_psnr": round(ref["psnr"], 4), "bicubic_ssim": round(ref["ssim"], 4),
                          "gain_db": round(r["psnr"] - ref["psnr"], 4), "ssim_gain": round(r["ssim"] - ref["ssim"], 4)})
    summary = [{k: v for k, v in r.items() if k != "model"} for r in summarize(records) if r["model"] == "model"]
    return {"model": label, "scale": scale, "tracks": tracks, "consistency": settings.as_dict(),
            "summary": summary, "per_image": per_image, "skipped": skipped}


# --------------------------------------------------------------------------- references with their own noise

def with_noisy_reference(images: Sequence[HeldOutImage], sigma: float, correlation: float, scale: int,
                         degrade_params: Mapping[str, Any], *, seed: int = 0) -> list[HeldOutImage]:
    """``images`` with Gaussian noise of std ``sigma`` in their HR reference (white, smoothed by a
    Gaussian of ``correlation`` HR px, then rescaled to ``sigma``), each LR rebuilt from the noisy
    HR on its own track.

    A probe of what real scans are: CT reconstructions and processed radiographs carry correlated
    noise of their own, which belongs to the reference. The embedded val images are nearly clean
    (or, for MRI, far noisier than any training pair), so only this shows a model that removes
    every noise it sees, and a consistency weight that lets it (``benchmarks/probe_noisy_reference.py``).
    """
    from medsr.ops import gaussian_blur

    probed = []
    for image in images:
        rng = deg.rng_for(seed, image.key, scale, "reference-noise")
        noise = rng.standard_normal(image.hr.shape)
        if correlation > 0:
            noise = gaussian_blur(noise, correlation)
        hr = np.clip(image.hr + noise * (sigma / max(float(noise.std()), 1e-12)), 0.0, 1.0).astype(np.float32)
        lr = track_lr(hr, scale, image.track, modality=image.modality, key=image.key, degrade_params=degrade_params)
        probed.append(HeldOutImage(key=image.key, modality=image.modality, source=image.source, track=image.track,
                                   hr=hr, lr=lr))
    return probed
