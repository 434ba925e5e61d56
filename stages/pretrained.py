"""DVC stage `pretrained` (dvc.yaml): fetch or find the published checkpoints that train.models names
as `init`, checked by sha256, into pretrained/ (medsr.pretrained.pretrained_stage)."""


from medsr.pretrained import pretrained_stage
from medsr.stage_entry import exit_stage, run_stage

if __name__ == "__main__":
    exit_stage(run_stage("pretrained", pretrained_stage,
                       lambda s: f"pretrained: {len(s['checkpoints'])} checkpoints ("
                                 + (", ".join(f"{c['path']} {c['status']}" for c in s["checkpoints"]) or "none named")
                                 + ")"))
