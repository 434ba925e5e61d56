"""The LR/HR pairs, from the pure functions of ``medsr.degradations``: the evaluation tracks the
degrade stage writes, and the training kinds degraded patch by patch while training draws them.

Written (``data/pairs``): ``train/hr``, the training tiles and their downscaled copies
(:func:`training_tiles`; HR only, with the training recipe, :func:`training_recipe`, in their
attributes), and on val and test the two evaluation tracks,
``<split>/x<scale>/clean`` (antialiased bicubic only) and ``.../realistic`` (blur
``degrade.blur_sigma`` + the modality's noise level). A model that wins one track by losing the
other is not better, so both are always written. A track pair's randomness comes from
``rng_for(seed, id, scale, track)``, so it does not depend on which other images exist or in what
order they are processed: same params, same bytes.

Training kinds (:func:`degrade_training_patch`; BasicSR and Real-ESRGAN too store only HR):
``standard`` (blur and noise drawn per patch from ``degrade.train_range``, clean included),
``blind`` (second-order random) and ``ssl`` (VLR -> LR). Each patch is degraded from its HR crop
plus a margin, so that the blur and the resampling see the neighbourhood a whole-tile degradation
would see, at the cost of a patch rather than a tile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsr import degradations as deg
from medsr.data import parallel
from medsr.data.pairs import PairItem, write_pairs, write_tiles
from medsr.data.shards import TileRef, read_ref
from medsr.ops import gaussian_radius

if TYPE_CHECKING:
    import pandas as pd

PAIR_KINDS: tuple[str, ...] = ("standard", "blind", "ssl")
TRACKS = deg.TRACKS  # the evaluation tracks, written for val and test only: what a model is judged on
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


def track_parameters(track: str, noise_level: float, params: Mapping[str, Any]) -> deg.StandardParameters:
    """The fixed blur and noise of an evaluation track: none for ``clean``, ``degrade.blur_sigma`` and
    the modality's level for ``realistic``."""
    if track == "clean":
        return deg.StandardParameters(0.0, 0.0)
    if track == "realistic":
        return deg.StandardParameters(float(params["blur_sigma"]), noise_level)
    raise ValueError(f"unknown track {track!r}; known: {', '.join(TRACKS)}")


def track_lr(hr: np.ndarray, scale: int, track: str, *, modality: str, key: str,
             degrade_params: Mapping[str, Any]) -> np.ndarray:
    """The LR image of ``hr`` on ``track``, seeded by ``rng_for(seed, key, scale, track)``: the one
    definition the degrade stage writes and ``medsr evaluate`` applies to a user's files."""
    noise_kind, noise_level = _noise(degrade_params, modality)
    drawn = track_parameters(track, noise_level, degrade_params)
    if track == "clean":
        return deg.degrade_bicubic(hr, scale)
    rng = deg.rng_for(int(degrade_params["seed"]), key, scale, track)
    return _standard(hr, scale, noise_kind, drawn, rng)


def _standard(hr: np.ndarray, scale: int, noise_kind: str, drawn: deg.StandardParameters,
              rng: np.random.Generator) -> np.ndarray:
    return deg.degrade_standard(hr, scale, blur_sigma=drawn.blur_sigma, noise_kind=noise_kind,
                                noise_level=drawn.noise_level, rng=rng)


@dataclass(frozen=True)
class PairSource:
    """What one pair needs from its table row (small, so it pickles cheaply to a worker)."""

    id: str
    modality: str
    tile: TileRef  # its stored tile in data/interim

    @classmethod
    def of_row(cls, interim_dir: Path, row: Any) -> PairSource:
        # Absolute: a Dask worker's working directory is not ours.
        return cls(str(row.id), str(row.modality), TileRef.of_row(Path(interim_dir).absolute(), row))


