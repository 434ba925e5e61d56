"""Build the LR/HR pair sets from the split table with the pure functions of ``medsr.degradations``.

Every pair's randomness comes from ``rng_for(seed, id, scale, kind)``, so a pair does not depend
on which other images exist or in what order they are processed: same params, same bytes.

Kinds (``data/pairs/<split>/x<scale>/<kind>``): ``standard`` (training pairs; blur and noise
drawn per pair from ``degrade.train_range``, clean included), ``blind`` (second-order random),
``ssl`` (VLR -> LR), and on val and test the two evaluation tracks: ``clean`` (antialiased
bicubic only) and ``realistic`` (blur ``degrade.blur_sigma`` + the modality's noise level).
A model that wins one track by losing the other is not better, so both are always written.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medsr import degradations as deg
from medsr.data.pairs import PairItem, write_pairs
from medsr.data.split import SPLITS

PAIR_KINDS: tuple[str, ...] = ("standard", "blind", "ssl")
# Evaluation tracks, written for val and test only: what a model is judged on.
TRACKS: tuple[str, ...] = ("clean", "realistic")
EVAL_SPLITS: tuple[str, ...] = ("val", "test")


def _noise(params: Mapping[str, Any], modality: str) -> tuple[str, float]:
    noise = params["noise"][modality]
    return str(noise["kind"]), float(noise["level"])


def _drawn(params: Mapping[str, Any], noise_level: float, rng: np.random.Generator) -> deg.StandardParameters:
    """This pair's blur and noise from ``degrade.train_range`` (absent: the fixed realistic ones)."""
    spread = params.get("train_range")
    if not spread:
        return deg.StandardParameters(float(params["blur_sigma"]), noise_level)
    return deg.draw_standard_parameters(rng, clean_fraction=float(spread["clean_fraction"]),
                                        blur_sigma=tuple(spread["blur_sigma"]), noise_factor=tuple(spread["noise_factor"]),
                                        noise_level=noise_level)


def _standard(hr: np.ndarray, scale: int, noise_kind: str, drawn: deg.StandardParameters,
              rng: np.random.Generator) -> np.ndarray:
    return deg.degrade_standard(hr, scale, blur_sigma=drawn.blur_sigma, noise_kind=noise_kind,
                                noise_level=drawn.noise_level, rng=rng)


def _pairs(rows: pd.DataFrame, interim_dir: Path, scale: int, kind: str, params: Mapping[str, Any]) -> Iterator[PairItem]:
    seed = int(params["seed"])
    blind = params["blind"]
    for row in rows.itertuples():
        image = np.load(interim_dir / row.array, allow_pickle=False)
        rng = deg.rng_for(seed, row.id, scale, kind)
        noise_kind, noise_level = _noise(params, row.modality)
        if kind == "ssl":
            # VLR -> LR pairs: the light CNN never sees HR while training (its seed's self-supervision).
            # LR is this image's `standard` LR (same key, same bytes); VLR draws its own degradation.
            hr = deg.crop_to_multiple(image, scale * scale)
            lr_rng = deg.rng_for(seed, row.id, scale, "standard")
            lr = _standard(hr, scale, noise_kind, _drawn(params, noise_level, lr_rng), lr_rng)
            drawn = _drawn(params, noise_level, rng)
            vlr = deg.degrade_vlr(lr, scale, blur_sigma=drawn.blur_sigma, noise_kind=noise_kind,
                                  noise_level=drawn.noise_level, rng=rng)
            yield PairItem(row.id, row.modality, hr=lr, lr=vlr, degradation=drawn.as_dict())
            continue
        hr = deg.crop_to_multiple(image, scale)
        if kind == "standard":
            drawn = _drawn(params, noise_level, rng)
            yield PairItem(row.id, row.modality, hr=hr, lr=_standard(hr, scale, noise_kind, drawn, rng),
                           degradation=drawn.as_dict())
        elif kind == "clean":
            yield PairItem(row.id, row.modality, hr=hr, lr=deg.degrade_bicubic(hr, scale),
                           degradation={"blur_sigma": 0.0, "noise_level": 0.0})
        elif kind == "realistic":
            drawn = deg.StandardParameters(float(params["blur_sigma"]), noise_level)
            yield PairItem(row.id, row.modality, hr=hr, lr=_standard(hr, scale, noise_kind, drawn, rng),
                           degradation=drawn.as_dict())
        else:
            lr = deg.degrade_blind(hr, scale, blur_sigma=tuple(blind["blur_sigma"]), resize_factor=tuple(blind["resize_factor"]),
                                   noise_level=tuple(blind["noise_level"]), jpeg_quality=tuple(blind["jpeg_quality"]), rng=rng)
            yield PairItem(row.id, row.modality, hr=hr, lr=lr)


def kinds_for(split: str, params: Mapping[str, Any]) -> list[str]:
    """The pair kinds written for ``split``: training kinds everywhere, evaluation tracks on val and test."""
    kinds = [k for k in PAIR_KINDS if k != "ssl" or params.get("ssl", True)]
    return kinds + (list(params.get("tracks", TRACKS)) if split in EVAL_SPLITS else [])


def build_pair_sets(table: pd.DataFrame, interim_dir: Path, out_root: Path, params: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``out_root/<split>/x<scale>/<kind>`` for every split, scale and kind; returns counts."""
    unknown = set(params.get("tracks", TRACKS)) - set(TRACKS)
    if unknown:
        raise ValueError(f"degrade.tracks: unknown track(s) {sorted(unknown)}; known: {', '.join(TRACKS)}")
    counts: dict[str, Any] = {}
    jobs = [(split, int(scale), kind) for split in SPLITS for scale in params["scales"] for kind in kinds_for(split, params)]
    for split, scale, kind in tqdm(jobs, desc="degrade", unit="set"):
        rows = table[table["split"] == split].sort_values("id")
        attrs = {"split": split, "kind": kind, "seed": int(params["seed"])}
        n = write_pairs(out_root / split / f"x{scale}" / kind, _pairs(rows, interim_dir, scale, kind, params), scale, attrs)
        counts.setdefault(split, {}).setdefault(f"x{scale}", {})[kind] = n
    return counts
