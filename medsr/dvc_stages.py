"""dvc.yaml's stages as DVC runs them: ``foreach`` expanded to ``name@key`` entries.

Read without DVC (a subprocess per question would cost seconds) by the Prefect flow, which runs
the stages one by one, and by the stage-deps test, which checks each stage's imports. Only the
templating this project's dvc.yaml uses is supported, and anything else is refused rather than
guessed: a ``foreach`` over a list or a ``${dotted.params.key}`` naming a list or a mapping in
params.yaml (its keys are the stage names, as DVC iterates a dict), and ``${item}`` / ``${key}``
inside ``do`` (both become the name: the values of ``train.models`` are read by the stage itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from medsr.params import parse_yaml, section


class DvcYamlError(ValueError):
    """dvc.yaml uses templating this reader does not support; the message names the stage."""


def foreach_keys(stage: str, foreach: Any, params: Mapping[str, Any]) -> list[str]:
    """The names a ``foreach`` expands to: a list's items, or a mapping's keys (``${a.b}`` is
    looked up in ``params``). Raises :class:`DvcYamlError` for anything else, and ParamsError for
    a missing params key."""
    if isinstance(foreach, str) and foreach.startswith("${") and foreach.endswith("}"):
        foreach = section(dict(params), foreach[2:-1])
    if isinstance(foreach, Mapping):
        return [str(key) for key in foreach]
    if isinstance(foreach, list):
        return [str(item) for item in foreach]
    raise DvcYamlError(f"dvc.yaml stage {stage}: foreach must be a list or ${{params.key}} naming a list or "
                       f"mapping, got {foreach!r}")


def expanded_stages(dvc_yaml: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every stage of a loaded dvc.yaml in file order, ``foreach`` stages as ``name@key`` with
    ``${item}`` and ``${key}`` substituted in their ``do`` body."""
    stages: dict[str, dict[str, Any]] = {}
    for name, body in (dvc_yaml.get("stages") or {}).items():
        if "foreach" not in body:
            stages[name] = body
            continue
        for key in foreach_keys(name, body["foreach"], params):
            text = yaml.safe_dump(body["do"]).replace("${item}", key).replace("${key}", key)
            stages[f"{name}@{key}"] = parse_yaml(text)
    return stages