def make_pair(source: PairSource, *, scale: int, kind: str, params: Mapping[str, Any]) -> PairItem:
    """One evaluation-track pair for one image: a pure function of the image and ``rng_for(seed, id, scale, kind)``."""
    if kind not in TRACKS:
        raise ValueError(f"{kind!r} pairs are not written: training pairs are degraded as they are drawn "
                         f"(degrade_training_patch); written tracks: {', '.join(TRACKS)}")
    image = read_ref(source.tile)
    _, noise_level = _noise(params, source.modality)
    hr = deg.crop_to_multiple(image, scale)
    drawn = track_parameters(kind, noise_level, params)
    return PairItem(source.id, source.modality, hr=hr, lr=track_lr(hr, scale, kind, modality=source.modality,
                                                                   key=source.id, degrade_params=params),
                    degradation=drawn.as_dict())


# The degrade params the training kinds read; the degrade stage stores them with the training tiles.
RECIPE_KEYS: tuple[str, ...] = ("blur_sigma", "noise", "train_range", "blind")


def training_recipe(params: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`degrade_training_patch` needs from ``degrade``: it travels with the training tiles,
    so a change of it changes ``data/pairs`` (and DVC retrains) as it did when the pairs were written."""
    return {key: params[key] for key in RECIPE_KEYS if key in params}


def patch_margin(kind: str, scale: int, recipe: Mapping[str, Any]) -> int:
    """Context around a training patch, in pixels of its input (LR; VLR for ``ssl``), for the blur
    and the antialiased bicubic (2 output pixels either side) to see what a whole-tile degradation
    sees. ``blind``'s resizes and JPEG blocks make no exact margin possible; its margin keeps their
    border effects (reflect padding) out of the patch."""
    spread = recipe.get("train_range") or {}
    sigma = float(max(spread.get("blur_sigma", [recipe.get("blur_sigma", 0.0)])))
    standard_hr = gaussian_radius(sigma) + 2 * scale
    if kind == "standard":
        return -(-standard_hr // scale)
    if kind == "ssl":  # HR -> LR (margin in LR px), then the same operator LR -> VLR
        return -(-(-(-standard_hr // scale) + standard_hr) // scale)
    if kind == "blind":
        blind = recipe["blind"]
        reach = 2 * gaussian_radius(float(max(blind["blur_sigma"])) * float(max(blind["resize_factor"]))) + 8 + 2 * scale
        return -(-reach // scale)
    raise ValueError(f"unknown training kind {kind!r}; known: {', '.join(PAIR_KINDS)}")


def patch_unit(kind: str, scale: int) -> int:
    """HR pixels per input pixel of a training patch: ``scale``, or ``scale**2`` for ``ssl`` (VLR)."""
    return scale * scale if kind == "ssl" else scale


def degrade_training_patch(tile: np.ndarray, kind: str, scale: int, y: int, x: int, size: int, *, modality: str,
                           recipe: Mapping[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) of one training patch of ``tile`` (``(1, H, W)``; a memory-mapped view is
    fine: only the crop is read).

    ``(y, x)`` and ``size`` place the input patch on the tile's input grid (``patch_unit`` HR
    pixels a step). ``standard`` and ``blind``: input LR ``size``, target HR ``size * scale``;
    ``ssl``: input VLR ``size``, target that patch's LR (``size * scale``), from one draw of the
    standard degradation and then one of its own. The crop around the patch reaches
    ``patch_margin`` further (less at the tile's border, where a whole-tile degradation pads too).
    """
    unit, margin = patch_unit(kind, scale), patch_margin(kind, scale, recipe)
    rows, cols = tile.shape[1] // unit, tile.shape[2] // unit
    if size < 1 or y < 0 or x < 0 or y + size > rows or x + size > cols:
        raise ValueError(f"patch {size} at ({y}, {x}) does not fit the tile's {rows}x{cols} {kind} grid")
    top, left = max(0, y - margin), max(0, x - margin)
    bottom, right = min(rows, y + size + margin), min(cols, x + size + margin)
    crop = np.array(tile[:, top * unit:bottom * unit, left * unit:right * unit], dtype=np.float32, order="C")
    dy, dx = y - top, x - left
    noise_kind, noise_level = _noise(recipe, modality)
    if kind == "standard":
        lr = _standard(crop, scale, noise_kind, _drawn(recipe, noise_level, rng), rng)
        target = crop[:, dy * scale:(dy + size) * scale, dx * scale:(dx + size) * scale]
    elif kind == "blind":
        blind = recipe["blind"]
        lr = deg.degrade_blind(crop, scale, blur_sigma=tuple(blind["blur_sigma"]),
                               resize_factor=tuple(blind["resize_factor"]), noise_level=tuple(blind["noise_level"]),
                               jpeg_quality=tuple(blind["jpeg_quality"]), rng=rng)
        target = crop[:, dy * scale:(dy + size) * scale, dx * scale:(dx + size) * scale]
    else:  # ssl: the light CNN never sees HR while training (its seed's self-supervision)
        low = _standard(crop, scale, noise_kind, _drawn(recipe, noise_level, rng), rng)
        drawn = _drawn(recipe, noise_level, rng)
        lr = deg.degrade_vlr(low, scale, blur_sigma=drawn.blur_sigma, noise_kind=noise_kind,
                             noise_level=drawn.noise_level, rng=rng)
        target = low[:, dy * scale:(dy + size) * scale, dx * scale:(dx + size) * scale]
    return np.ascontiguousarray(lr[:, dy:dy + size, dx:dx + size]), np.ascontiguousarray(target)


# (function, items) -> results in the order of items: builtin map, a process pool's, or a Dask client's.
Mapper = Callable[[Callable[[PairSource], PairItem], list[PairSource]], Iterable[PairItem]]


def _make_pair_without_hr(source: PairSource, *, scale: int, kind: str, params: Mapping[str, Any]) -> PairItem:
    """:func:`make_pair` as a worker returns it: without the HR image (the plain crop of the stored
    tile), which the writer references in its shard. The HR is ~94% of a x4 pair's bytes: sending
    it back through the pool's pipe kept 2 workers at 1.2x."""
    return replace(make_pair(source, scale=scale, kind=kind, params=params), hr=None)


def _pairs(sources: list[PairSource], scale: int, kind: str, params: Mapping[str, Any],
           mapper: Mapper = map) -> Iterable[PairItem]:
    """The pairs of one set in order, without their HR (the writer takes it from the stored tiles).
    Calling it submits the work (a pool's map is eager); the pairs are produced as the returned
    iterable is consumed."""
    return mapper(partial(_make_pair_without_hr, scale=scale, kind=kind, params=dict(params)), sources)


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)  # the workers share the cores; each resize runs on one


