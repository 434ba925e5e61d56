"""Build the LR/HR pair sets from the split table with the pure functions of ``medsr.degradations``.

Every pair's randomness comes from ``rng_for(seed, id, scale, kind)``, so a pair does not depend
on which other images exist or in what order they are processed: same params, same bytes.
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


def _noise(params: Mapping[str, Any], modality: str) -> tuple[str, float]:
    noise = params["noise"][modality]
    return str(noise["kind"]), float(noise["level"])


def _pairs(rows: pd.DataFrame, interim_dir: Path, scale: int, kind: str, params: Mapping[str, Any]) -> Iterator[PairItem]:
    seed = int(params["seed"])
    blind = params["blind"]
    for row in rows.itertuples():
        image = np.load(interim_dir / row.array, allow_pickle=False)
        rng = deg.rng_for(seed, row.id, scale, kind)
        noise_kind, noise_level = _noise(params, row.modality)
        if kind == "ssl":
            # VLR -> LR pairs: the light CNN never sees HR while training (its seed's self-supervision).
            hr = deg.crop_to_multiple(image, scale * scale)
            lr = deg.degrade_standard(hr, scale, blur_sigma=float(params["blur_sigma"]), noise_kind=noise_kind,
                                      noise_level=noise_level, rng=deg.rng_for(seed, row.id, scale, "standard"))
            vlr = deg.degrade_vlr(lr, scale, blur_sigma=float(params["blur_sigma"]), noise_kind=noise_kind,
                                  noise_level=noise_level, rng=rng)
            yield PairItem(row.id, row.modality, hr=lr, lr=vlr)
            continue
        hr = deg.crop_to_multiple(image, scale)
        if kind == "standard":
            lr = deg.degrade_standard(hr, scale, blur_sigma=float(params["blur_sigma"]), noise_kind=noise_kind,
                                      noise_level=noise_level, rng=rng)
        else:
            lr = deg.degrade_blind(hr, scale, blur_sigma=tuple(blind["blur_sigma"]), resize_factor=tuple(blind["resize_factor"]),
                                   noise_level=tuple(blind["noise_level"]), jpeg_quality=tuple(blind["jpeg_quality"]), rng=rng)
        yield PairItem(row.id, row.modality, hr=hr, lr=lr)


def build_pair_sets(table: pd.DataFrame, interim_dir: Path, out_root: Path, params: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``out_root/<split>/x<scale>/<kind>`` for every split, scale and kind; returns counts."""
    kinds = [k for k in PAIR_KINDS if k != "ssl" or params.get("ssl", True)]
    counts: dict[str, Any] = {}
    jobs = [(split, int(scale), kind) for split in SPLITS for scale in params["scales"] for kind in kinds]
    for split, scale, kind in tqdm(jobs, desc="degrade", unit="set"):
        rows = table[table["split"] == split].sort_values("id")
        attrs = {"split": split, "kind": kind, "seed": int(params["seed"])}
        n = write_pairs(out_root / split / f"x{scale}" / kind, _pairs(rows, interim_dir, scale, kind, params), scale, attrs)
        counts.setdefault(split, {}).setdefault(f"x{scale}", {})[kind] = n
    return counts
