"""DVC stage `download` (dvc.yaml): fetch each modality's source into data/raw, then load, window,
tile and tabulate it into data/interim (medsr.pipeline.download_stage)."""


from medsr.pipeline import download_stage
from medsr.stage_entry import exit_stage, run_stage

if __name__ == "__main__":
    exit_stage(run_stage("download", download_stage,
                       lambda s: f"download: {s['images']} images from {s['files']} files "
                                 f"({s['load_errors']} could not be loaded)"))
