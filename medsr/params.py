"""Reading ``params.yaml``: the single source of every knob the stages and flows use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml is missing, unreadable, or lacks a key a stage needs."""


# libyaml's parser when PyYAML was built with it (the wheels are): the pure-Python one took 1.1 s to
# read a 70 kB dvc.lock, which every training run reads twice per scale.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with the fast parser; raises ``yaml.YAMLError`` as it does."""
    return yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 - a safe loader, C or Python


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the repository root or pass --params PATH")
    try:
        params = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err.__class__.__name__}); fix the syntax") from err
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return params


def section(params: dict[str, Any], dotted: str) -> Any:
    """``section(params, "data.split")``; a missing key names itself and the file."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"params.yaml lacks `{dotted}` (missing `{part}`); the repository's params.yaml lists every key")
        node = node[part]
    return node
