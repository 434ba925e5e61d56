"""DVC stage `validate`: a thin entry point over medsr.pipeline.validate_stage (see dvc.yaml)."""

from medsr.cli import stage_main

if __name__ == "__main__":
    stage_main("validate")
