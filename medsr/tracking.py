"""MLflow tracking: every training run logs its params, curves, data version, git commit,
a comparison figure and the generator itself; registered generators are loaded back here.

The default store is embedded (``mlflow.db`` and ``mlartifacts/`` in the repository, ignored by
git); ``MLFLOW_TRACKING_URI`` points it at a server instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

EXPERIMENT = "medsr"
REPO_ROOT = Path(__file__).resolve().parents[1]


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the embedded SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def configure(experiment: str = EXPERIMENT) -> str:
    """Point mlflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        mlflow.set_experiment(experiment)
        return found.experiment_id
    # Artifacts beside the embedded database rather than MLflow's cwd-relative default.
    artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else str(Path("mlartifacts").resolve())
    experiment_id = mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)
    return experiment_id


def git_commit(cwd: Path | None = None) -> str:
    """HEAD's commit, suffixed ``-dirty`` when tracked files changed; ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def locked_hash(out: Path, stage: str = "degrade", lock: Path = Path("dvc.lock")) -> str | None:
    """``dvc:<md5>``, the hash ``lock`` records for ``stage``'s output ``out`` (a path as dvc.yaml
    names it, relative to the lock's folder); None without a lock or such an output."""
    if not lock.is_file():
        return None
    from medsr.params import parse_yaml

    wanted = Path(os.path.relpath(Path(out).resolve(), lock.resolve().parent)).as_posix() if Path(out).is_absolute() \
        else Path(out).as_posix()
    stages = (parse_yaml(lock.read_text()) or {}).get("stages", {})
    for entry in stages.get(stage, {}).get("outs", []):
        if entry.get("path") == wanted and entry.get("md5"):
            return f"dvc:{entry['md5']}"
    return None


def is_cache_checkout(out: Path, locked: str, cache: Path = Path(".dvc/cache")) -> bool:
    """Whether the folder ``out`` is exactly the checkout of DVC's cache object ``locked``
    (``dvc:<md5>.dir``, from :func:`locked_hash`), told by ``stat`` alone: the same file names, each
    the cache's own inode. With ``cache.type hardlink`` (.dvc/config) a committed output is that;
    the cache is write-protected and outputs are only ever replaced, never edited in place, so a
    file still on its cache inode holds the cache's bytes. A copy, a rewrite since or a missing
    cache says False."""
    md5 = locked.removeprefix("dvc:")
    if not md5.endswith(".dir"):
        return False
    objects = cache / "files" / "md5"
    try:
        entries = json.loads((objects / md5[:2] / md5[2:]).read_text())
        listed = {entry["relpath"]: entry["md5"] for entry in entries}
        present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
        if present != set(listed):
            return False
        for relpath, digest in listed.items():
            here, there = (out / relpath).stat(), (objects / digest[:2] / digest[2:]).stat()
            if (here.st_ino, here.st_dev) != (there.st_ino, there.st_dev):
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def data_version(pairs_dir: Path = Path("data/pairs"), lock: Path = Path("dvc.lock")) -> str:
    """DVC's hash of the pair sets (from dvc.lock); without a lock, a hash of their index files."""
    locked = locked_hash(pairs_dir, "degrade", lock)
    if locked is not None:
        return locked
    digest = hashlib.sha256()
    for index in sorted(pairs_dir.rglob("index.json")):
        digest.update(index.relative_to(pairs_dir).as_posix().encode())
        digest.update(index.read_bytes())
    return f"index:{digest.hexdigest()[:32]}"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params as MLflow's flat ``a.b.c`` keys (values stringified past its 6000-char limit)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else value
            out[name] = str(text)[:6000] if isinstance(text, str) else text
    return out


