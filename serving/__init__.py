"""The MedSR BentoML service (``serving/service.py``) and what starts it.

The model logic (tiled inference, consistency score, writing every format) lives in
:mod:`medsr.inference` and :mod:`medsr.data.writing`. This package serves it:
:mod:`serving.uploads` (reading uploads, the /upscale pipeline), :mod:`serving.errors` (the
error format, the gateway middleware, metrics), :mod:`serving.schemas` (the array endpoint's
JSON), :mod:`serving.web` (the web page and its comparison), :mod:`serving.packaging` (Bentos)
and :mod:`serving.service` (the BentoML service). Here:

* :func:`load_config`: the ``serving:`` section of ``params.yaml``, the registered model names
  (``registry.model_names``) and the ``degrade:`` section; no defaults are kept here
  (``MEDSR_PARAMS`` names another params file: tests and the benchmark use it);
* :class:`ServiceProcess`: ``bentoml serve`` on 127.0.0.1 in a child process, waited for until
  ``/readyz`` answers, stopped on exit; the tests and ``benchmarks/bench_serving.py`` use it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICE_TARGET = "serving.service:MedSR"

# Telemetry off: the network is closed and every tool tries to phone home.
QUIET_ENV: dict[str, str] = {
    "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
}


SERVING_KEYS: tuple[str, ...] = (
    "host", "port", "device", "alias", "max_output_pixels", "max_upload_bytes", "max_array_output_pixels",
    "max_json_bytes", "max_json_depth", "max_json_number_chars", "max_in_flight", "max_wait_s",
    "read_timeout_s", "compute_timeout_s", "tile",
    "tile_batch", "consistency_warning_db", "demo_max_side", "max_cached_versions", "threads", "torch_threads",
    "png_level", "refine", "batching", "shutdown_grace_s",
)


@dataclass(frozen=True)
class ServingConfig:
    """What the service reads from params.yaml, the one place its settings live.

    ``serving``: the ``serving:`` section; ``model_names``: scale -> registered model
    (``registry.model_names``, the names the register stage writes), x4 first; ``degrade``: the
    ``degrade:`` section (the consistency score's blur, the demo's noise per modality);
    ``consistency``: the back-projection step applied when ``serving.refine`` is true.
    """

    serving: dict[str, Any]
    model_names: dict[int, str]
    degrade: dict[str, Any]
    consistency: dict[str, Any]
    path: Path

    @property
    def scales(self) -> tuple[int, ...]:
        """Scales served, the required one (the largest) first."""
        return tuple(sorted(self.model_names, reverse=True))


def params_path() -> Path:
    """``$MEDSR_PARAMS``, else ``params.yaml`` in the working directory, else the repository's."""
    named = os.environ.get("MEDSR_PARAMS")
    if named:
        return Path(named)
    for candidate in (Path("params.yaml"), REPO_ROOT / "params.yaml"):
        if candidate.is_file():
            return candidate
    return REPO_ROOT / "params.yaml"


def load_config(path: Path | None = None) -> ServingConfig:
    """The service's settings from params.yaml (a Bento carries it: bentofile.yaml includes it).

    Raises:
        medsr.params.ParamsError: the file is missing or lacks a key the service needs.
    """
    from medsr.params import ParamsError, load_params, section

    path = path or params_path()
    params = load_params(path)
    serving = dict(section(params, "serving"))
    missing = [key for key in SERVING_KEYS if key not in serving]
    if missing:
        raise ParamsError(f"{path}: `serving:` lacks {', '.join(missing)}; see params.yaml and docs/serving.md")
    names = {int(str(key).lstrip("x")): str(value) for key, value in section(params, "registry.model_names").items()}
    return ServingConfig(serving=serving, model_names=names, degrade=dict(section(params, "degrade")),
                         consistency=dict(params.get("consistency") or {}), path=path)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """``bentoml serve serving.service:MedSR`` on 127.0.0.1 as a child process.

    Use as a context manager: entering starts the server and waits until ``/readyz`` answers
    200 (the champion is loaded); leaving stops the whole process group. ``env`` is added to
    the current environment (e.g. ``MLFLOW_TRACKING_URI``); output goes to ``log_path``.
    """

    def __init__(self, *, port: int | None = None, env: Mapping[str, str] | None = None,
                 log_path: Path | None = None, startup_timeout: float = 120.0, device: str = "auto",
                 cwd: Path = REPO_ROOT, target: str = SERVICE_TARGET) -> None:
        self.port = port or free_port()
        self.env = {**os.environ, **QUIET_ENV, **(env or {})}
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.device = device
        self.cwd = cwd
        self.target = target
        self.process: subprocess.Popen[bytes] | None = None
        self._log_handle: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        import httpx

        command = [sys.executable, "-m", "bentoml", "serve", self.target, "--host", "127.0.0.1",
                   "--port", str(self.port), "--arg", f"device={self.device}"]
        output: Any = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = output = self.log_path.open("wb")
        self.process = subprocess.Popen(command, cwd=self.cwd, env=self.env, stdout=output, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with code {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"the service did not become ready in {self.startup_timeout:.0f} s; see {self.log_path}")

    def server_pids(self) -> list[int]:
        """The server's process and its children (the API worker holds the model)."""
        import psutil

        if self.process is None:
            return []
        try:
            parent = psutil.Process(self.process.pid)
            return [parent.pid, *(child.pid for child in parent.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """SIGTERM the server (it stops its workers), then SIGKILL whatever of it is left."""
        import psutil

        if self.process is not None and self.process.poll() is None:
            workers = [psutil.Process(pid) for pid in self.server_pids()[1:] if psutil.pid_exists(pid)]
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=10)
            # Workers run in their own process groups: end any that outlived the server.
            _gone, alive = psutil.wait_procs(workers, timeout=10)
            for worker in alive:
                worker.kill()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def register_generator(architecture: str, scale: int, *, artifact_dir: Path | None = None, champion: bool = True,
                       seed: int = 0, options: Mapping[str, Any] | None = None) -> str:
    """Log a freshly initialised generator with :func:`medsr.tracking.log_generator` and register
    it as a new version of the scale's registered model (``registry.model_names`` in params.yaml),
    aliased ``serving.alias`` when ``champion``.

    For tests, benchmarks and trying the service before any training: an untrained generator is
    a residual over bicubic, so it already gives bicubic-like output. Uses the MLflow store that
    ``MLFLOW_TRACKING_URI`` names (else ``mlflow.db`` in the working directory); ``artifact_dir``
    keeps the experiment's artifacts there when the experiment is created here. Returns the
    registry version.
    """
    import mlflow
    import numpy as np
    import torch
    from mlflow import MlflowClient

    from medsr.models import build_generator
    from medsr.tracking import EXPERIMENT, configure, log_generator, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    if artifact_dir is not None and mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=Path(artifact_dir).resolve().as_uri())
    configure()
    torch.manual_seed(seed)
    generator = build_generator(architecture, scale, **dict(options or {})).eval()
    # Batch of 2: a batch of 1 would freeze the batch size in the logged signature's example.
    example = np.random.default_rng(seed).random((2, 1, 16, 16), dtype=np.float32)
    config = load_config()
    name = config.model_names[scale]
    with mlflow.start_run(run_name=f"untrained-{architecture}-x{scale}"):
        uri = log_generator(generator, example, {"model": architecture, "scale": scale, "options": dict(options or {})})
    version = str(mlflow.register_model(uri, name).version)
    if champion:
        MlflowClient().set_registered_model_alias(name, str(config.serving["alias"]), version)
    return version
