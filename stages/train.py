"""DVC stage `train@<model>` (dvc.yaml): one model at every scale, tracked in MLflow, into
models/<model> (medsr.training.stage.train_stage). Usage: python stages/train.py MODEL"""

import argparse
from typing import Any

from medsr.stage_entry import exit_stage, run_stage
from medsr.training.stage import train_stage


def _report(summary: dict[str, Any]) -> str:
    return "\n".join(f"train {summary['model']} {scale}: best val PSNR {r['best_val_psnr']:.2f} dB at step "
                     f"{r['best_step']} of {r['steps_done']} ({r['seconds']:.0f} s)"
                     for scale, r in summary["scales"].items())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages/train.py", description=__doc__)
    # Not argparse choices: an unknown name gets train_stage's one-line refusal, as `medsr train` gives.
    parser.add_argument("model", help="a trained model's name (params.yaml `models` lists what DVC trains)")
    args = parser.parse_args()
    exit_stage(run_stage("train", lambda params: train_stage(params, args.model), _report))
