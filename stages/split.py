"""DVC stage `split` (dvc.yaml): train/val/test by patient, into data/split (medsr.pipeline.split_stage)."""


from medsr.pipeline import split_stage
from medsr.stage_entry import exit_stage, run_stage

if __name__ == "__main__":
    exit_stage(run_stage("split", split_stage, lambda _s: "split: written data/split"))
