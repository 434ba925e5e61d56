"""DVC stage `benchmark` (dvc.yaml): every trained model and bicubic on the test split, into
metrics/benchmark.json and plots/ (medsr.benchmark.benchmark_stage)."""


from medsr.benchmark import benchmark_stage
from medsr.stage_entry import exit_stage, run_stage

if __name__ == "__main__":
    exit_stage(run_stage("benchmark", benchmark_stage, lambda _s: "benchmark: written metrics/benchmark.json and plots/"))
