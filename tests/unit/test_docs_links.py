"""The front door stays walkable: README.md is short, every relative link in it and in docs/*.md
points to a file that exists (and to a heading that exists, when it names one), and CI still runs the
README's test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 160  # issue 28: "at most ~150 lines"; everything else lives in docs/

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def links(text: str) -> list[str]:
    """Link targets of ``text`` outside fenced code blocks and code spans."""
    return _LINK.findall(_CODE_SPAN.sub("", _FENCE.sub("", text)))


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    out = set()
    for title in _HEADING.findall(_FENCE.sub("", text)):
        title = re.sub(r"[`*]", "", title).strip().lower()
        out.add(re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", title)))
    return out


def relative_links(page: Path) -> list[tuple[str, Path, str]]:
    """(link as written, file it points to, fragment) for every link that is not a URL."""
    found = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        path, _, fragment = target.partition("#")
        found.append((target, (page.parent / path).resolve() if path else page, fragment))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target, file, fragment in relative_links(page):
        if not file.exists():
            broken.append(f"{target} (no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file})")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading #{fragment} in {file.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: " + "; ".join(broken)


def test_readme_is_short_and_links_the_docs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < README_MAX_LINES
    linked = {file for _, file, _ in relative_links(ROOT / "README.md")}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = ci.split('README "Quickstart", command 2, verbatim:\n', 1)[1].splitlines()[0].strip()
    assert command.startswith("python3.11 -m venv") and command in (ROOT / "README.md").read_text(encoding="utf-8")


def test_link_checker_finds_broken_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title\n[ok](page.md#a-title) [gone](missing.md) [bad](page.md#nope) "
                    "[web](https://example.org) `[code](x.md)`\n```\n[fenced](y.md)\n```\n")
    found = {t: (f.exists(), frag) for t, f, frag in relative_links(page)}
    assert set(found) == {"page.md#a-title", "missing.md", "page.md#nope"}
    assert found["missing.md"][0] is False and "a-title" in anchors(page.read_text()) and "nope" not in anchors(
        page.read_text())
