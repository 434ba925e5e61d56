"""The `train@<model>` DVC stage as a function: one model at every scale, tracked in MLflow.

``models/<model>`` persists across ``dvc repro`` so that a killed run resumes from its last
checkpoint. A checkpoint is only resumed when everything its result depends on is what wrote it:
``models/<model>/x<scale>/inputs.json`` records the digest of

* the training config (the model options included), as resolved from params.yaml;
* the data version of the pair sets the run reads (their ``index.json`` and pixel arrays);
* the code version of the model (its architecture's source and the training loop's).

Any difference, or no record at all, and the run starts at step 0 with a log line saying which
of the three changed: otherwise a degrade change would "resume" the finished old model and MLflow
would report it as trained on the new data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from medsr.atomic import write_json
from medsr.params import section
from medsr.provenance import REPO_ROOT, import_closure, module_file, source_digest
from medsr.stage_entry import METRICS_DIR, StageFailed
from medsr.training.data import tile_set_path

log = logging.getLogger(__name__)

INPUTS_NAME = "inputs.json"
_LEGACY_MARKER = "config.sha256"  # a config-only digest: it cannot vouch for the data or the code
_HASH_CHUNK = 1 << 20


def config_digest(config: Any) -> str:
    """The training config (model and discriminator options included), minus what only changes
    how a run executes (device, workers, ranks, scales at once, resume, progress bar), not what it
    computes: a run killed on N ranks resumes on any other number (the global batch does not depend on it)."""
    relevant = {k: v for k, v in config.to_dict().items()
                if k not in ("resume", "quiet", "num_workers", "device", "nproc", "concurrent_scales")
                and not (k == "init" and v is None)}  # no init: the digests from before init existed
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pair_sets_read(pairs_root: str | Path, scale: int) -> list[Path]:
    """The sets a run at ``scale`` may read: the training tiles (every kind and scale is degraded
    from them, with the recipe their index holds) and every validation set at ``scale``. A superset
    of what one model reads, so that a new track cannot slip past the digest."""
    root = Path(pairs_root)
    home = root / "val" / f"x{int(scale)}"
    validation = sorted(folder for folder in home.iterdir() if folder.is_dir()) if home.is_dir() else []
    tiles = tile_set_path(root)
    return ([tiles] if tiles.is_dir() else []) + validation


def data_version(pairs_root: str | Path, scale: int) -> str:
    """The version of the pair sets a run at ``scale`` reads, from ``dvc.lock`` when DVC vouches for it.

    * ``dvc:<md5>``, degrade's output hash in ``dvc.lock``, read in milliseconds, when
      - the run is a ``dvc repro`` stage (DVC sets ``DVC_STAGE``): DVC has just checked
        ``data/pairs`` against the lock (or rerun degrade and recorded the new hash), or
      - outside DVC, ``data/pairs`` is still the cache's checkout of that hash, told by ``stat``
        (:func:`medsr.tracking.is_cache_checkout`: every file on its cache object's inode), so a run
        killed outside DVC and resumed by ``dvc repro`` (or the reverse) keeps its version.
      The hash covers every split and scale, a superset of what this run reads.
    * Otherwise (a folder other than degrade's output, pairs rewritten or copied since the last
      ``dvc repro``, no lock) the sets :func:`pair_sets_read` names are hashed, file names and
      bytes (16 hex of sha256): the pixel arrays too, since a degradation change keeps every id,
      offset and shape of ``index.json``. This form never matches the other: a run whose version
      changed form starts again at step 0 rather than trust what it cannot check.
    """
    from medsr.tracking import is_cache_checkout, locked_hash

    dvc_root = Path(os.environ.get("DVC_ROOT", "."))
    locked = locked_hash(Path(pairs_root), "degrade", dvc_root / "dvc.lock")
    if locked is not None and (os.environ.get("DVC_STAGE")
                               or is_cache_checkout(dvc_root / pairs_root, locked, dvc_root / ".dvc" / "cache")):
        return locked
    root = Path(pairs_root)
    digest = hashlib.sha256()
    for folder in pair_sets_read(root, scale):
        # Every file of the set (index.json, lr.npy, hr.npy today), so a new one cannot slip past.
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0".encode())
            with path.open("rb") as handle:
                while chunk := handle.read(_HASH_CHUNK):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def code_files(model: str) -> set[Path]:
    """The source that decides what training ``model`` computes: the module that registers its
    architecture (and what that imports), the model registry and its noise gate, and the training loop (trainer,
    batches, losses, validation metrics, checkpoints), but not the other models' files."""
    from medsr.models import model_spec

    models_dir = REPO_ROOT / "medsr" / "models"
    loop = {p for p in import_closure([REPO_ROOT / "medsr" / "training" / "trainer.py"], with_parents=False)
            if models_dir not in p.parents}
    architecture = module_file(model_spec(model).generator.__module__)
    own = import_closure([architecture], with_parents=False) if architecture else set(models_dir.glob("*.py"))
    # Every generator is built through the registry, which also builds the noise-gated pair (a model option).
    gate = import_closure([models_dir / "gated.py"], with_parents=False)
    return loop | own | gate | {models_dir / "__init__.py", models_dir / "architectures.py"}


@lru_cache(maxsize=None)
def code_version(model: str) -> str:
    """sha256 (16 hex) of :func:`code_files`."""
    return source_digest(code_files(model))


def training_inputs(config: Any) -> dict[str, str]:
    """What a checkpoint of ``config`` depends on, each part as a short digest, plus their sum."""
    parts = {"config": config_digest(config), "data": data_version(config.pairs_root, config.scale),
             "code": code_version(config.model)}
    parts["digest"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return parts


_WHY = {"config": "the training config (or model options) changed", "data": "the training data changed",
        "code": "the model or training code changed"}


def stale_reason(out_dir: Path, inputs: dict[str, str]) -> str | None:
    """Why what is in ``out_dir`` must not be resumed, or None when it may be (or there is nothing)."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return None
    marker = out_dir / INPUTS_NAME
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return "no record of the inputs that trained it"
    changed = [part for part in ("config", "data", "code") if recorded.get(part) != inputs[part]]
    if not changed:
        return None
    return "; ".join(f"{_WHY[part]} ({recorded.get(part)} -> {inputs[part]})" for part in changed)


def prepare_out_dir(config: Any) -> dict[str, str]:
    """Empty ``config.out_dir`` unless its checkpoint was trained on exactly these inputs; record them.

    The record is written before training starts, so a run killed midway resumes on the next call.
    """
    out_dir = Path(config.out_dir)
    inputs = training_inputs(config)
    reason = stale_reason(out_dir, inputs)
    label = f"{config.model} x{config.scale}"
    if reason is not None:
        log.info("%s: not resuming %s: %s; training starts at step 0", label, out_dir, reason)
        shutil.rmtree(out_dir)
    elif (out_dir / "last.pt").is_file():
        log.info("%s: config, data and code match the checkpoint in %s: resuming it", label, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _LEGACY_MARKER).unlink(missing_ok=True)
    write_json(out_dir / INPUTS_NAME, inputs)
    return inputs


def run_tags(inputs: dict[str, str], world_size: int = 1, threads: int | None = None) -> dict[str, str]:
    """The MLflow tags of one scale's run: what it was trained on and how it was computed
    (``threads``: the torch threads it trains on; default this process's now)."""
    import torch

    # The thread count is provenance: the same run on 1 and 2 threads rounds its sums differently.
    return {"pairs_version": inputs["data"], "code_version": inputs["code"], "inputs_digest": inputs["digest"],
            "nproc": str(world_size), "torch_threads": str(threads or torch.get_num_threads())}


def scale_concurrency(config: Any, n_scales: int, *, distributed: bool = False, cores: int | None = None) -> int:
    """How many scales of one model train at once (``train.concurrent_scales``).

    ``auto``: on the CPU, one process per scale while every process keeps a core of its own
    (``min(scales, cores)``); a small network on one thread each keeps both of 2 cores busy where one
    process on 2 threads leaves a third of them idle (its patch degradation and Python run on one),
    ESPCN's two scales finished in 0.68x the time (measured, 2 cores). One at a time on a GPU (the
    scales would share its memory and queue) and under torchrun (each rank is already one of N).
    An integer is a cap, whatever the device.
    """
    from medsr.inference import available_cores, pick_device

    setting = config.concurrent_scales
    if distributed or n_scales < 2:
        return 1
    if setting == "auto":
        if pick_device(config.device).type != "cpu":
            return 1
        return max(1, min(n_scales, cores or available_cores()))
    return min(int(setting), n_scales)


def process_shares(scales: list[int], at_once: int, previous_seconds: dict[int, float] | None = None) -> list[list[int]]:
    """The scales each of ``at_once`` processes trains, the stage process's share last: every
    ``at_once``-th scale from the first, the second, ...; ordered by the seconds each scale took
    last time (``metrics/train/<model>.json``) when known, so the stage process takes the longest
    share and the ~5 s a spawned process spends importing torch and MLflow come off a shorter one.
    Without a record the largest scale's share is last. Which process trains a scale does not
    change what it computes (every process has the same thread count)."""
    shares = [scales[i::at_once] for i in range(at_once)]
    if previous_seconds:
        shares.sort(key=lambda share: sum(previous_seconds.get(scale, 0.0) for scale in share))  # stable on ties
    return shares


def previous_seconds(metrics_file: Path) -> dict[int, float]:
    """Seconds per scale of the last recorded run of a model's train stage; empty when unreadable."""
    try:
        scales = json.loads(metrics_file.read_text())["scales"]
        return {int(key.removeprefix("x")): float(entry["seconds"]) for key, entry in scales.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _train_scales_at_once(params: dict[str, Any], model: str, scales: list[int], at_once: int, *,
                          profile: str | None, shares: list[list[int]]) -> dict[str, Any]:
    """Train ``scales`` in ``at_once`` processes, each on ``cores // at_once`` torch threads: a
    spawned process for each of ``shares`` but the last, which this one trains (:func:`process_shares`).

    The share of each process and its thread count are fixed before any starts, so a run computes
    the same numbers whichever process finishes first (threads that grew when a sibling finished
    would make the result depend on timing). A failed or killed process fails the stage with its
    scales named; the others are stopped, their checkpoints kept for the next run to resume.
    """
    import multiprocessing

    import torch

    from medsr import tracking
    from medsr.inference import available_cores
    from medsr.training.config import TrainConfig
    from medsr.training.tracked import train_tracked

    threads = max(1, available_cores() // at_once)
    configs = {scale: TrainConfig.from_params(params, model, scale, profile=profile) for scale in scales}
    tags = {scale: run_tags(prepare_out_dir(config), threads=threads) for scale, config in configs.items()}
    tracking.configure()  # the store and experiment exist before two processes race to create them
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or handlers
    children = []
    for share in shares[:-1]:
        receive, send = spawn.Pipe(duplex=False)
        child = spawn.Process(target=_train_share, args=(send, params, model, {s: configs[s] for s in share},
                                                         threads, tags),
                              name=f"train {model} {' '.join(f'x{s}' for s in share)}")
        child.start()
        send.close()  # only the child holds the sending end: its exit without a result reads as EOF
        children.append((share, child, receive))
    results: dict[str, Any] = {}
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for scale in shares[-1]:
            results[f"x{scale}"] = train_tracked(configs[scale], params, extra_tags=tags[scale])
        failures = []
        for share, child, receive in children:
            label = ", ".join(f"{model} x{s}" for s in share)
            try:
                status, payload = receive.recv()
            except EOFError:
                child.join()
                status, payload = "error", f"its process exited with status {child.exitcode} before reporting"
            child.join()
            if status == "ok":
                results.update(payload)
            else:
                failures.append(f"{label}: {payload}")
        if failures:
            raise StageFailed("training failed in a parallel process: " + "; ".join(failures))
    finally:
        torch.set_num_threads(previous)
        for _, child, receive in children:
            if child.is_alive():
                child.terminate()
            child.join()
            receive.close()
    return {f"x{scale}": results[f"x{scale}"] for scale in scales}


def _train_share(send: Any, params: dict[str, Any], model: str, configs: dict[int, Any], threads: int,
                 tags: dict[int, dict[str, str]]) -> None:
    """A spawned process of :func:`_train_scales_at_once`: its scales' ``configs`` in order on
    ``threads`` torch threads; sends ("ok", results) or ("error", the first line of what went wrong)."""
    import torch

    from medsr.stage_entry import one_line
    from medsr.training.tracked import train_tracked

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(threads)
    label = f"{model} {' '.join(f'x{s}' for s in configs)}"
    log.info("%s: training in process %d beside its other scales, on %d torch thread(s)", label, os.getpid(), threads)
    try:
        results = {f"x{scale}": train_tracked(config, params, extra_tags=tags[scale]) for scale, config in configs.items()}
        send.send(("ok", results))
    except Exception as err:  # the parent names the scale and fails the stage; the traceback stays here
        log.exception("%s: training failed", label)
        send.send(("error", one_line(err)))
    finally:
        send.close()


def train_stage(params: dict[str, Any], model: str, *, profile: str | None = None) -> dict[str, Any]:
    """Train ``model`` at every scale in degrade.scales, tracked in MLflow; resumes a killed run
    only when its config, data and code are unchanged.

    ``train.nproc`` > 1 runs the same function on that many torchrun ranks
    (:mod:`medsr.training.launch`); rank 0 alone prepares the output folder, tracks the run in
    MLflow and writes the metrics, which this process then reads back. Otherwise the scales train
    side by side in their own processes when :func:`scale_concurrency` says so.
    """
    from medsr.models import model_names
    from medsr.training import dist, launch
    from medsr.training.config import TrainConfig
    from medsr.training.tracked import train_tracked
    from medsr.training.trainer import train_generator

    trained = model_names(trained=True)
    if model not in trained:
        baseline = model in model_names(trained=False)
        raise StageFailed(f"unknown model {model!r}: choose one of {', '.join(trained)}"
                          + (f" ({model} is an untrained baseline)" if baseline else ""))
    scales = [int(scale) for scale in section(params, "degrade.scales")]
    # As resolved for this model and profile (TrainConfig checks it is positive and divides the batch).
    first = TrainConfig.from_params(params, model, scales[0], profile=profile) if scales else None
    nproc = first.nproc if first is not None else 1
    metrics_file = METRICS_DIR / "train" / f"{model}.json"
    # The last run's record (dvc.yaml keeps it: persist) orders the shares; it goes before any training, so a
    # failed run cannot pass off an older summary as its own. Under torchrun the launching process did both.
    last_seconds: dict[int, float] = {}
    if not dist.launched():
        last_seconds = previous_seconds(metrics_file)
        metrics_file.unlink(missing_ok=True)
    if nproc > 1 and not dist.launched():
        status = launch.launch(params, model, nproc, profile=profile)
        if status != 0 or not metrics_file.is_file():
            raise StageFailed(f"torchrun with {nproc} ranks exited with status {status}; see the ranks' output above")
        return json.loads(metrics_file.read_text())

    ctx = dist.init(first.device if first is not None else "auto")
    at_once = scale_concurrency(first, len(scales), distributed=ctx.distributed) if first is not None else 1
    results: dict[str, Any] = {}
    if at_once > 1:
        results = _train_scales_at_once(params, model, scales, at_once, profile=profile,
                                        shares=process_shares(scales, at_once, last_seconds))
    else:
        for scale in scales:
            config = TrainConfig.from_params(params, model, scale, profile=profile)
            # Rank 0 alone clears or keeps the folder; the others wait, then read the same checkpoint.
            inputs = prepare_out_dir(config) if ctx.is_main else None
            dist.barrier()
            if ctx.is_main:
                assert inputs is not None
                results[f"x{scale}"] = train_tracked(config, params, extra_tags=run_tags(inputs, ctx.world_size))
            else:
                train_generator(config)
    summary = {"model": model, "scales": results}
    if ctx.is_main:
        write_json(metrics_file, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """One rank of a torchrun job (:mod:`medsr.training.launch`): the train stage of one model,
    then leave the group."""
    import argparse

    from medsr.stage_entry import run_stage
    from medsr.training import dist

    parser = argparse.ArgumentParser(prog="python -m medsr.training.stage",
                                     description="One torchrun rank of `medsr train` (see medsr.training.launch).")
    parser.add_argument("model")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--profile", default=None)
    args = parser.parse_args(argv)
    try:
        return run_stage("train", lambda params: train_stage(params, args.model, profile=args.profile),
                         params_path=args.params)
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
