"""DVC stage `sources` (dvc.yaml, always run): a stat fingerprint of every `local` source folder into
data/local-sources.json, so that `download` reruns exactly when such a folder's images changed
(medsr.data.sources.local.sources_stage). Without a local source it only records the kinds."""


from medsr.data.sources.local import FINGERPRINT_PATH, sources_stage
from medsr.stage_entry import exit_stage, run_stage

if __name__ == "__main__":
    exit_stage(run_stage("sources", sources_stage, lambda _s: f"sources: written {FINGERPRINT_PATH}"))
