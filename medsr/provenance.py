"""What a result depends on in code: the project source files a script or module imports, and a
digest of them.

Two users: the DVC dependency test (every stage's ``deps`` must cover the files its command
imports, so that editing one reruns the stage) and the training digest (a checkpoint resumes only
when the model's code is the one that wrote it). Both read imports with :mod:`ast` rather than
importing anything, so the answer costs milliseconds and cannot run project code.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES: tuple[str, ...] = ("medsr", "flows", "serving")


def module_file(module: str, root: Path = REPO_ROOT) -> Path | None:
    """``a.b.c`` -> ``root/a/b/c.py`` or ``root/a/b/c/__init__.py``; None when neither exists."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path, root: Path) -> str | None:
    try:
        parts = list(path.resolve().relative_to(root.resolve()).with_suffix("").parts)
    except ValueError:
        return None  # a script outside the project (or beside it, as stages/*.py are)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or None


def _import_statements(path: Path, root: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` per ``import`` anywhere in ``path`` (functions included), relative
    imports resolved: ``import a.b`` is ``("a.b", [])``, ``from a import b, c`` is ``("a", ["b", "c"])``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    own = _module_name(path, root)
    is_package = path.name == "__init__.py"
    statements: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            statements.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if own is None:
                    continue
                package = own.split(".") if is_package else own.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            statements.append((base, [alias.name for alias in node.names if alias.name != "*"]))
    return statements


def _imported_names(path: Path, root: Path) -> set[str]:
    """Every module name an ``import`` anywhere in ``path`` (functions included) may load."""
    names: set[str] = set()
    for base, aliases in _import_statements(path, root):
        names.add(base)
        # `from pkg import sub` loads pkg/sub.py when sub is a module, not just a name in pkg.
        names.update(f"{base}.{alias}" for alias in aliases)
    return names


def project_imports(module: str, root: Path = REPO_ROOT, packages: tuple[str, ...] = PROJECT_PACKAGES) -> set[str]:
    """The project modules ``module`` imports directly (anywhere in it, functions included).

    ``from pkg import sub`` counts as importing ``pkg.sub`` alone when ``pkg`` is a parent
    package of ``module`` (Python has run that ``__init__`` already); ``from pkg import name``
    of a plain name counts as importing ``pkg``, whose ``__init__`` defines it.
    """
    path = module_file(module, root)
    if path is None:
        raise ValueError(f"{module}: no such module under {root}")
    ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    if path.name == "__init__.py":
        ancestors.add(module)
    found: set[str] = set()

    def add(name: str) -> None:
        while name and module_file(name, root) is None:
            name = name.rpartition(".")[0]
        if name and name.split(".")[0] in packages and name != module:
            found.add(name)

    for base, aliases in _import_statements(path, root):
        submodules = [f"{base}.{a}" for a in aliases if module_file(f"{base}.{a}", root) is not None]
        for name in submodules:
            add(name)
        if not aliases or len(submodules) < len(aliases) or base not in ancestors:
            add(base)
    return found


def _loaded_files(module: str, root: Path, packages: tuple[str, ...], with_parents: bool) -> list[Path]:
    """Files Python executes to import ``module``: its file, and (``with_parents``) every parent
    package's ``__init__.py``, which runs first."""
    parts = module.split(".")
    if parts[0] not in packages:
        return []
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if with_parents else [module]
    found = []
    for prefix in prefixes:
        path = module_file(prefix, root)
        if path is not None:
            found.append(path)
    return found


def import_closure(entries: Iterable[Path], root: Path = REPO_ROOT, packages: tuple[str, ...] = PROJECT_PACKAGES,
                   *, with_parents: bool = True) -> set[Path]:
    """Project files ``entries`` load, transitively, counting imports inside functions too.

    Over-approximates on purpose: an import inside a function that the command never calls still
    counts, since nothing short of running every path could rule it out. ``with_parents=False``
    leaves out parent packages' ``__init__.py`` (for a digest of one model's code, where the
    registry in ``medsr/models/__init__.py`` would tie every model to every other).
    """
    root = root.resolve()
    seen: set[Path] = set()
    todo = [Path(e).resolve() for e in entries]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(path, root):
            todo.extend(p for p in _loaded_files(name, root, packages, with_parents) if p not in seen)
    return seen


def source_digest(files: Iterable[Path], root: Path = REPO_ROOT) -> str:
    """sha256 (16 hex) over the files' repository-relative names and bytes, in name order."""
    digest = hashlib.sha256()
    root = root.resolve()
    for path in sorted({Path(f).resolve() for f in files}):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
