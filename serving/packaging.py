"""Bentos: the registry's champions copied into the BentoML model store, and the Bento built with them.

``medsr package`` calls :func:`package_bento`; a built Bento serves with ``model_source=bentoml``
and loads its generators with :func:`load_bentoml_generator`, without the MLflow store. The
BentoML model holds the bare ``state_dict`` and the architecture spec (no pickle, read with
``torch.load(weights_only=True)``), with the registry name and version in its labels.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medsr.tracking import LoadedGenerator, ModelNotFoundError, checked_scale, registry_version
from serving import ServingConfig, load_config

logger = logging.getLogger(__name__)

BENTO_WEIGHTS_FILE = "generator_state.pt"
BENTO_SPEC_FILE = "generator_spec.json"


def import_champions_to_bentoml(config: ServingConfig, alias: str | None = None) -> dict[int, str]:
    """Copy each scale's registry champion into the BentoML model store; returns scale -> tag.

    A scale without a champion is skipped, but the first (largest) scale is required.

    Raises:
        ModelNotFoundError: the first scale has no champion.
    """
    import bentoml
    import mlflow

    from medsr.tracking import SPEC_FILE, WEIGHTS_FILE, configure

    alias = alias or str(config.serving["alias"])
    tags: dict[int, str] = {}
    for position, scale in enumerate(config.scales):
        name = config.model_names[scale]
        try:
            version = registry_version(name, None, alias)
        except ModelNotFoundError:
            if position == 0:
                raise
            logger.info("no %s %s registered: the Bento serves without x%d", name, alias, scale)
            continue
        configure()
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}"))
        weights, spec_file = next(local.rglob(WEIGHTS_FILE), None), next(local.rglob(SPEC_FILE), None)
        if weights is None or spec_file is None:
            raise ModelNotFoundError(f"models:/{name}/{version} has no {WEIGHTS_FILE}/{SPEC_FILE}; "
                                     "log it with medsr.tracking.log_generator")
        spec = json.loads(spec_file.read_text())
        with bentoml.models.create(
            name, labels={"registry_version": version, "architecture": str(spec["model"]), "scale": str(scale)},
            metadata={"registry_name": name, "registry_version": version, "spec": spec},
        ) as model:
            Path(model.path, BENTO_WEIGHTS_FILE).write_bytes(weights.read_bytes())
            Path(model.path, BENTO_SPEC_FILE).write_text(json.dumps(spec, sort_keys=True))
        tags[scale] = str(model.tag)
    return tags


def load_bentoml_generator(model_path: str | Path, metadata: Mapping[str, Any], scale: int,
                           device: torch.device | str = "cpu") -> LoadedGenerator:
    """Rebuild a generator from a BentoML model folder written by :func:`import_champions_to_bentoml`."""
    from medsr.models import build_generator

    spec = json.loads(Path(model_path, BENTO_SPEC_FILE).read_text())
    state = torch.load(Path(model_path, BENTO_WEIGHTS_FILE), map_location=str(device), weights_only=True)
    module = build_generator(spec["model"], int(spec["scale"]), **spec.get("options", {}))
    module.load_state_dict(state)
    module = module.to(device).eval()
    return checked_scale(LoadedGenerator(module=module, scale=int(spec["scale"]), architecture=str(spec["model"]),
                                         registered_name=str(metadata.get("registry_name", f"x{scale}")),
                                         version=str(metadata.get("registry_version", "unknown")), source="bentoml",
                                         spec=spec), scale)


def package_bento(build_ctx: Path = Path("."), bentofile: str = "bentofile.yaml",
                  alias: str | None = None) -> tuple[str, dict[int, str]]:
    """Build a Bento of the service carrying the registry's champions; returns (bento tag, model tags).

    The champions are imported into the BentoML model store first; the Bento records
    ``model_source=bentoml`` and their tags as bento arguments, so it serves exactly those
    weights without the MLflow store. Names and the alias come from ``build_ctx``'s params.yaml.

    Raises:
        ModelNotFoundError: no champion is registered for the largest scale.
    """
    import bentoml

    config = load_config(Path(build_ctx) / "params.yaml")
    tags = import_champions_to_bentoml(config, alias)
    arguments = {"model_source": "bentoml", "bento_models": json.dumps({str(scale): tag for scale, tag in tags.items()})}
    bento = bentoml.bentos.build_bentofile(str(Path(build_ctx) / bentofile), build_ctx=str(build_ctx), args=arguments)
    return str(bento.tag), tags
