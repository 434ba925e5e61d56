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

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsr import degradations as deg
from medsr.data import parallel
from medsr.data.pairs import PairItem, write_pairs

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
    array: str


def make_pair(source: PairSource, *, interim_dir: Path, scale: int, kind: str, params: Mapping[str, Any]) -> PairItem:
    """One pair of ``kind`` for one image: a pure function of the image and ``rng_for(seed, id, scale, kind)``."""
    seed = int(params["seed"])
    image = np.load(Path(interim_dir) / source.array, allow_pickle=False)
    rng = deg.rng_for(seed, source.id, scale, kind)
    noise_kind, noise_level = _noise(params, source.modality)
    if kind == "ssl":
        # VLR -> LR pairs: the light CNN never sees HR while training (its seed's self-supervision).
        # LR is this image's `standard` LR (same key, same bytes); VLR draws its own degradation.
        hr = deg.crop_to_multiple(image, scale * scale)
        lr_rng = deg.rng_for(seed, source.id, scale, "standard")
        lr = _standard(hr, scale, noise_kind, _drawn(params, noise_level, lr_rng), lr_rng)
        drawn = _drawn(params, noise_level, rng)
        vlr = deg.degrade_vlr(lr, scale, blur_sigma=drawn.blur_sigma, noise_kind=noise_kind,
                              noise_level=drawn.noise_level, rng=rng)
        return PairItem(source.id, source.modality, hr=lr, lr=vlr, degradation=drawn.as_dict())
    hr = deg.crop_to_multiple(image, scale)
    if kind == "standard":
        drawn = _drawn(params, noise_level, rng)
        return PairItem(source.id, source.modality, hr=hr, lr=_standard(hr, scale, noise_kind, drawn, rng),
                        degradation=drawn.as_dict())
    if kind in TRACKS:
        drawn = track_parameters(kind, noise_level, params)
        return PairItem(source.id, source.modality, hr=hr, lr=track_lr(hr, scale, kind, modality=source.modality,
                                                                       key=source.id, degrade_params=params),
                        degradation=drawn.as_dict())
    blind = params["blind"]
    lr = deg.degrade_blind(hr, scale, blur_sigma=tuple(blind["blur_sigma"]), resize_factor=tuple(blind["resize_factor"]),
                           noise_level=tuple(blind["noise_level"]), jpeg_quality=tuple(blind["jpeg_quality"]), rng=rng)
    return PairItem(source.id, source.modality, hr=hr, lr=lr)


# (function, items) -> results in the order of items: builtin map, a process pool's, or a Dask client's.
Mapper = Callable[[Callable[[PairSource], PairItem], list[PairSource]], Iterable[PairItem]]


def _make_pair_without_hr(source: PairSource, *, interim_dir: Path, scale: int, kind: str,
                          params: Mapping[str, Any]) -> PairItem:
    """:func:`make_pair` as a worker returns it: without the HR image when that is the plain crop
    of the stored image (every kind but ``ssl``), which the writing process reads itself or shares
    with an earlier set. The HR is ~94% of a x4 pair's bytes: sending it back through the pool's
    pipe kept 2 workers at 1.2x."""
    item = make_pair(source, interim_dir=interim_dir, scale=scale, kind=kind, params=params)
    return item if kind == "ssl" else replace(item, hr=None)


def _with_hr(item: PairItem, source: PairSource, interim_dir: Path, scale: int) -> PairItem:
    if item.hr is not None:
        return item
    image = np.load(Path(interim_dir) / source.array, allow_pickle=False)
    return replace(item, hr=deg.crop_to_multiple(image, scale))  # the crop make_pair degraded


def _pairs(rows: pd.DataFrame, interim_dir: Path, scale: int, kind: str, params: Mapping[str, Any],
           mapper: Mapper = map, *, with_hr: bool = True) -> Iterable[PairItem]:
    """The pairs of one set in row order. Calling it submits the work (a pool's map is eager); the
    pairs are produced as the returned iterable is consumed. ``with_hr=False``: a pool's pairs of
    kinds other than ``ssl`` come without HR (the writer shares an earlier set's)."""
    sources = [PairSource(str(r.id), str(r.modality), str(r.array)) for r in rows.itertuples()]
    if mapper is map:  # in-process: nothing to send, and builtin map stays lazy
        return map(partial(make_pair, interim_dir=Path(interim_dir), scale=scale, kind=kind, params=dict(params)),
                   sources)
    results = mapper(partial(_make_pair_without_hr, interim_dir=Path(interim_dir), scale=scale, kind=kind,
                             params=dict(params)), sources)
    if not with_hr:
        return results
    return (_with_hr(item, source, Path(interim_dir), scale) for item, source in zip(results, sources))


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
    """The pair kinds written for ``split``: training kinds everywhere, evaluation tracks on val and test."""
    kinds = [k for k in PAIR_KINDS if k != "ssl" or params.get("ssl", True)]
    return kinds + (list(params.get("tracks", TRACKS)) if split in EVAL_SPLITS else [])


def build_pair_sets(table: pd.DataFrame, interim_dir: Path, out_root: Path, params: Mapping[str, Any], *,
                    workers: int | None = None, dask_address: str | None = None) -> dict[str, Any]:
    """Write ``out_root/<split>/x<scale>/<kind>`` for every split, scale and kind; returns counts.

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
    # Every kind but ssl pairs its LR with the same HR (make_pair: the stored image cropped to a
    # multiple of the scale), so a split and scale's HR is written once and the other sets link it.
    hr_owner = {(split, scale): kind for split, scale, kind in reversed(jobs) if kind != "ssl"}  # the first kind

    def hr_like(split: str, scale: int, kind: str) -> Path | None:
        owner = hr_owner.get((split, scale))
        return None if kind in ("ssl", owner) else out_root / split / f"x{scale}" / owner

    with parallel_mapper(workers, dask_address) as mapper:
        def submit(job: tuple[str, int, str]) -> tuple[tuple[str, int, str], Iterable[PairItem]]:
            split, scale, kind = job
            rows = table[table["split"] == split].sort_values("id")
            return job, _pairs(rows, interim_dir, scale, kind, params, mapper, with_hr=hr_like(*job) is None)

        # One set ahead: the workers degrade the next set while this process writes the current one
        # (memory: two sets' results at most). Sets are still written one by one, in job order.
        pending = submit(jobs[0]) if jobs else None
        for index in tqdm(range(len(jobs)), desc="degrade", unit="set"):
            assert pending is not None
            (split, scale, kind), items = pending
            pending = submit(jobs[index + 1]) if index + 1 < len(jobs) else None
            attrs = {"split": split, "kind": kind, "seed": int(params["seed"])}
            n = write_pairs(out_root / split / f"x{scale}" / kind, items, scale, attrs, hr_like=hr_like(split, scale, kind))
            counts.setdefault(split, {}).setdefault(f"x{scale}", {})[kind] = n
    return counts
