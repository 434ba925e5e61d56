"""Stage dependencies that cannot drift: every project file a stage's command imports (transitively,
imports inside functions included) must be one of that stage's ``deps`` in dvc.yaml, or lie under
a directory that is. Otherwise editing it leaves `dvc status` saying "up to date" while the stage
would now compute something else.

The closure is read with :mod:`ast` (nothing is imported), resolving ``medsr.*``, ``flows.*`` and
``serving.*`` modules to files; see :mod:`medsr.provenance`.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from medsr.dvc_stages import expanded_stages
from medsr.params import load_params
from medsr.provenance import import_closure, module_file

REPO_ROOT = Path(__file__).resolve().parents[1]


def command_entries(cmd: str | list[str], root: Path = REPO_ROOT) -> list[Path]:
    """The project files a stage command starts from: ``python path.py`` or ``python -m module``."""
    entries: list[Path] = []
    for line in [cmd] if isinstance(cmd, str) else cmd:
        words = shlex.split(line)
        if not words or not Path(words[0]).name.startswith("python"):
            raise AssertionError(f"cannot read the imports of `{line}`: only `python script.py` and "
                                 "`python -m module` commands are checked; extend tests/test_stage_deps.py")
        if words[1] == "-m":
            found = module_file(words[2], root)
            assert found is not None, f"`{line}`: module {words[2]} is not a project file"
            entries.append(found)
        else:
            entries.append(root / words[1])
    return entries


def _covered(path: str, deps: list[str]) -> bool:
    target = PurePosixPath(path)
    return any(target == PurePosixPath(dep) or PurePosixPath(dep) in target.parents for dep in deps)


def missing_deps(stage: dict[str, Any], root: Path = REPO_ROOT) -> list[str]:
    """Imported project files (repository-relative) that none of the stage's deps covers."""
    deps = [str(d).rstrip("/") for d in stage.get("deps") or []]
    closure = import_closure(command_entries(stage["cmd"], root), root)
    needed = sorted(p.relative_to(root.resolve()).as_posix() for p in closure)
    return [path for path in needed if not _covered(path, deps)]


@pytest.fixture(scope="module")
def stages() -> dict[str, dict[str, Any]]:
    return expanded_stages(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text()), load_params(REPO_ROOT / "params.yaml"))


def test_every_stage_lists_every_project_file_its_command_imports(stages: dict[str, dict[str, Any]]) -> None:
    problems = {name: missing for name, stage in stages.items() if (missing := missing_deps(stage))}
    assert not problems, "dvc.yaml deps miss files the stage command imports (add them to the stage's deps): " + "; ".join(
        f"{name}: {', '.join(missing)}" for name, missing in problems.items())


def test_every_dep_exists(stages: dict[str, dict[str, Any]]) -> None:
    # Data deps (data/..., models, metrics/...) are outputs of earlier stages; code deps must be here.
    code = {str(d) for s in stages.values() for d in s.get("deps") or [] if str(d).split("/")[0] in {"medsr", "stages", "flows", "serving"}}
    absent = sorted(d for d in code if not (REPO_ROOT / d).exists())
    assert not absent, f"dvc.yaml names code deps that do not exist: {', '.join(absent)}"


def test_a_removed_dep_is_named(stages: dict[str, dict[str, Any]]) -> None:
    """The check itself can fail: drop one imported file from a stage's deps and it is reported."""
    stage = copy.deepcopy(stages["train@espcn"])
    imported = import_closure(command_entries(stage["cmd"]))
    assert REPO_ROOT / "medsr" / "stage_entry.py" in imported
    already = set(missing_deps(stage))  # reported by the test above, not this one's business
    stage["deps"] = [d for d in stage["deps"] if d != "medsr/stage_entry.py"]
    assert set(missing_deps(stage)) - already == {"medsr/stage_entry.py"}


def test_closure_follows_imports_inside_functions(tmp_path: Path) -> None:
    (tmp_path / "medsr" / "sub").mkdir(parents=True)
    (tmp_path / "medsr" / "__init__.py").write_text("")
    (tmp_path / "medsr" / "sub" / "__init__.py").write_text("")
    (tmp_path / "medsr" / "sub" / "late.py").write_text("from . import sibling\n")
    (tmp_path / "medsr" / "sub" / "sibling.py").write_text("import os\n")
    (tmp_path / "medsr" / "unused.py").write_text("")
    script = tmp_path / "run.py"
    script.write_text("def main():\n    from medsr.sub import late\n")
    found = {p.relative_to(tmp_path.resolve()).as_posix() for p in import_closure([script], tmp_path)}
    assert found == {"run.py", "medsr/__init__.py", "medsr/sub/__init__.py", "medsr/sub/late.py", "medsr/sub/sibling.py"}


def test_the_stages_paths_are_dvc_yaml_s_and_no_setting_pretends_to_move_them(
        stages: dict[str, dict[str, Any]]) -> None:
    """Where pairs are written and checkpoints kept is fixed by dvc.yaml; training and the benchmark
    read the same two constants, and params.yaml has no key that would move one of them alone."""
    from medsr.stage_entry import MODELS_DIR, PAIRS_DIR
    from medsr.training import TrainConfig

    def outs(stage: dict[str, Any]) -> set[str]:
        return {next(iter(o)) if isinstance(o, dict) else str(o) for o in stage.get("outs") or []}

    assert PAIRS_DIR.as_posix() in outs(stages["degrade"])
    assert {f"{MODELS_DIR.as_posix()}/espcn"} <= outs(stages["train@espcn"])
    assert {PAIRS_DIR.as_posix(), MODELS_DIR.as_posix()} <= set(map(str, stages["benchmark"]["deps"]))
    params = load_params(REPO_ROOT / "params.yaml")
    assert not {"pairs_root", "out_root"} & set(params["train"])
    config = TrainConfig.from_params(dict(params), "espcn", 4)
    assert (config.pairs_root, config.out_dir) == (PAIRS_DIR.as_posix(), f"{MODELS_DIR.as_posix()}/espcn/x4")
