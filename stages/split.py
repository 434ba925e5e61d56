"""DVC stage `split`: a thin entry point over medsr.pipeline.split_stage (see dvc.yaml)."""

from medsr.cli import stage_main

if __name__ == "__main__":
    stage_main("split")