@contextmanager
def parallel_mapper(workers: int = 1, dask_address: str | None = None) -> Iterator[Mapper]:
    """:func:`medsr.data.parallel.parallel_mapper` with one torch thread per local worker.

    Every pair is a pure function of its image and seed keys and results come back in input order,
    so the pair sets are byte-identical whatever runs them (tests/test_parallel_degrade.py).
    """
    if workers > 1 or dask_address:
        with parallel.parallel_mapper(workers, dask_address, initializer=_one_torch_thread) as mapper:
            yield mapper
        return
    import torch

    # One worker means one core here too: torch's intra-op threads on these small images spend more
    # CPU spinning than they save (measured in benchmarks/bench_data.py), and more so on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield map
    finally:
        torch.set_num_threads(threads)


def kinds_for(split: str, params: Mapping[str, Any]) -> list[str]:
    """The pair sets written for ``split``: the evaluation tracks on val and test, none on train
    (its pairs are degraded as training draws them, from ``train/hr``)."""
    return list(params.get("tracks", TRACKS)) if split in EVAL_SPLITS else []


TRAIN_TILES = "hr"  # data/pairs/train/hr: the training tiles
# A downscaled copy with a shorter side below this is not written: no training patch (16 LR px at x2) fits it.
MIN_COPY_SIDE = 32


def check_downscales(downscales: Iterable[float]) -> list[float]:
    """``degrade.train_downscales`` as floats, each in (0, 1); raises ValueError naming the bad value."""
    checked = []
    for factor in downscales:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 < float(factor) < 1.0:
            raise ValueError(f"degrade.train_downscales: {factor!r} is not a fraction in (0, 1) of a tile's size; "
                             f"e.g. [0.5, 0.25], or [] for the tiles as stored")
        checked.append(float(factor))
    return checked


