"""Training batches: random aligned LR/HR patches, degraded as they are drawn from the
memory-mapped training tiles (``<pairs_root>/train/hr``; :func:`medsr.data.pairing.degrade_training_patch`).

Each batch's choices (tiles, positions, kinds, augmentation) come from a generator seeded from
``(seed, step)``, and each patch's degradation from ``rng_for(seed, tile id, step, sample)``, so
the data of step ``k`` is the same whatever the number of DataLoader workers and whether the run
was resumed: a killed-and-resumed run sees exactly the batches of an uninterrupted one. Worker
``w`` of ``W`` builds the batches of steps ``w, w + W, ...`` of the run; the DataLoader returns
them in step order. Only HR tiles are stored: a patch costs its crop's degradation (the tile's
margin included), a fraction of a millisecond to a few, beside a step of tens to hundreds.

A batch is ``{"lr": (B, 1, p, p), "hr": (B, 1, p*s, p*s), "step": k, "scale": s,
"blind_fraction": f}``. One batch has one scale (the BrainSR curriculum changes it between
steps) and mixes standard and blind pairs with probability ``degradation_strength`` times the
config's ``blind_fraction``.

Data-parallel ranks (:mod:`medsr.training.dist`) each take a contiguous slice of every
batch, ``batch_size / world_size`` patches: the global batch of step ``k`` is the same whatever
the number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from medsr.data.pairing import TRAIN_TILES, degrade_training_patch, patch_unit
from medsr.data.pairs import TileSet
from medsr.degradations import TRACKS, degrade_bicubic, rng_for
from medsr.models.architectures import Curriculum


def pair_set_path(pairs_root: str | Path, split: str, scale: int, kind: str) -> Path:
    """``<pairs_root>/<split>/x<scale>/<kind>``, the layout the degrade stage writes."""
    return Path(pairs_root) / split / f"x{scale}" / kind


def tile_set_path(pairs_root: str | Path) -> Path:
    """``<pairs_root>/train/hr``: the training tiles every training kind is degraded from."""
    return Path(pairs_root) / "train" / TRAIN_TILES


FIDELITY_TRACK = "clean"  # the track whose PSNR must beat bicubic's for an adversarial checkpoint


def validation_tracks(pairs_root: str | Path, scale: int, split: str = "val") -> dict[str, Path]:
    """The evaluation tracks of ``split``: ``clean`` (antialiased bicubic only) and ``realistic``
    (blur + modality noise) when the degrade stage wrote both, else ``standard`` alone (a pair
    root from before the tracks existed)."""
    tracks = {track: pair_set_path(pairs_root, split, scale, track) for track in TRACKS}
    if all((folder / "index.json").is_file() for folder in tracks.values()):
        return tracks
    return {"standard": pair_set_path(pairs_root, split, scale, "standard")}


CLEAN_STREAM = 1  # the seed suffix of the draws that pick which patches get a clean LR


@dataclass(frozen=True)
class StepPlan:
    """What step ``k`` trains on."""

    scale: int
    blind_probability: float


class PatchBatches(IterableDataset):
    """Batches of random patches for steps ``first_step..last_step`` (inclusive)."""

    def __init__(self, pairs_root: str | Path, *, kind: str, target_scale: int, batch_size: int, lr_patch: int,
                 seed: int, first_step: int, last_step: int, total_steps: int, augment: bool = True,
                 curriculum: Curriculum | None = None, blind_fraction: float = 1.0, clean_fraction: float = 0.0,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world size {world_size} is not a valid rank")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} does not split into {world_size} equal shards")
        self.rank = rank
        self.world_size = world_size
        self.kind = kind
        self.target_scale = target_scale
        self.batch_size = batch_size
        self.seed = seed
        self.first_step = first_step
        self.last_step = last_step
        self.total_steps = total_steps
        self.augment = augment
        self.curriculum = curriculum
        if not 0.0 <= blind_fraction <= 1.0:
            raise ValueError(f"blind_fraction must be in [0, 1], got {blind_fraction}")
        self.blind_fraction = blind_fraction
        if not 0.0 <= clean_fraction <= 1.0:
            raise ValueError(f"clean_fraction must be in [0, 1], got {clean_fraction}")
        self.clean_fraction = clean_fraction
        # The curriculum trains on standard and blind pairs at x2 and at the target scale; a
        # blind-trained model may mix in standard pairs so its blind range covers the mild end too.
        if curriculum is None and kind == "blind" and blind_fraction < 1.0:
            wanted = [(target_scale, "standard"), (target_scale, "blind")]
        elif curriculum is None:
            wanted = [(target_scale, kind)]
        else:
            wanted = [(s, k) for s in sorted({2, target_scale}) for k in ("standard", "blind")]
        self.tiles = TileSet(tile_set_path(pairs_root))
        if len(self.tiles) == 0:
            raise ValueError(f"{self.tiles.folder}: tile set is empty; nothing to train on")
        self.recipe: dict[str, Any] = self.tiles.attrs.get("recipe") or {}
        if not self.recipe:
            raise ValueError(f"{self.tiles.folder}: no training recipe in its index; rerun `dvc repro degrade`")
        # One patch side for every batch, so patches stack: tiles smaller than the patch are left
        # out (a 64-px MRI frame's VLR at x4 is 4 px); only if a kind has none large enough does the
        # patch shrink to fit every tile.
        self.lr_patch = lr_patch
        self.eligible = {key: [i for i, p in enumerate(self.tiles.pairs) if min(self._grid(p, *key)) >= lr_patch]
                         for key in wanted}
        if not all(self.eligible.values()):
            self.lr_patch = min(lr_patch, min(min(self._grid(p, *key)) for key in wanted for p in self.tiles.pairs))
            self.eligible = {key: list(range(len(self.tiles))) for key in wanted}
        if self.lr_patch < 1:
            raise ValueError(f"{self.tiles.folder}: a tile is smaller than one input pixel at {wanted}")

    @staticmethod
    def _grid(tile: dict[str, Any], scale: int, kind: str) -> tuple[int, int]:
        """The tile's size in input pixels of ``kind`` at ``scale`` (LR; VLR for ssl)."""
        unit = patch_unit(kind, scale)
        return tile["hr_shape"][0] // unit, tile["hr_shape"][1] // unit

    def plan(self, step: int) -> StepPlan:
        """Scale and blind-pair probability of ``step`` (1-based)."""
        if self.curriculum is None:
            return StepPlan(self.target_scale, self.blind_fraction if self.kind == "blind" else 0.0)
        progress = (step - 1) / max(self.total_steps - 1, 1)
        stage = self.curriculum(progress, self.target_scale)
        # blind_fraction caps the curriculum's end point: the model is judged on standard pairs too.
        return StepPlan(int(stage["scale"]), float(stage["degradation_strength"]) * self.blind_fraction)

    def batch(self, step: int) -> dict[str, Any]:
        """This rank's shard of the batch of ``step``; a pure function of ``(seed, step, rank,
        world_size)``, and the shards of all ranks, concatenated in rank order, are the batch one
        process gets (:meth:`global_batch`)."""
        full = self.global_batch(step)
        if self.world_size == 1:
            return full
        size = self.batch_size // self.world_size
        shard = slice(self.rank * size, (self.rank + 1) * size)
        return {**full, "lr": full["lr"][shard].contiguous(), "hr": full["hr"][shard].contiguous()}

    def global_batch(self, step: int) -> dict[str, Any]:
        """The whole batch of ``step``, a pure function of ``(seed, step)``. Every rank draws all of
        it: the random draws of sample ``i`` follow those of samples ``0..i-1`` in one generator,
        and a patch costs little next to the step that trains on it."""
        rng = np.random.default_rng([self.seed, step])
        # Its own stream: the patches drawn are the same whatever clean_fraction is; only their LR changes.
        clean = np.random.default_rng([self.seed, step, CLEAN_STREAM]).random(self.batch_size) < self.clean_fraction
        plan = self.plan(step)
        lr_batch, hr_batch = [], []
        blind_count = 0
        for _ in range(self.batch_size):
            mixing = self.curriculum is not None or (self.kind == "blind" and self.blind_fraction < 1.0)
            blind = mixing and rng.random() < plan.blind_probability
            kind = "blind" if blind else ("standard" if mixing else self.kind)
            blind_count += kind == "blind"
            eligible = self.eligible[(plan.scale, kind)]
            index = eligible[int(rng.integers(len(eligible)))]
            tile = self.tiles.pairs[index]
            rows, cols = self._grid(tile, plan.scale, kind)
            y, x = int(rng.integers(0, rows - self.lr_patch + 1)), int(rng.integers(0, cols - self.lr_patch + 1))
            # Its own generator per (seed, tile, step, sample): a patch's noise does not depend on
            # what the worker drew before it, so any number of workers gives the same bytes.
            lr, hr = degrade_training_patch(self.tiles.hr_view(index), kind, plan.scale, y, x, self.lr_patch,
                                            modality=tile["modality"], recipe=self.recipe,
                                            rng=rng_for(self.seed, tile["id"], step, len(lr_batch)))
            if clean[len(lr_batch)]:
                lr = degrade_bicubic(np.ascontiguousarray(hr), plan.scale)  # the clean track's operator, on the patch
            if self.augment:
                turns, flip = int(rng.integers(4)), bool(rng.integers(2))
                lr, hr = np.rot90(lr, turns, axes=(1, 2)), np.rot90(hr, turns, axes=(1, 2))
                if flip:
                    lr, hr = lr[:, :, ::-1], hr[:, :, ::-1]
            lr_batch.append(np.ascontiguousarray(lr))
            hr_batch.append(np.ascontiguousarray(hr))
        return {
            "lr": torch.from_numpy(np.stack(lr_batch)),
            "hr": torch.from_numpy(np.stack(hr_batch)),
            "step": step,
            "scale": plan.scale,
            "blind_fraction": blind_count / self.batch_size,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(self.first_step + worker, self.last_step + 1, workers):
            yield self.batch(step)
