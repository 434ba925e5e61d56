"""Fine-tuning a published network without losing what it knows, and the noise-gated choice.

Networks trained on natural images are far ahead of MedSR's on clean input and fall apart on
noisy input; fine-tuned on MedSR's ``standard`` pairs (clean to twice the realistic noise) they
learn the noise and give back part of the clean quality. The tools here are the usual ways of
keeping the starting point (each measured on validation by ``benchmarks/bench_pretrained.py``):

* ``clean_fraction``: an extra share of training samples whose LR is the clean degradation
  (antialiased bicubic, the clean track's operator) of the HR patch, so the clean end of the range
  keeps being rehearsed;
* ``l2sp_weight``: L2-SP (Li et al., "Explicit Inductive Bias for Transfer Learning with
  Convolutional Networks", ICML 2018), ``alpha / 2 * sum ||w - w0||^2`` towards the published
  weights ``w0``. With Adam a weight stops drifting where ``alpha * |w - w0|`` matches its loss
  gradient (about 1e-4 per weight for RLFN on L1), so alpha 0.1 holds weights within ~1e-3;
* ``ema_decay``: the exponential moving average of the weights is what is kept;
* ``freeze``: trunk submodules (by name prefix, e.g. ``conv_1``, ``block_1``) left at the
  published weights.

Two choices need no training: :func:`interpolated` takes weights part of the way from the published
to the fine-tuned ones (WiSE-FT: Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR
2022), and, instead of one network for every input, :func:`noise_gated` uses the published network where
the input is clean and the fine-tuned one where it is noisy (:class:`medsr.models.gated.NoiseGated`,
the module the pipeline trains and serves with the ``noise_gate`` model option).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsr.degradations import TRACKS
from medsr.inference import predict_image
from medsr.models.gated import NoiseGated
from medsr.ops import bicubic_downsample
from medsr.training.data import PatchBatches
from medsr.training.trainer import ema_update


@dataclass(frozen=True)
class FineTuneSettings:
    """One fine-tuning recipe (module docstring); ``loss`` is ``l1`` or ``mse``."""

    steps: int = 600
    learning_rate: float = 5e-5
    batch_size: int = 8
    lr_patch: int = 32
    loss: str = "l1"
    clean_fraction: float = 0.0
    l2sp_weight: float = 0.0
    ema_decay: float | None = None
    freeze: tuple[str, ...] = ()
    seed: int = 1234
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr_patch < 1:
            raise ValueError(f"steps, batch_size and lr_patch must be positive, got {self}")
        if self.loss not in ("l1", "mse"):
            raise ValueError(f"loss must be l1 or mse, got {self.loss!r}")
        if not 0.0 <= self.clean_fraction <= 1.0:
            raise ValueError(f"clean_fraction must be in [0, 1], got {self.clean_fraction}")
        if self.l2sp_weight < 0:
            raise ValueError(f"l2sp_weight must be >= 0, got {self.l2sp_weight}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "freeze": list(self.freeze)}


def clean_lr(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """The clean track's LR of an HR batch: antialiased bicubic down by ``scale``, clipped to [0, 1]
    (:func:`medsr.degradations.degrade_bicubic`'s operator, batched)."""
    return bicubic_downsample(hr, scale).clamp_(0.0, 1.0)


def l2sp_penalty(model: nn.Module, anchor: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``1/2 * sum ||w - w0||^2`` over the trainable parameters (``anchor``: w0 by name)."""
    total = torch.zeros(())
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            total = total + (parameter - anchor[name]).square().sum()
    return 0.5 * total


def _freeze(model: nn.Module, prefixes: Sequence[str]) -> int:
    """Stop the gradient of every parameter under ``trunk.<prefix>``; returns how many tensors."""
    frozen = 0
    for name, parameter in model.named_parameters():
        if any(name.startswith(f"trunk.{prefix}.") for prefix in prefixes):
            parameter.requires_grad_(False)
            frozen += 1
    if prefixes and not frozen:
        raise ValueError(f"freeze {list(prefixes)}: no parameter of the trunk starts with these names")
    return frozen


def fine_tune(start: nn.Module, pairs_root: Path, scale: int, settings: FineTuneSettings, *,
              snapshots: Sequence[int] = (), kind: str = "standard",
              log: Callable[[str], None] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Fine-tune a copy of ``start`` on ``train/x<scale>/<kind>`` pairs; ``start`` is not changed.

    Returns state dicts at every step in ``snapshots`` and at the last step, named ``step<k>``;
    with ``ema_decay`` also the average, ``step<k>-ema`` (one run measures both).
    """
    model = copy.deepcopy(start).train()
    anchor = {name: p.detach().clone() for name, p in model.named_parameters()}
    _freeze(model, settings.freeze)
    averaged = copy.deepcopy(model).eval() if settings.ema_decay is not None else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(trainable, lr=settings.learning_rate)
    batches = PatchBatches(pairs_root, kind=kind, target_scale=scale, batch_size=settings.batch_size,
                           lr_patch=settings.lr_patch, seed=settings.seed, first_step=1, last_step=settings.steps,
                           total_steps=settings.steps)
    rng = np.random.default_rng([settings.seed, 7])
    pixel_loss = F.l1_loss if settings.loss == "l1" else F.mse_loss
    kept: dict[str, dict[str, torch.Tensor]] = {}
    wanted = set(snapshots) | {settings.steps}
    started = time.perf_counter()
    for batch in batches:
        step, lr, hr = batch["step"], batch["lr"], batch["hr"]
        if settings.clean_fraction > 0:
            swap = torch.from_numpy(rng.random(lr.shape[0]) < settings.clean_fraction)
            if bool(swap.any()):
                lr = torch.where(swap.view(-1, 1, 1, 1), clean_lr(hr, scale), lr)
        loss = pixel_loss(model(lr), hr)
        if settings.l2sp_weight > 0:
            loss = loss + settings.l2sp_weight * l2sp_penalty(model, anchor)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
        optimiser.step()
        if averaged is not None:
            with torch.no_grad():
                ema_update(averaged, model, settings.ema_decay)
        if step in wanted:
            kept[f"step{step}"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if averaged is not None:
                kept[f"step{step}-ema"] = {k: v.detach().clone() for k, v in averaged.state_dict().items()}
            if log is not None:
                log(f"step {step}/{settings.steps}: loss {float(loss.detach()):.5f}, "
                    f"{time.perf_counter() - started:.0f} s")
    return kept


@dataclass(frozen=True)
class NoiseGate:
    """The gate's settings (:class:`medsr.models.gated.NoiseGated`): the published network's share
    is ``1 / (1 + (sigma / threshold)^exponent)`` of the LR's estimated noise (the consistency step's shape)."""

    threshold: float = 0.005
    exponent: float = 8.0


def noise_gated(published: nn.Module, tuned: nn.Module, gate: NoiseGate) -> NoiseGated:
    """The gated pair of copies of ``published`` and ``tuned`` (the module the pipeline trains and
    serves), in eval mode; the arguments are not changed (the pair freezes its published copy)."""
    return NoiseGated(copy.deepcopy(published), copy.deepcopy(tuned),
                      threshold=gate.threshold, exponent=gate.exponent).eval()


def interpolated(start: nn.Module, tuned: nn.Module, alpha: float) -> nn.Module:
    """A copy of ``start`` with weights ``w0 + alpha * (w_tuned - w0)`` (buffers from ``start``), eval mode."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    model = copy.deepcopy(start)
    tuned_state = tuned.state_dict()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.add_(alpha * (tuned_state[name] - parameter))
    return model.eval()


def score_predictors(predictors: Mapping[str, Callable[[np.ndarray], np.ndarray]], pairs_root: Path, scale: int,
                     split: str, tracks: Sequence[str], max_per_modality: int | None = None) -> list[dict[str, Any]]:
    """The benchmark's rows (:func:`medsr.evaluation.summarize`: per track and modality and ``all``,
    ``gain_db`` over bicubic, ``images``) of each named LR -> SR predictor on ``split``'s whole images."""
    from medsr.benchmark import held_out_images
    from medsr.evaluation import evaluate_images, summarize
    from medsr.models import build_generator

    baseline = build_generator("bicubic", scale)

    def all_outputs(lr: np.ndarray) -> dict[str, np.ndarray]:
        return {"bicubic": predict_image(baseline, lr), **{name: p(lr) for name, p in predictors.items()}}

    records: list[dict[str, Any]] = []
    for track in tracks:
        records += evaluate_images(all_outputs, held_out_images(pairs_root, split, scale, track, {}, max_per_modality),
                                   scale)
    return summarize(records)


def all_row_gains(rows: Sequence[Mapping[str, Any]], model: str) -> dict[str, dict[str, Any]]:
    """``{track: {"gain_db", "images"}}`` of ``model``'s ``all`` rows (what the recipes are chosen on)."""
    return {r["track"]: {"gain_db": r["gain_db"], "images": r["images"]}
            for r in rows if r["model"] == model and r["modality"] == "all"}


def fine_tune_cached(start: nn.Module, pairs_root: Path, scale: int, settings: FineTuneSettings,
                     snapshots: Sequence[int], cache: Path, *,
                     log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """:func:`fine_tune`, its state dicts saved as ``cache/<snapshot>.pt`` beside ``settings.json``;
    a cache made with the same settings and snapshots is reused (experiments cost minutes each)."""
    import json

    recipe = {"settings": settings.as_dict(), "snapshots": sorted(set(snapshots))}
    marker = cache / "settings.json"
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return {path.stem: path for path in sorted(cache.glob("*.pt"))}
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob("*.pt"):
        stale.unlink()
    kept = fine_tune(start, pairs_root, scale, settings, snapshots=snapshots, log=log)
    paths = {}
    for name, state in kept.items():
        paths[name] = cache / f"{name}.pt"
        torch.save(state, paths[name])
    marker.write_text(json.dumps(recipe))
    return paths


def with_weights(start: nn.Module, state_path: Path) -> nn.Module:
    """A copy of ``start`` holding the state dict saved at ``state_path`` (strictly), in eval mode."""
    model = copy.deepcopy(start)
    model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


# --------------------------------------------------------------------------- the report of bench_pretrained

CLEAN_TOLERANCE_DB = 0.1    # shipped may lose at most this to the published network on the clean track
NOISY_MARGIN_DB = 0.5       # and must beat the scratch champion by at least this on the realistic track
WISE_ALPHAS = (0.75, 0.875)  # weight-space interpolations tried as the gate's noisy branch (0.5: -1.5 dB on noisy val)


def _remember_last(predict: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``predict`` that returns its previous result when called again on the same array object: a
    variant and the same variant plus the consistency step are scored on one image back to back."""
    last: list[Any] = [None, None]

    def remembered(lr: np.ndarray) -> np.ndarray:
        if last[0] is not lr:
            last[0], last[1] = lr, predict(lr)
        return last[1]

    return remembered


def choose_shipped(val_gains: Mapping[str, Mapping[str, Mapping[str, Any]]], names: Sequence[str]) -> str:
    """Among ``names``: the best val realistic gain of those within CLEAN_TOLERANCE_DB of the
    published network's val clean gain; if none is, the best val clean gain."""
    floor = float(val_gains["published"]["clean"]["gain_db"]) - CLEAN_TOLERANCE_DB
    keep = [n for n in names if float(val_gains[n]["clean"]["gain_db"]) >= floor]
    if keep:
        return max(keep, key=lambda n: float(val_gains[n]["realistic"]["gain_db"]))
    return max(names, key=lambda n: float(val_gains[n]["clean"]["gain_db"]))


def _mean_gain(gains: Mapping[str, Mapping[str, Any]]) -> float:
    return sum(float(g["gain_db"]) for g in gains.values()) / max(len(gains), 1)


def champion_rows(benchmark: Mapping[str, Any], model: str, scale: int) -> list[dict[str, Any]]:
    """The pipeline benchmark's rows of ``model`` at ``scale`` as served (with the consistency step):
    ``validation`` for val, ``results`` for test."""
    rows = []
    for split, key in (("val", "validation"), ("test", "results")):
        for r in benchmark[key]:
            if r["model"] == model and r["scale"] == scale and r["consistency"]:
                rows.append({"split": split, "track": r["track"], "modality": r["modality"],
                             "gain_db": r["gain_db"], "images": r["images"]})
    return rows


def pretrained_report(scales: Sequence[int], weights: Path, checks: list[dict[str, Any]], cache: Path,
                      pairs_root: Path, benchmark_json: Path, *, champions: Mapping[int, str],
                      architecture: str = "rlfn", zero_shot: Sequence[tuple[str, int]] = (("span", 4), ("rfdn", 4)),
                      gate: NoiseGate = NoiseGate(), consistency: Any = None) -> dict[str, Any]:
    """Choose on validation, then score val and test: the rows of ``benchmarks/results/pretrained.json``.

    ``fine_tuned``: the experiment snapshot with the best mean val ``all`` gain over both tracks.
    ``shipped``: a noise-gated pair (published on clean input; on noisy input the best-realistic
    snapshot, or a WiSE-FT interpolation towards it), with or without the consistency step on top,
    chosen by :func:`choose_shipped` on val. The scratch champion's rows come from ``benchmark_json``.
    """
    import json

    from medsr.consistency import ConsistencySettings, refine
    from medsr.pretrained import KNOWN_CHECKPOINTS, load_published

    consistency = consistency or ConsistencySettings(steps=5, noise_threshold=0.005, noise_exponent=8)
    benchmark = json.loads(benchmark_json.read_text())
    tracks = TRACKS
    rows: list[dict[str, Any]] = []
    choices: dict[str, Any] = {}
    experiments_out: list[dict[str, Any]] = []

    def add(split: str, scale: int, arch: str, variant: str, scored: Sequence[Mapping[str, Any]], model: str) -> None:
        for r in scored:
            if r["model"] == model:
                rows.append({"split": split, "scale": scale, "track": r["track"], "modality": r["modality"],
                             "architecture": arch, "variant": variant, "gain_db": r["gain_db"],
                             "images": r["images"], "psnr": r.get("psnr"), "bicubic_psnr": r.get("bicubic_psnr"),
                             "ssim_gain": r.get("ssim_gain")})

    for scale in scales:
        start = load_published(architecture, scale, weights / KNOWN_CHECKPOINTS[(architecture, scale)].file).eval()
        experiments = json.loads((cache / f"x{scale}" / "experiments.json").read_text())
        experiments_out += experiments

        def network(entry: Mapping[str, Any]) -> nn.Module:
            return with_weights(start, cache / f"x{scale}" / entry["recipe"] / f"{entry['snapshot']}.pt")

        fine = max(experiments, key=lambda e: _mean_gain(e["val"]))
        noisy = max(experiments, key=lambda e: e["val"]["realistic"]["gain_db"])
        tuned, noisy_net = network(fine), network(noisy)
        # The gate's noisy branch: the best-realistic snapshot, or part of the way to it (WiSE-FT).
        branches = {f"{noisy['candidate']}": noisy_net,
                    **{f"{noisy['candidate']}*{a}": interpolated(start, noisy_net, a) for a in WISE_ALPHAS}}
        as_published = _remember_last(lambda lr: predict_image(start, lr))
        candidates: dict[str, Callable[[np.ndarray], np.ndarray]] = {
            "published": as_published,
            "fine_tuned": lambda lr: predict_image(tuned, lr),
            "published+consistency": lambda lr: refine(as_published(lr), lr, scale, consistency),
        }
        gated_names = []
        for branch, net in branches.items():
            gated = _remember_last(lambda lr, pair=noise_gated(start, net, gate): predict_image(pair, lr))
            candidates[f"gated[{branch}]"] = gated
            candidates[f"gated[{branch}]+consistency"] = (
                lambda lr, g=gated: refine(g(lr), lr, scale, consistency))
            gated_names += [f"gated[{branch}]", f"gated[{branch}]+consistency"]
        val = score_predictors(candidates, pairs_root, scale, "val", tracks)
        val_gains = {name: all_row_gains(val, name) for name in candidates}
        shipped = choose_shipped(val_gains, gated_names)
        choices[f"x{scale}"] = {"fine_tuned": fine["candidate"], "gate_noisy_branch": noisy["candidate"],
                                "gate": asdict(gate), "consistency": consistency.as_dict(),
                                "shipped": shipped, "val_all_gains": val_gains}
        for split in ("val", "test"):
            scored = val if split == "val" else score_predictors(
                {k: candidates[k] for k in ("published", "fine_tuned", shipped)}, pairs_root, scale, "test", tracks)
            add(split, scale, architecture, "published", scored, "published")
            add(split, scale, architecture, "fine_tuned", scored, "fine_tuned")
            add(split, scale, architecture, "shipped", scored, shipped)
        champion = champions[scale]
        rows += [{"scale": scale, "architecture": champion, "variant": "scratch_champion", **r}
                 for r in champion_rows(benchmark, champion, scale)]
        choices[f"x{scale}"]["targets"] = targets(rows, scale, architecture)
    for arch, scale in zero_shot:
        if scale not in scales:
            continue
        network = load_published(arch, scale, weights / KNOWN_CHECKPOINTS[(arch, scale)].file).eval()
        for split in ("val", "test"):
            scored = score_predictors({"published": lambda lr, n=network: predict_image(n, lr)}, pairs_root,
                                      scale, split, tracks)
            add(split, scale, arch, "published", scored, "published")
    return {"definition": "gain_db: PSNR over bicubic on the same images (medsr.evaluation.summarize, the "
                          "benchmark's scoring), images: how many images behind each number; fine_tuned and "
                          "shipped chosen on val alone; scratch_champion from metrics/benchmark.json (served, "
                          "with the consistency step).",
            "checkpoints": checks, "rows": rows, "choices": choices, "experiments": experiments_out}


def targets(rows: Sequence[Mapping[str, Any]], scale: int, architecture: str) -> dict[str, Any]:
    """Per split: shipped minus published on clean (>= -CLEAN_TOLERANCE_DB) and shipped minus the
    scratch champion on realistic (>= NOISY_MARGIN_DB), in the ``all`` rows."""
    def gain(split: str, track: str, variant: str) -> float:
        return next(float(r["gain_db"]) for r in rows if r["split"] == split and r["scale"] == scale
                    and r["track"] == track and r["modality"] == "all" and r["variant"] == variant
                    and (variant == "scratch_champion" or r["architecture"] == architecture))

    out = {}
    for split in ("val", "test"):
        clean = gain(split, "clean", "shipped") - gain(split, "clean", "published")
        noisy = gain(split, "realistic", "shipped") - gain(split, "realistic", "scratch_champion")
        out[split] = {"clean_vs_published_db": round(clean, 4), "realistic_vs_scratch_champion_db": round(noisy, 4),
                      "met": clean >= -CLEAN_TOLERANCE_DB and noisy >= NOISY_MARGIN_DB}
    return out


def markdown_tables(report: Mapping[str, Any]) -> str:
    """The ``all`` rows of a pretrained report as markdown: per scale and split, gain over bicubic in
    dB with the number of images beside every number; then the validation experiments."""
    rows = [r for r in report["rows"] if r["modality"] == "all"]
    lines = []
    for scale in sorted({r["scale"] for r in rows}):
        lines += [f"x{scale}, gain over bicubic in dB (n = images)", "",
                  "| split | architecture | variant | clean | realistic |", "|---|---|---|---:|---:|"]
        for split in ("val", "test"):
            cells: dict[tuple[str, str], dict[str, Any]] = {}
            for r in rows:
                if r["scale"] == scale and r["split"] == split:
                    cells.setdefault((r["architecture"], r["variant"]), {})[r["track"]] = r
            for (arch, variant), by_track in cells.items():
                text = [f"{by_track[t]['gain_db']:+.2f} (n={by_track[t]['images']})" if t in by_track else "-"
                        for t in TRACKS]
                lines.append(f"| {split} | {arch} | {variant} | {text[0]} | {text[1]} |")
        lines.append("")
    lines += ["Validation experiments (RLFN fine-tuned on the `standard` pairs; `all` rows)", "",
              "| scale | recipe @ snapshot | clean | realistic |", "|---|---|---:|---:|"]
    for e in report.get("experiments", []):
        v = e["val"]
        lines.append(f"| x{e['scale']} | {e['candidate']} | {v['clean']['gain_db']:+.2f} (n={v['clean']['images']}) "
                     f"| {v['realistic']['gain_db']:+.2f} (n={v['realistic']['images']}) |")
    for scale, choice in report.get("choices", {}).items():
        lines += ["", f"{scale} variants on val (`all`): " + "; ".join(
            f"{name} {g['clean']['gain_db']:+.2f} / {g['realistic']['gain_db']:+.2f}"
            for name, g in choice["val_all_gains"].items())]
    return "\n".join(lines) + "\n"
