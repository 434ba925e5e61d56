"""DVC stage `register` (dvc.yaml): register the best model per scale in MLflow and move the
aliases (medsr.registry.register_stage)."""

import logging
from typing import Any

from mlflow.exceptions import MlflowException

from medsr.registry import RegistryError, register_stage
from medsr.stage_entry import exit_stage, run_stage


def _report(record: dict[str, Any]) -> str:
    return "\n".join(f"{d['registered_model']}: {d['action']}: {d['reason']}" for d in record["decisions"].values())


if __name__ == "__main__":
    # MLflow's INFO lines (database migrations, artifact downloads) would bury the decisions.
    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    exit_stage(run_stage("register", register_stage, _report, errors=(RegistryError, MlflowException)))
