"""DVC stage `split` (dvc.yaml): train/val/test by patient, into data/split (medsr.pipeline.split_stage)."""

import sys

from medsr.pipeline import split_stage
from medsr.stage_entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("split", split_stage, lambda _s: "split: written data/split"))
