"""DVC stage `benchmark`: a thin entry point over medsr.benchmark.benchmark_stage (see dvc.yaml)."""

from medsr.cli import stage_main

if __name__ == "__main__":
    stage_main("benchmark")
