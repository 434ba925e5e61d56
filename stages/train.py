"""DVC stage `train@<model>`: a thin entry point over medsr.training.stage.train_stage (see dvc.yaml)."""

from medsr.cli import stage_main

if __name__ == "__main__":
    stage_main("train")
