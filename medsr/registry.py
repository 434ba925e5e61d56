"""The model registry: one MLflow registered model per scale (``medsr-x2``, ``medsr-x4``), with the
aliases ``champion`` (what serving loads: ``models:/medsr-x4@champion``) and ``challenger``.

After the benchmark, :func:`register_stage` picks the best model of each scale:

* **selection** (validation split): the highest mean PSNR gain over bicubic across modalities,
  among models that beat the honest baseline ``bicubic+consistency`` (bicubic followed by the
  same consistency step, which any image gets for free) on every validation cell by more than
  ``-registry.max_modality_loss_db`` (0 by default: strictly better, SSIM no worse). A model
  whose only "gain" is the consistency step is refused. Selecting on validation keeps the test
  split for the decision.
* **registration**: a new version of ``medsr-x<scale>`` (or the existing one, when the same
  training run is registered again), tagged with the model name, params hash, data version, git
  commit, when it was trained, cost (parameters, MACs, CPU latency) and the benchmark numbers
  per modality (``test.<modality>.psnr`` ...); its model card (markdown) is the version's
  description and an artifact of the decision run.
* **decision** (test split): the champion alias moves to the new version only if its mean test
  gain over bicubic beats the champion's by ``registry.min_gain_db``; otherwise it gets the
  ``challenger`` alias. Both are scored on the *same* test split: when the champion's numbers
  were measured on another data version, the champion is re-evaluated on the current test pairs
  first. Every decision is an MLflow run (experiment ``registry.experiment``) with the numbers
  compared, and is written to ``metrics/register.json``.

MLflow aliases are used throughout; the deprecated model stages are not.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import statistics
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsr.atomic import write_json
from medsr.params import section
from medsr.stage_entry import METRICS_DIR, PAIRS_DIR

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
REGISTER_METRICS = METRICS_DIR / "register.json"
# Scores are kept per cell "<track>/<modality>" (clean and realistic tracks, docs/metrics-and-consistency.md).
DESCRIPTION_LIMIT = 4800  # MLflow stores a version description in a 5000-character column


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message is one line that says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class RegistrySettings:
    """The ``registry:`` section of params.yaml."""

    model_names: dict[int, str]
    min_gain_db: float
    max_modality_loss_db: float
    experiment: str
    min_images_per_modality: int = 1

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RegistrySettings:
        cfg = section(dict(params), "registry")
        names = {int(str(key).lstrip("x")): str(value) for key, value in (cfg.get("model_names") or {}).items()}
        return cls(model_names=names, min_gain_db=float(cfg.get("min_gain_db", 0.0)),
                   max_modality_loss_db=float(cfg.get("max_modality_loss_db", 0.0)),
                   experiment=str(cfg.get("experiment", "medsr-registry")),
                   min_images_per_modality=int(cfg.get("min_images_per_modality", 1)))

    def name_for(self, scale: int) -> str:
        """The registered model of ``scale`` (``registry.model_names.x<scale>``, else ``medsr-x<scale>``)."""
        return self.model_names.get(int(scale), f"medsr-x{int(scale)}")

    def scale_of(self, name: str) -> int:
        for scale, registered in self.model_names.items():
            if registered == name:
                return scale
        if name.startswith("medsr-x") and name[len("medsr-x"):].isdigit():
            return int(name[len("medsr-x"):])
        raise RegistryError(f"{name!r} is not a registered model of this project: use one of "
                            f"{', '.join(sorted(self.model_names.values()))}")


# ---------------------------------------------------------------------------------------------
# Tracking store: reachability and a client


def redact_uri(uri: str) -> str:
    """``uri`` without a password (database URIs carry one; messages and logs must not)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_tracking_reachable(uri: str | None = None, timeout_seconds: float = 5.0) -> str:
    """Fail fast, in one line, when the tracking store cannot be reached; returns the URI.

    Without this an unreachable HTTP server costs minutes of the MLflow client's own retries
    before a long traceback.
    """
    from medsr import tracking

    uri = uri or tracking.tracking_uri()
    scheme = urllib.parse.urlsplit(uri).scheme.split("+")[0]
    hint = "start it (`make mlflow-ui` serves the embedded store) or unset MLFLOW_TRACKING_URI to use the embedded mlflow.db"
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_seconds) as response:
                if response.status != 200:
                    raise RegistryError(f"MLflow tracking server {redact_uri(uri)} answered HTTP {response.status} to /health: {hint}")
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise RegistryError(f"MLflow tracking server {redact_uri(uri)} is unreachable ({reason}): {hint}") from None
    elif scheme in ("postgresql", "mysql", "mssql"):
        import sqlalchemy

        connect_args = {"connect_timeout": int(timeout_seconds)} if scheme in ("postgresql", "mysql") else {}
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
        try:
            with engine.connect():
                pass
        except Exception as err:  # the driver's own error classes differ per database
            first_line = str(getattr(err, "orig", err)).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RegistryError(f"MLflow tracking database {redact_uri(uri)} is unreachable ({first_line}): "
                                "check that the server runs and the URI, user and password are right") from None
        finally:
            engine.dispose()
    elif scheme == "sqlite":
        path = Path(urllib.parse.urlsplit(uri).path)
        if path.parent != Path("/") and not path.parent.is_dir():
            raise RegistryError(f"MLflow tracking store {uri}: folder {path.parent} does not exist")
    return uri