def training_tiles(sources: Iterable[PairSource], downscales: Iterable[float]
                   ) -> Iterator[tuple[str, str, np.ndarray | TileRef]]:
    """``(id, modality, HR)`` of every training tile as stored, then of its copies at each fraction of
    ``downscales`` of its size (antialiased bicubic; id ``<id>@<fraction>``): Real-ESRGAN's multi-scale
    training set. A model then sees each anatomy at coarser pixel spacings than its training files
    have: trained on 256-px knee MR tiles alone, the SRResNet family fell 2 dB below bicubic on a
    64-px brain MR series at x2; with copies at 0.5 and 0.25 it rose to +0.8 dB."""
    factors = check_downscales(downscales)
    for source in sources:
        yield source.id, source.modality, source.tile
        if not factors:
            continue
        image = read_ref(source.tile)
        for factor in factors:
            size = (round(image.shape[1] * factor), round(image.shape[2] * factor))
            if min(size) >= MIN_COPY_SIDE:
                yield f"{source.id}@{factor:g}", source.modality, deg.resize_bicubic(image, size, antialias=True)


def build_pair_sets(table: pd.DataFrame, interim_dir: Path, out_root: Path, params: Mapping[str, Any], *,
                    workers: int | None = None, dask_address: str | None = None) -> dict[str, Any]:
    """Write ``out_root/train/hr`` (the training tiles and their ``degrade.train_downscales`` copies,
    :func:`training_tiles`, with :func:`training_recipe`) and
    ``out_root/<split>/x<scale>/<track>`` for val and test, every scale and track; returns counts.

    ``workers`` (default ``degrade.workers``, else 1) local processes degrade the images of each
    set in parallel, or the Dask cluster at ``dask_address`` (default ``degrade.dask_scheduler``)
    does; the bytes written are the same either way.
    """
    # Imported here: every pool worker imports this module, and pandas and tqdm cost each ~0.3 s of start-up.
    from tqdm.auto import tqdm

    from medsr.data.split import SPLITS

    unknown = set(params.get("tracks", TRACKS)) - set(TRACKS)
    if unknown:
        raise ValueError(f"degrade.tracks: unknown track(s) {sorted(unknown)}; known: {', '.join(TRACKS)}")
    workers = int(params.get("workers", 1) if workers is None else workers)
    if workers < 1:
        raise ValueError(f"degrade.workers must be >= 1, got {workers}")
    dask_address = dask_address or params.get("dask_scheduler") or None
    counts: dict[str, Any] = {}
    jobs = [(split, int(scale), kind) for split in SPLITS for scale in params["scales"] for kind in kinds_for(split, params)]
    sources = {split: [PairSource.of_row(interim_dir, row) for row in table[table["split"] == split].sort_values("id").itertuples()]
               for split in SPLITS}
    # Every stored tile's HR (cropped to a multiple of the scale for a pair) is referenced in its
    # shard of data/interim, which each set links: no HR is written twice. The downscaled copies are
    # the only HR written (train/hr/hr.npy).
    downscales = check_downscales(params.get("train_downscales", []))
    counts["train"] = {TRAIN_TILES: {"tiles": write_tiles(out_root / "train" / TRAIN_TILES,
                                                          training_tiles(sources["train"], downscales),
                                                          {"split": "train", "recipe": training_recipe(params),
                                                           "downscales": downscales})}}

    with parallel_mapper(workers, dask_address) as mapper:
        def submit(job: tuple[str, int, str]) -> tuple[tuple[str, int, str], Iterable[PairItem]]:
            split, scale, kind = job
            return job, _pairs(sources[split], scale, kind, params, mapper)

        # One set ahead: the workers degrade the next set while this process writes the current one
        # (memory: two sets' results at most). Sets are still written one by one, in job order.
        pending = submit(jobs[0]) if jobs else None
        for index in tqdm(range(len(jobs)), desc="degrade", unit="set"):
            assert pending is not None
            (split, scale, kind), items = pending
            pending = submit(jobs[index + 1]) if index + 1 < len(jobs) else None
            attrs = {"split": split, "kind": kind, "seed": int(params["seed"])}
            n = write_pairs(out_root / split / f"x{scale}" / kind, items, scale, attrs,
                            hr_tiles=[source.tile for source in sources[split]])
            counts.setdefault(split, {}).setdefault(f"x{scale}", {})[kind] = n
    return counts
