"""DVC stage `degrade` (dvc.yaml): the LR/HR (and VLR/LR) pair sets of every split and scale, into
data/pairs (medsr.pipeline.degrade_stage)."""


from medsr.pipeline import degrade_stage
from medsr.stage_entry import exit_stage, run_stage

if __name__ == "__main__":
    exit_stage(run_stage("degrade", degrade_stage, lambda s: f"degrade: {s['total_pairs']} pairs written"))
