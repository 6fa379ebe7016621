"""Every relative link in the README, docs/ and benchmarks/README.md leads to a file of this repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")])

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE = re.compile(r"`[^`\n]*`")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, code and link markup dropped, punctuation removed."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    anchors: set[str] = set()
    for heading in HEADING.findall(text):
        slug, n = _slug(heading), 1
        while slug in anchors:  # repeated headings get -1, -2, ...
            slug = f"{_slug(heading)}-{n}"
            n += 1
        anchors.add(slug)
    return anchors


def relative_links(page: Path) -> list[str]:
    """Link targets in ``page`` outside code, other than absolute URLs."""
    text = CODE.sub("", FENCE.sub("", page.read_text()))
    return [target for target in LINK.findall(text) if not EXTERNAL.match(target)]


def broken_links(page: Path, *, root: Path = ROOT) -> list[str]:
    """Relative links of ``page`` whose file (inside ``root``), or whose anchor in a markdown file, does not exist."""
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.is_relative_to(root.resolve()):
            broken.append(f"{target} (outside the repository)")
        elif not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(root.resolve())})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_points_at_a_folder_beside_the_repository(page: Path) -> None:
    assert "../shared" not in page.read_text(), f"{page.relative_to(ROOT)} names ../shared, which a clone lacks"


def test_a_broken_link_and_a_missing_anchor_are_caught(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "operations.md").write_text("# Operations\n\n## Configuration\n\n```sh\n# not a heading\n```\n")
    page = docs / "probe.md"
    page.write_text(
        "[gone](no-such-file.md) [bad anchor](operations.md#no-such-heading) [ok](operations.md#configuration)\n"
        "[fenced](operations.md#not-a-heading) [out](../../outside.md) `[in code](nowhere.md)`\n"
        "[web](https://example.org/x) [self](#probe)\n\n# Probe\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "no-such-file.md (no such file)",
        "operations.md#no-such-heading (no heading #no-such-heading in docs/operations.md)",
        "operations.md#not-a-heading (no heading #not-a-heading in docs/operations.md)",
        "../../outside.md (outside the repository)",
    ]
