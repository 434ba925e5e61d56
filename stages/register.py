"""DVC stage `register`: a thin entry point over medsr.registry.register_stage (see dvc.yaml)."""

import sys

from medsr.registry_cli import registry_app

if __name__ == "__main__":
    registry_app(["register", *sys.argv[1:]], prog_name="medsr register")