def comparison_figure(lr: np.ndarray, bicubic: np.ndarray, sr: np.ndarray, hr: np.ndarray, title: str) -> Any:
    """LR | bicubic | model | HR, same size panels (LR shown with nearest-neighbour zoom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for ax, image, name in zip(axes, (lr, bicubic, sr, hr), ("LR", "bicubic", "model", "HR"), strict=True):
        ax.imshow(np.asarray(image)[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@contextlib.contextmanager
def training_run(run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> Iterator[Any]:
    """An MLflow run with params and tags logged; yields the active run."""
    import mlflow

    configure()
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({"git_commit": git_commit(REPO_ROOT), "data_version": data_version(), **tags})
        mlflow.log_params(flatten(params))
        yield run


WEIGHTS_FILE = "generator_state.pt"
SPEC_FILE = "generator_spec.json"


def log_generator(model: Any, example: np.ndarray, spec: Mapping[str, Any], name: str = "generator") -> str:
    """Log the generator as an MLflow model; returns its model URI.

    Besides MLflow's own (pickled) copy, the model folder carries the bare ``state_dict`` and the
    architecture spec (``{"model", "scale", "options"}``) as extra files, so consumers rebuild the
    network from ``medsr.models`` and load weights with ``torch.load(weights_only=True)``.
    """
    import tempfile

    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    model = model.eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / WEIGHTS_FILE
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights)
        spec_path = Path(tmp) / SPEC_FILE
        spec_path.write_text(json.dumps(dict(spec), sort_keys=True))
        # pickle, not pt2: pt2 freezes the example's batch and spatial size.
        info = mlflow.pytorch.log_model(
            model, name=name, input_example=example, signature=infer_signature(example, output),
            serialization_format="pickle", pip_requirements=["torch==2.13.0", "numpy"],
            extra_files=[str(weights), str(spec_path)],
        )
    return str(info.model_uri)


def load_logged_generator(model_uri: str, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Rebuild a generator logged by :func:`log_generator` (``models:/medsr-x4@champion`` etc.)."""
    import tempfile

    import mlflow
    import torch

    from medsr.models import build_generator

    configure()
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        spec_files = list(local.rglob(SPEC_FILE))
        weight_files = list(local.rglob(WEIGHTS_FILE))
        if not spec_files or not weight_files:
            raise FileNotFoundError(f"{model_uri}: no {SPEC_FILE}/{WEIGHTS_FILE} in the logged model; log it with medsr.tracking.log_generator")
        spec = json.loads(spec_files[0].read_text())
        state = torch.load(weight_files[0], map_location=device, weights_only=True)
    model = build_generator(spec["model"], int(spec["scale"]), **spec.get("options", {}))
    model.load_state_dict(state)
    return model.to(device).eval(), spec


# ---------------------------------------------------------------------------------------------
# Registered generators


class ModelNotFoundError(LookupError):
    """No generator is registered for a scale, or the requested version does not exist."""


@dataclass
class LoadedGenerator:
    """A generator ready for inference, and where it came from."""

    module: Any  # a torch.nn.Module (torch is imported lazily here)
    scale: int
    architecture: str  # medsr.models name, e.g. "espcn"
    registered_name: str  # "medsr-x4"
    version: str  # MLflow registry version
    source: str  # "mlflow" or "bentoml"
    spec: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"scale": self.scale, "architecture": self.architecture, "registered_name": self.registered_name,
                "version": self.version, "source": self.source}


def registry_version(name: str, version: str | None, alias: str) -> str:
    """The registry version number of registered model ``name``: ``version`` checked, else the alias's.

    Raises:
        ModelNotFoundError: nothing registered under that name, alias or version.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure()
    client = MlflowClient()
    try:
        if version is not None:
            return str(client.get_model_version(name, str(version)).version)
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        wanted = f"version {version}" if version is not None else f"alias {alias!r}"
        raise ModelNotFoundError(f"{name} {wanted} not found in the MLflow registry") from err


def load_registered_generator(name: str, scale: int, version: str | None, alias: str,
                              device: Any = "cpu") -> LoadedGenerator:
    """Load ``models:/<name>/<version>`` (the alias's version when ``version`` is None)."""
    resolved = registry_version(name, version, alias)
    module, spec = load_logged_generator(f"models:/{name}/{resolved}", device=str(device))
    return checked_scale(LoadedGenerator(module=module, scale=int(spec["scale"]), architecture=str(spec["model"]),
                                         registered_name=name, version=resolved, source="mlflow", spec=spec), scale)


def checked_scale(loaded: LoadedGenerator, scale: int) -> LoadedGenerator:
    """``loaded``, after checking that it upscales by ``scale`` (what its registered name promises)."""
    if loaded.scale != scale or int(getattr(loaded.module, "scale", scale)) != scale:
        raise ModelNotFoundError(f"{loaded.registered_name} version {loaded.version} is a x{loaded.scale} "
                                 f"generator, registered as x{scale}; register it under the right name")
    return loaded
