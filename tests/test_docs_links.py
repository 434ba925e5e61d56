"""Every relative link in the README and docs/ points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(page.read_text())
            if not re.match(r"[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")]


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    assert len(pages) > 1
    broken = [f"{page.relative_to(REPO_ROOT)} -> {target}" for page in pages for target in _relative_links(page)
              if not (page.parent / target.split("#", 1)[0]).exists()]
    assert not broken, broken
    assert any(_relative_links(page) for page in pages)  # the check read some links
