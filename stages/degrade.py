"""DVC stage `degrade`: a thin entry point over medsr.pipeline.degrade_stage (see dvc.yaml)."""

from medsr.cli import stage_main

if __name__ == "__main__":
    stage_main("degrade")
