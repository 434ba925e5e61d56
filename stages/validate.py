"""DVC stage `validate` (dvc.yaml): the Great Expectations suite and pixel checks over data/interim;
failures are quarantined (medsr.pipeline.validate_stage)."""


from medsr.pipeline import validate_stage
from medsr.stage_entry import exit_stage, run_stage

if __name__ == "__main__":
    exit_stage(run_stage("validate", validate_stage,
                       lambda s: f"validate: {s['passed']} passed, {s['quarantined']} quarantined"))