def open_client() -> MlflowClient:
    """An MlflowClient on the project's store, after a reachability check."""
    from mlflow import MlflowClient

    from medsr import tracking

    uri = check_tracking_reachable()
    tracking.configure()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _is_missing(err: Exception) -> bool:
    code = getattr(err, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE") or "not found" in str(err).lower()


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version behind ``name@alias``, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if _is_missing(err):
            return None
        raise


def get_version(client: MlflowClient, name: str, version: str | int) -> ModelVersion:
    """One version; a deleted or never-registered one is a RegistryError naming the versions that exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if not _is_missing(err):
            raise
    existing = sorted((int(v.version) for v in _versions(client, name)), reverse=True)
    if not existing:
        raise RegistryError(f"{name} has no versions yet: run the pipeline (`dvc repro`) to register one")
    raise RegistryError(f"{name} has no version {version} (deleted or never registered); "
                        f"existing versions: {', '.join(map(str, existing))}")


def _versions(client: MlflowClient, name: str, filter_extra: str = "") -> list[ModelVersion]:
    query = f"name='{name}'" + (f" and {filter_extra}" if filter_extra else "")
    return list(client.search_model_versions(query, max_results=1000))


# ---------------------------------------------------------------------------------------------
# Scores


def cell_name(track: str, modality: str) -> str:
    """The key of one benchmark cell: ``clean/xray``, ``realistic/mri`` ..."""
    return f"{track}/{modality}"


@dataclass
class ModalityScore:
    """One cell's (track and modality) test numbers (PSNR in dB, SSIM) next to bicubic's on the same images."""

    psnr: float
    ssim: float
    bicubic_psnr: float
    bicubic_ssim: float
    images: int = 0
    val_gain_db: float | None = None
    val_ssim_gain: float | None = None
    val_images: int = 0
    # The network alone (no consistency step), and what the baseline bicubic+consistency gains on the cell.
    network_gain_db: float | None = None
    val_network_gain_db: float | None = None
    val_baseline_gain_db: float | None = None
    val_baseline_ssim_gain: float | None = None

    @property
    def gain_db(self) -> float:
        return self.psnr - self.bicubic_psnr

    @property
    def ssim_gain(self) -> float:
        return self.ssim - self.bicubic_ssim


@dataclass
class Scores:
    """A model's per-modality test scores and where they come from."""

    per_modality: dict[str, ModalityScore]
    data_version: str
    source: str  # "benchmark", "tags" or "re-evaluated"

    def mean_gain_db(self, modalities: Sequence[str] | None = None) -> float:
        """Mean test gain over the given cells (default: all), each cell weighing the same."""
        chosen = [m for m in (modalities or self.per_modality) if m in self.per_modality]
        return statistics.fmean(self.per_modality[m].gain_db for m in chosen) if chosen else float("nan")

    def summary(self, modalities: Sequence[str] | None = None) -> dict[str, Any]:
        chosen = [m for m in (modalities or sorted(self.per_modality)) if m in self.per_modality]
        return {
            "mean_test_gain_db": round(self.mean_gain_db(chosen), 4),
            "per_modality": {m: {"psnr": round(s.psnr, 4), "ssim": round(s.ssim, 4), "gain_db": round(s.gain_db, 4),
                                 "network_gain_db": None if s.network_gain_db is None else round(s.network_gain_db, 4),
                                 "ssim_gain": round(s.ssim_gain, 4), "bicubic_psnr": round(s.bicubic_psnr, 4),
                                 "images": s.images} for m, s in ((m, self.per_modality[m]) for m in chosen)},
            "data_version": self.data_version,
            "source": self.source,
        }


@dataclass
class Candidate:
    """A trained model's benchmark entry at one scale."""

    model: str
    scale: int
    scores: Scores
    details: dict[str, Any] = field(default_factory=dict)  # params, MACs, latency, steps (benchmark "models")

    @property
    def mean_val_gain_db(self) -> float:
        gains = [s.val_gain_db for s in self.scores.per_modality.values() if s.val_gain_db is not None]
        return statistics.fmean(gains) if gains else float("nan")

    def worst_val_modality(self) -> tuple[str, float]:
        """The validation cell where the model is furthest below (or least above) the baseline, and by how much."""
        judged = {m: s for m, s in self.scores.per_modality.items() if s.val_images > 0} or self.scores.per_modality
        modality, score = min(judged.items(), key=lambda item: _or_nan(margin_over_baseline(item[1])))
        return modality, _or_nan(margin_over_baseline(score))


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _optional(row: Mapping[str, Any], key: str) -> float | None:
    return None if row.get(key) is None else float(row[key])


def margin_over_baseline(score: ModalityScore) -> float | None:
    """Validation PSNR gain beyond ``bicubic+consistency`` on one cell (None when not measured)."""
    if score.val_gain_db is None or score.val_baseline_gain_db is None:
        return None
    return score.val_gain_db - score.val_baseline_gain_db


BASELINE = "bicubic+consistency"  # what eligibility is judged against (medsr.benchmark.CONSISTENCY_BASELINE)
REFERENCES = ("bicubic", BASELINE)  # benchmark rows that are baselines, not candidates
PUBLISHED_MARK = "@"  # rlfn@published: a published checkpoint as it is (medsr.benchmark.PUBLISHED_SUFFIX)


def candidates_from_benchmark(report: Mapping[str, Any], scale: int, data_version: str) -> list[Candidate]:
    """Every trained model of ``metrics/benchmark.json`` at ``scale`` (the baselines are references, not candidates).

    Raises RegistryError when the report has no ``bicubic+consistency`` rows (a benchmark from before
    the baseline existed): eligibility cannot be judged against it.
    """
    rows = [r for r in report.get("results", []) if int(r["scale"]) == int(scale) and r["modality"] != "all"]
    if rows and not any(r["model"] == BASELINE for r in rows):
        raise RegistryError(f"metrics/benchmark.json has no {BASELINE} rows at x{scale}: models are judged against "
                            "that baseline; rerun the benchmark (`dvc repro benchmark`)")
    by_model: dict[str, dict[str, ModalityScore]] = {}
    for row in rows:
        # The baselines and the published references (model@published) are scored beside, never candidates.
        if row["model"] in REFERENCES or PUBLISHED_MARK in row["model"]:
            continue
        by_model.setdefault(row["model"], {})[cell_name(row.get("track", "clean"), row["modality"])] = ModalityScore(
            psnr=float(row["psnr"]), ssim=float(row["ssim"]), bicubic_psnr=float(row["bicubic_psnr"]),
            bicubic_ssim=float(row["bicubic_ssim"]), images=int(row.get("images", 0)),
            val_gain_db=_optional(row, "val_gain_db"), val_ssim_gain=_optional(row, "val_ssim_gain"),
            val_images=int(row.get("val_images") or 0), network_gain_db=_optional(row, "network_gain_db"),
            val_network_gain_db=_optional(row, "val_network_gain_db"),
            val_baseline_gain_db=_optional(row, "val_baseline_gain_db"),
            val_baseline_ssim_gain=_optional(row, "val_baseline_ssim_gain"))
    details = report.get("models", {})
    return [Candidate(model, int(scale), Scores(per_modality, data_version, "benchmark"),
                      dict(details.get(model, {}).get(f"x{scale}", {})))
            for model, per_modality in by_model.items()]


# Benchmark gains are rounded to 4 decimals: an SSIM gain of -0.0001 may be a tie.
SSIM_ROUNDING = 1e-4


def is_eligible(candidate: Candidate, max_modality_loss_db: float = 0.0) -> bool:
    """Beats ``bicubic+consistency`` on every validation cell (track x modality).

    Both sides carry the consistency step, so a model whose gain over bicubic is the step's alone
    ties the baseline and is refused. At the default ``max_modality_loss_db`` 0: PSNR gain over
    the baseline strictly positive and SSIM no worse than the baseline's (up to the benchmark's
    rounding). With a tolerance: PSNR at least ``-max_modality_loss_db`` below the baseline, SSIM
    not judged. Cells with no validation images are not judged (tuning on test is not allowed); at
    least one cell must have some. A judged cell without the baseline's numbers is not eligible.
    """
    judged = [s for s in candidate.scores.per_modality.values() if s.val_images > 0]

    def beats(s: ModalityScore) -> bool:
        margin = margin_over_baseline(s)
        if margin is None:
            return False
        if max_modality_loss_db != 0:
            return margin >= -max_modality_loss_db
        ssim_margin = _or_nan(s.val_ssim_gain if s.val_ssim_gain is not None else 0.0) - _or_nan(s.val_baseline_ssim_gain)
        return margin > 0 and ssim_margin >= -SSIM_ROUNDING

    return bool(judged) and all(beats(s) for s in judged)


def choose_best(candidates: Sequence[Candidate], max_modality_loss_db: float = 0.0) -> tuple[Candidate | None, str]:
    """The eligible candidate (:func:`is_eligible`) with the highest mean validation gain, and a one-line reason.

    Pure: no tracking store is touched, so the rule is tested on plain numbers.
    """
    ranked = sorted((c for c in candidates if is_eligible(c, max_modality_loss_db)),
                    key=lambda c: c.mean_val_gain_db, reverse=True)
    if ranked:
        best = ranked[0]
        return best, (f"{best.model}: best mean validation gain over bicubic across tracks and modalities "
                      f"({best.mean_val_gain_db:+.3f} dB) among {len(ranked)} of {len(candidates)} that beat "
                      f"{BASELINE} on every validation cell")
    if not candidates:
        return None, "no trained model in the benchmark"
    worst = [f"{c.model} ({c.worst_val_modality()[0]} {c.worst_val_modality()[1]:+.2f} dB vs {BASELINE})"
             for c in candidates]
    bar = (f"better than {BASELINE}" if max_modality_loss_db == 0
           else f"within {max_modality_loss_db:g} dB of {BASELINE}")
    return None, (f"no model is {bar} on every track and modality of the validation split "
                  "(registry.max_modality_loss_db): " + ", ".join(worst))


def scores_from_tags(tags: Mapping[str, str]) -> Scores | None:
    """Scores recorded on a version at registration (``test.<modality>.psnr`` ...); None if absent."""
    per_modality: dict[str, ModalityScore] = {}
    modalities = {key[len("test."):-len(".psnr")] for key in tags
                  if key.startswith("test.") and key.endswith(".psnr") and "/" in key}
    try:
        for m in sorted(modalities):
            per_modality[m] = ModalityScore(
                psnr=float(tags[f"test.{m}.psnr"]), ssim=float(tags[f"test.{m}.ssim"]),
                bicubic_psnr=float(tags[f"test.{m}.bicubic_psnr"]), bicubic_ssim=float(tags[f"test.{m}.bicubic_ssim"]),
                images=int(tags.get(f"test.{m}.images", 0)), val_gain_db=_optional(tags, f"val.{m}.gain_db"),
                val_ssim_gain=_optional(tags, f"val.{m}.ssim_gain"),
                network_gain_db=_optional(tags, f"test.{m}.network_gain_db"),
                val_network_gain_db=_optional(tags, f"val.{m}.network_gain_db"),
                val_baseline_gain_db=_optional(tags, f"val.{m}.baseline_gain_db"))
    except (KeyError, ValueError):
        return None
    return Scores(per_modality, tags.get("data_version", "unknown"), "tags") if per_modality else None


def bicubic_reference(scale: int, pairs_root: Path, report: Mapping[str, Any] | None = None) -> dict[str, tuple[float, float]]:
    """Bicubic's (PSNR, SSIM) per cell on the current test pairs, from the benchmark report."""
    rows = [r for r in (report or {}).get("results", [])
            if r["model"] == "bicubic" and int(r["scale"]) == int(scale) and r["modality"] != "all"]
    return {cell_name(r.get("track", "clean"), r["modality"]): (float(r["psnr"]), float(r["ssim"])) for r in rows}


def _check_test_pairs(pairs_root: Path, scale: int, tracks: Sequence[str]) -> None:
    for track in tracks:
        folder = Path(pairs_root) / "test" / f"x{scale}" / track
        if not (folder / "index.json").is_file():
            raise RegistryError(f"cannot compare on the current test split: {folder} is missing; run `dvc repro degrade` first")


def evaluate_version(name: str, version: str, scale: int, pairs_root: Path, data_version: str,
                     bicubic: Mapping[str, tuple[float, float]] | None = None,
                     params: Mapping[str, Any] | None = None) -> Scores:
    """Load a registered version and score it on the current test tracks (same definition as the benchmark)."""
    from medsr.benchmark import score_generator
    from medsr.consistency import ConsistencySettings
    from medsr.degradations import TRACKS
    from medsr.tracking import load_logged_generator

    params = dict(params or {})
    tracks = list((params.get("degrade") or {}).get("tracks", TRACKS))
    _check_test_pairs(pairs_root, scale, tracks)
    try:
        generator, _spec = load_logged_generator(f"models:/{name}/{version}")
    except Exception as err:  # a missing artifact store, a foreign model: say which version could not be loaded
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RegistryError(f"cannot load {name} version {version} to re-evaluate it on the current test split "
                            f"({type(err).__name__}: {detail}); choose the champion by hand: "
                            f"`medsr registry promote VERSION --scale {scale} --force --reason \"...\"`") from err
    rows = score_generator(generator, scale, Path(pairs_root), tracks=tracks,
                           consistency=ConsistencySettings.from_params(params.get("consistency")))
    per_modality = {cell_name(r["track"], r["modality"]): ModalityScore(
        psnr=r["psnr"], ssim=r["ssim"], bicubic_psnr=r["bicubic_psnr"], bicubic_ssim=r["bicubic_ssim"], images=r["images"])
        for r in rows if r["modality"] != "all"}
    return Scores(per_modality, data_version, "re-evaluated")


def scores_on_current_split(version: ModelVersion, scale: int, pairs_root: Path, data_version: str,
                            bicubic: Mapping[str, tuple[float, float]] | None,
                            params: Mapping[str, Any] | None = None) -> Scores:
    """A version's scores on the current test split: its tags when they were measured on this data
    version, else a re-evaluation on the current test pairs."""
    recorded = scores_from_tags(version.tags)
    if recorded is not None and recorded.data_version == data_version:
        return recorded
    return evaluate_version(version.name, str(version.version), scale, pairs_root, data_version, bicubic, params)


# ---------------------------------------------------------------------------------------------
# Decision


@dataclass
class PromotionDecision:
    """Challenger against champion on the same test split."""

    action: str  # "promote" or "keep"
    delta_db: float | None
    modalities: list[str]
    reason: str


def decide_promotion(challenger: Scores, champion: Scores | None, min_gain_db: float, min_images: int = 1) -> PromotionDecision:
    """Promote only when the challenger's mean test gain (over track x modality cells that both were
    scored on with at least ``min_images`` images) beats the champion's by ``min_gain_db``. Pure."""
    def counted(scores: Scores) -> set[str]:
        return {m for m, s in scores.per_modality.items() if s.images >= min_images or s.images == 0}

    if champion is None:
        return PromotionDecision("promote", None, sorted(challenger.per_modality), "no champion yet")
    common = sorted(counted(challenger) & counted(champion))
    if not common:
        return PromotionDecision("keep", None, [], f"challenger and champion share no test cell with >= {min_images} images: "
                          "kept as challenger")
    delta = challenger.mean_gain_db(common) - champion.mean_gain_db(common)
    verdict = "beats" if delta > 0 and delta >= min_gain_db else "does not beat"
    action = "promote" if verdict == "beats" else "keep"
    return PromotionDecision(action, delta, common,
                      f"mean test gain over bicubic {challenger.mean_gain_db(common):+.3f} dB vs champion "
                      f"{champion.mean_gain_db(common):+.3f} dB ({delta:+.3f} dB) {verdict} registry.min_gain_db {min_gain_db:g} dB "
                      f"on {', '.join(common)}")


# ---------------------------------------------------------------------------------------------
# Registration


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def _score_tags(scores: Scores) -> dict[str, str]:
    tags: dict[str, str] = {}
    for m, s in scores.per_modality.items():
        tags.update({f"test.{m}.psnr": _fmt(s.psnr), f"test.{m}.ssim": _fmt(s.ssim), f"test.{m}.gain_db": _fmt(s.gain_db),
                     f"test.{m}.ssim_gain": _fmt(s.ssim_gain), f"test.{m}.bicubic_psnr": _fmt(s.bicubic_psnr),
                     f"test.{m}.bicubic_ssim": _fmt(s.bicubic_ssim), f"test.{m}.images": str(s.images)})
        for key, value in ((f"val.{m}.gain_db", s.val_gain_db), (f"val.{m}.ssim_gain", s.val_ssim_gain),
                           (f"test.{m}.network_gain_db", s.network_gain_db),
                           (f"val.{m}.network_gain_db", s.val_network_gain_db),
                           (f"val.{m}.baseline_gain_db", s.val_baseline_gain_db)):
            if value is not None:
                tags[key] = _fmt(value)
    tags["test.mean_gain_db"] = _fmt(scores.mean_gain_db())
    tags["data_version"] = scores.data_version
    return tags


def params_hash(run_params: Mapping[str, str]) -> str:
    """A short hash of everything the training run was configured with (its MLflow params)."""
    return hashlib.sha256(json.dumps(dict(sorted(run_params.items())), sort_keys=True).encode()).hexdigest()[:16]


def _iso(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds") if ms else "unknown"


def version_tags(candidate: Candidate, run: Any, current_commit: str) -> dict[str, str]:
    """Everything review, promotion and serving need to know about a version, as tags."""
    details = candidate.details
    run_tags = run.data.tags if run is not None else {}
    tags = {
        "model": candidate.model,
        "scale": str(candidate.scale),
        "run_id": run.info.run_id if run is not None else "",
        "params_hash": params_hash(run.data.params) if run is not None else "unknown",
        "git_commit": run_tags.get("git_commit", current_commit),
        "train_data_version": run_tags.get("data_version", "unknown"),
        "trained_at": _iso(run.info.start_time if run is not None else None),
        "profile": run_tags.get("profile", "unknown"),
        "val.mean_gain_db": _fmt(candidate.mean_val_gain_db),
        **_score_tags(candidate.scores),
    }
    for key in ("params", "macs_per_output_mpixel", "cpu_latency_ms_256", "trained_steps", "phase", "best_val_psnr",
                "feature_loss"):
        if details.get(key) is not None:
            tags[key] = str(details[key])
    # A model fine-tuned from published weights carries their origin and licence (medsr.pretrained).
    tags.update({key: value for key, value in run_tags.items() if key.startswith("init_")})
    return tags


def _existing_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The version already registered from ``run_id`` (registering the same run twice adds nothing)."""
    found = _versions(client, name, f"run_id='{run_id}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def _register_version(client: MlflowClient, name: str, model_uri: str, run_id: str, tags: Mapping[str, str]) -> tuple[ModelVersion, bool]:
    from mlflow.exceptions import MlflowException

    existing = _existing_version(client, name, run_id)
    if existing is not None:
        for key, value in tags.items():
            client.set_model_version_tag(name, str(existing.version), key, value)
        return client.get_model_version(name, str(existing.version)), False
    try:
        client.create_registered_model(name, description=f"MedSR super-resolution at x{tags.get('scale', '?')}: "
                                       f"`models:/{name}@{CHAMPION}` is what serving loads.")
    except MlflowException as err:
        if getattr(err, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(name, source=model_uri, run_id=run_id, tags=dict(tags), model_id=model_id)
    return version, True


def _set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    client.set_registered_model_alias(name, alias, str(version))


def _drop_alias_if_on(client: MlflowClient, name: str, alias: str, version: str) -> None:
    current = alias_version(client, name, alias)
    if current is not None and str(current.version) == str(version):
        client.delete_registered_model_alias(name, alias)


def model_card(name: str, version: ModelVersion | None, tags: Mapping[str, str], decision: Mapping[str, Any],
               definition: str = "") -> str:
    """The version's model card (markdown): what it is, how it scores, how it was made, the decision."""
    scores = scores_from_tags(tags)
    lines = [f"# {name} version {version.version if version else '?'}: {tags.get('model', '?')} x{tags.get('scale', '?')}", "",
             "Super-resolution of chest X-ray, CT and brain MRI (1-channel, intensities windowed to [0, 1]). "
             "Research use only: not a medical device, not for diagnosis.", "",
             "## Test split: clean and realistic tracks", "",
             "Held-out whole files (or gap-separated regions of a one-file modality); `clean`: antialiased bicubic "
             "down only; `realistic`: blur + the modality's noise. `gain`: with the consistency step (as served); "
             "`network`: the network alone; `val bar`: what bicubic+consistency gains on validation, which `val gain` "
             "had to beat.", "",
             "| track/modality | images | PSNR dB | SSIM | bicubic PSNR | gain dB | network dB | SSIM gain | val gain dB "
             "| val bar dB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def signed(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:+.{digits}f}"

    if scores:
        for m, s in sorted(scores.per_modality.items()):
            lines.append(f"| {m} | {s.images} | {s.psnr:.3f} | {s.ssim:.4f} | {s.bicubic_psnr:.3f} | {s.gain_db:+.3f} | "
                         f"{signed(s.network_gain_db)} | {s.ssim_gain:+.4f} | {signed(s.val_gain_db)} | "
                         f"{signed(s.val_baseline_gain_db)} |")
        lines += ["", f"Mean test gain over bicubic: {scores.mean_gain_db():+.3f} dB; mean validation gain: "
                  f"{tags.get('val.mean_gain_db', '?')} dB."]
    lines += ["", "## Model", "",
              f"- architecture: `{tags.get('model', '?')}`, scale x{tags.get('scale', '?')}, {tags.get('params', '?')} parameters, "
              f"{tags.get('macs_per_output_mpixel', '?')} MACs per output megapixel",
              f"- CPU latency for a 256x256 input: {tags.get('cpu_latency_ms_256', '?')} ms",
              f"- checkpoint phase: `{tags.get('phase', '?')}` (pixel: a pixel-loss network; warmup: a GAN's pixel warm-up; "
              "adversarial: trained as a GAN)",
              f"- trained {tags.get('trained_at', '?')} for {tags.get('trained_steps', '?')} steps (profile `{tags.get('profile', '?')}`, "
              f"feature loss `{tags.get('feature_loss', '?')}`), best validation PSNR {tags.get('best_val_psnr', '?')} dB",
              *([f"- started from published weights: {tags['init_source']} ({tags.get('init_url', '?')}), licence "
                 f"{tags.get('init_licence', '?')}, sha256 `{tags.get('init_sha256', '?')}`"] if "init_source" in tags else []),
              f"- MLflow run `{tags.get('run_id', '?')}`, params hash `{tags.get('params_hash', '?')}`, git commit `{tags.get('git_commit', '?')}`",
              f"- data version (test numbers) `{tags.get('data_version', '?')}`; trained on `{tags.get('train_data_version', '?')}`",
              "", "## Registry decision", "", f"- {decision.get('action', '?')}: {decision.get('reason', '')}"]
    if definition:
        lines += ["", "## Metric definition", "", definition]
    card = "\n".join(lines) + "\n"
    return card if len(card) <= DESCRIPTION_LIMIT else card[:DESCRIPTION_LIMIT - 40] + "\n\n(truncated; full card in the decision run)\n"


def record_decision(settings: RegistrySettings, decision: Mapping[str, Any], card: str | None = None) -> str:
    """One MLflow run per decision (experiment ``registry.experiment``): params, the numbers compared
    as metrics, decision.json and the model card; returns its run id."""
    import mlflow

    from medsr import tracking

    tracking.configure(settings.experiment)
    title = f"{decision['registered_model']} v{decision.get('version') or '-'}: {decision['action']}"
    with mlflow.start_run(run_name=title) as run:
        mlflow.set_tags({"registered_model": decision["registered_model"], "decision": decision["action"],
                         "reason": str(decision.get("reason", ""))[:5000], "version": str(decision.get("version") or ""),
                         "model": str(decision.get("model") or ""), "decided_by": str(decision.get("decided_by", "register stage"))})
        mlflow.log_params({"min_gain_db": settings.min_gain_db, "max_modality_loss_db": settings.max_modality_loss_db,
                           "champion_before": str((decision.get("champion_before") or {}).get("version", "none")),
                           "compared_on": str(decision.get("compared_on", ""))[:6000]})
        metrics: dict[str, float] = {}
        for role in ("challenger", "champion"):
            summary = decision.get(role) or {}
            if "mean_test_gain_db" in summary:
                metrics[f"{role}_mean_test_gain_db"] = float(summary["mean_test_gain_db"])
            for m, s in (summary.get("per_modality") or {}).items():
                metrics[f"{role}_{m}_psnr"] = float(s["psnr"])
                metrics[f"{role}_{m}_gain_db"] = float(s["gain_db"])
                if s.get("network_gain_db") is not None:  # the network alone, beside the system's gain
                    metrics[f"{role}_{m}_network_gain_db"] = float(s["network_gain_db"])
        if decision.get("delta_db") is not None:
            metrics["delta_db"] = float(decision["delta_db"])
        if metrics:
            mlflow.log_metrics(metrics)
        mlflow.log_dict(dict(decision), "decision.json")
        if card:
            mlflow.log_text(card, "model_card.md")
    return run.info.run_id


def _train_result(train_dir: Path, model: str, scale: int) -> dict[str, Any]:
    path = train_dir / f"{model}.json"
    if not path.is_file():
        raise RegistryError(f"{path} is missing: the benchmark lists {model} but its training metrics are gone; run `dvc repro train@{model}`")
    result = json.loads(path.read_text()).get("scales", {}).get(f"x{scale}")
    if not result or not result.get("model_uri"):
        raise RegistryError(f"{path} has no logged model for x{scale}: run `dvc repro train@{model}`")
    return result


def register_scale(client: MlflowClient, settings: RegistrySettings, scale: int, report: Mapping[str, Any],
                   train_dir: Path, pairs_root: Path, data_version: str, current_commit: str,
                   params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Select, register and decide for one scale; returns the decision record."""
    name = settings.name_for(scale)
    best, why = choose_best(candidates_from_benchmark(report, scale, data_version), settings.max_modality_loss_db)
    decision: dict[str, Any] = {"registered_model": name, "scale": scale, "selection": why, "data_version": data_version,
                                "baseline": BASELINE, "baseline_val": _baseline_cells(report, scale),
                                "min_gain_db": settings.min_gain_db,
                                "min_images_per_modality": settings.min_images_per_modality,
                                # the image keys (hashed ids, no file names) every number of this decision rests on
                                "images": (report.get("images") or {}).get(f"x{scale}", {})}
    champion = alias_version(client, name, CHAMPION)
    champion_number = str(champion.version) if champion is not None else None
    decision["champion_before"] = {"version": champion_number, "model": champion.tags.get("model")} if champion else None
    if best is None:
        decision.update(action="none", version=None, model=None,
                        reason=f"nothing registered: {why}" + (f"; champion v{champion_number} stays" if champion else ""))
        decision["decision_run_id"] = record_decision(settings, decision)
        return decision

    trained = _train_result(train_dir, best.model, scale)
    run = client.get_run(trained["run_id"])
    tags = version_tags(best, run, current_commit)
    version, created = _register_version(client, name, trained["model_uri"], trained["run_id"], tags)
    number = str(version.version)
    decision.update(version=number, model=best.model, newly_registered=created, challenger=best.scores.summary())

    if champion is not None and champion_number == number:
        decision.update(action="unchanged", reason=f"v{number} ({best.model}) is already the champion",
                        champion=best.scores.summary(), compared_on=f"test split, data version {data_version}")
    else:
        champion_scores = None
        if champion is not None:
            champion_scores = scores_on_current_split(champion, scale, pairs_root, data_version,
                                                      bicubic_reference(scale, pairs_root, report), params)
        promotion = decide_promotion(best.scores, champion_scores, settings.min_gain_db, settings.min_images_per_modality)
        compared_on = f"test split, data version {data_version}"
        if champion is not None and champion_scores is not None:
            if champion_scores.source == "re-evaluated":
                compared_on += (f"; champion re-evaluated on it (its tags were for data version "
                                f"{champion.tags.get('data_version', 'unknown')})")
            else:
                compared_on += "; champion numbers from its tags (same data version)"
            decision["champion"] = champion_scores.summary(promotion.modalities)
            decision["challenger"] = best.scores.summary(promotion.modalities)
        decision.update(compared_on=compared_on, delta_db=None if promotion.delta_db is None else round(promotion.delta_db, 4))
        if promotion.action == "promote":
            _set_alias(client, name, CHAMPION, number)
            _drop_alias_if_on(client, name, CHALLENGER, number)
            decision.update(action="promoted", reason=f"v{number} ({best.model}) promoted to champion: {promotion.reason}")
        else:
            _set_alias(client, name, CHALLENGER, number)
            decision.update(action="kept", reason=f"champion v{champion_number} kept, v{number} ({best.model}) "
                                                 f"is the challenger: {promotion.reason}")
    champion_after = alias_version(client, name, CHAMPION)
    decision["champion_after"] = str(champion_after.version) if champion_after else None
    card = model_card(name, version, tags, decision, str(report.get("definition", "")))
    decision["decision_run_id"] = run_id = record_decision(settings, decision, card)
    client.update_model_version(name, number, description=card)
    for key, value in {"decision": decision["action"], "decision_reason": decision["reason"][:5000], "decision_run_id": run_id}.items():
        client.set_model_version_tag(name, number, key, value)
    return decision


def _baseline_cells(report: Mapping[str, Any], scale: int) -> dict[str, dict[str, float]]:
    """The baseline's validation gains over bicubic per cell: the bar each candidate had to clear."""
    return {cell_name(r["track"], r["modality"]): {"gain_db": r["gain_db"], "ssim_gain": r["ssim_gain"]}
            for r in report.get("validation", [])
            if r["model"] == BASELINE and int(r["scale"]) == int(scale) and r["modality"] != "all"}


def register_best(params: Mapping[str, Any], report: Mapping[str, Any], *, train_dir: Path = METRICS_DIR / "train",
                  pairs_root: Path = PAIRS_DIR, data_version: str | None = None) -> dict[str, Any]:
    """Register the best model of every scale and decide champion or challenger; returns the record."""
    from medsr import tracking

    settings = RegistrySettings.from_params(params)
    client = open_client()
    version_of_data = data_version or tracking.data_version(Path(pairs_root))
    commit = tracking.git_commit(Path.cwd())
    scales = [int(s) for s in section(dict(params), "degrade.scales")]
    decisions = {f"x{scale}": register_scale(client, settings, scale, report, Path(train_dir), Path(pairs_root),
                                             version_of_data, commit, params) for scale in scales}
    return {"tracking_uri": redact_uri(tracking.tracking_uri()), "data_version": version_of_data, "decisions": decisions}


def register_stage(params: dict[str, Any]) -> dict[str, Any]:
    """The ``register`` DVC stage: read metrics/benchmark.json, register, write metrics/register.json."""
    path = METRICS_DIR / "benchmark.json"
    if not path.is_file():
        raise RegistryError(f"{path} is missing: run `dvc repro benchmark` first")
    record = register_best(params, json.loads(path.read_text()))
    write_json(REGISTER_METRICS, record)
    return record


# ---------------------------------------------------------------------------------------------
# Review, promotion, champions


@dataclass
class VersionView:
    """What review shows of one version."""

    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    scores: Scores | None
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "aliases": self.aliases, "created_at": self.created_at,
                "model": self.tags.get("model"), "scores": self.scores.summary() if self.scores else None,
                "params": self.tags.get("params"), "cpu_latency_ms_256": self.tags.get("cpu_latency_ms_256"),
                "data_version": self.tags.get("data_version"), "trained_at": self.tags.get("trained_at"),
                "decision": self.tags.get("decision")}


def _view(version: ModelVersion, aliases: Sequence[str] = ()) -> VersionView:
    return VersionView(version.name, str(version.version), list(aliases or getattr(version, "aliases", None) or []),
                       dict(version.tags), scores_from_tags(version.tags), _iso(version.creation_timestamp))


def _aliases_by_version(client: MlflowClient, name: str) -> dict[str, list[str]]:
    """alias names per version number (search results do not carry aliases; the registered model does)."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as err:
        if _is_missing(err):
            return {}
        raise
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        by_version.setdefault(str(version), []).append(alias)
    return by_version


def review(params: Mapping[str, Any], limit: int = 3) -> dict[str, dict[str, Any]]:
    """Per registered model: the champion, then the challenger and the most recent other versions."""
    settings = RegistrySettings.from_params(params)
    client = open_client()
    out: dict[str, dict[str, Any]] = {}
    for scale in sorted(int(s) for s in section(dict(params), "degrade.scales")):
        name = settings.name_for(scale)
        versions = sorted(_versions(client, name), key=lambda v: int(v.version), reverse=True)
        aliases = _aliases_by_version(client, name) if versions else {}
        champion = next((v for v in versions if CHAMPION in aliases.get(str(v.version), [])), None)
        others = [v for v in versions if v is not champion]
        others.sort(key=lambda v: (CHALLENGER not in aliases.get(str(v.version), []), -int(v.version)))
        shown = ([champion] if champion else []) + others[:max(0, limit)]
        if not versions:
            note = f"{name} has no versions yet: run the pipeline (`dvc repro`) to register one"
        elif champion is None:
            note = f"{name} has no champion yet: promote a version with `medsr registry promote VERSION --scale {scale}`"
        else:
            note = ""
        data_versions = {v.tags.get("data_version") for v in shown}
        if len(data_versions) > 1:
            note = (note + "; " if note else "") + ("versions were scored on different data versions: numbers are not "
                                                    "directly comparable (promotion re-evaluates on the current test split)")
        out[name] = {"scale": scale, "versions": [_view(v, aliases.get(str(v.version), [])) for v in shown], "note": note,
                     "total_versions": len(versions)}
    return out


def champions(params: Mapping[str, Any]) -> dict[str, VersionView | None]:
    """The champion of each scale (None where there is none yet)."""
    settings = RegistrySettings.from_params(params)
    client = open_client()
    result: dict[str, VersionView | None] = {}
    for scale in sorted(int(s) for s in section(dict(params), "degrade.scales")):
        name = settings.name_for(scale)
        version = alias_version(client, name, CHAMPION)
        result[name] = _view(version, [CHAMPION]) if version is not None else None
    return result


def current_user() -> str:
    """Who is acting: ``MEDSR_USER`` when set (CI, service accounts), else the login name."""
    try:
        return os.environ.get("MEDSR_USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"


def promote(params: Mapping[str, Any], name: str, version: str, *, force: bool = False, reason: str | None = None,
            pairs_root: Path = PAIRS_DIR, user: str | None = None) -> dict[str, Any]:
    """Make ``name`` version ``version`` the champion by hand.

    A version worse than the champion on the current test split is refused unless ``force`` with a
    ``reason``; who and why are written as version tags and as a decision run.
    """
    from medsr import tracking

    if force and not (reason and reason.strip()):
        raise RegistryError('--force needs --reason "...": say why a worse model should serve')
    settings = RegistrySettings.from_params(params)
    scale = settings.scale_of(name)
    client = open_client()
    candidate = get_version(client, name, version)
    number = str(candidate.version)
    champion = alias_version(client, name, CHAMPION)
    champion_number = str(champion.version) if champion is not None else None
    user = user or current_user()
    decision: dict[str, Any] = {"registered_model": name, "scale": scale, "version": number,
                                "model": candidate.tags.get("model"), "decided_by": user, "min_gain_db": settings.min_gain_db,
                                "champion_before": {"version": champion_number, "model": champion.tags.get("model")} if champion else None}
    if champion_number == number:
        raise RegistryError(f"{name} v{number} is already the champion")

    promotion: PromotionDecision | None = None
    if champion is not None:
        data_version = tracking.data_version(Path(pairs_root))
        try:
            challenger_scores = scores_on_current_split(candidate, scale, Path(pairs_root), data_version, None, params)
            champion_scores = scores_on_current_split(champion, scale, Path(pairs_root), data_version, None, params)
        except RegistryError:
            if not force:
                raise
            challenger_scores = champion_scores = None
        if challenger_scores is not None and champion_scores is not None:
            # A manual promotion only has to be no worse: min_gain_db guards the automatic one.
            promotion = decide_promotion(challenger_scores, champion_scores, 0.0)
            decision.update(challenger=challenger_scores.summary(promotion.modalities),
                            champion=champion_scores.summary(promotion.modalities),
                            delta_db=None if promotion.delta_db is None else round(promotion.delta_db, 4),
                            compared_on=f"test split, data version {data_version}")
            worse = promotion.delta_db is not None and promotion.delta_db < 0
            if worse and not force:
                raise RegistryError(f"refusing to promote {name} v{number}: it is worse than champion v{champion_number} "
                                    f"({promotion.reason}); pass --force --reason \"...\" to override")
    _set_alias(client, name, CHAMPION, number)
    _drop_alias_if_on(client, name, CHALLENGER, number)
    why = (reason or "").strip() or (promotion.reason if promotion else "no champion yet")
    for key, value in {"promoted_by": user, "promotion_reason": why[:5000],
                       "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
                       "promotion_forced": str(bool(force)).lower(),
                       "promoted_over_version": champion_number or "none"}.items():
        client.set_model_version_tag(name, number, key, value)
    decision.update(action="force-promoted" if force else "promoted", reason=f"v{number} promoted by {user}: {why}",
                    champion_after=number)
    decision["decision_run_id"] = record_decision(settings, decision)
    return decision


def as_jsonable(value: Any) -> Any:
    """Dataclass views as plain data (for ``--json`` and flow results)."""
    if isinstance(value, VersionView):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: as_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_jsonable(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return value
