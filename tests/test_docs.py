"""The documentation: README.md and docs/*.md link only to pages and anchors that exist.

Anchors follow GitHub's rule for headings: lowercase, punctuation other than '-' and '_' removed, spaces
to '-', and a repeated heading gets '-1', '-2', ... Code blocks are skipped: a '#' there is no heading.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DOCS = ["converting", "reading", "training", "tools", "guarantees", "datum-and-caffe-parity", "benchmarks",
        "development"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return "".join(part for i, part in enumerate(re.split(r"^```.*$", text, flags=re.MULTILINE)) if i % 2 == 0)


def anchor(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and '_'
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for match in re.finditer(r"^#{1,6} (.+)$", _prose(page.read_text(encoding="utf-8")), flags=re.MULTILINE):
        slug = anchor(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_anchor_rule():
    assert anchor("Training like Caffe: `loader_from_prototxt`, `CaffeLoader`, `CaffeTransform`") == (
        "training-like-caffe-loader_from_prototxt-caffeloader-caffetransform")
    assert anchor("Benchmarks (`make bench`)") == "benchmarks-make-bench"
    assert anchor("Appending and resuming (`benchmarks/append_designs.py`)") == (
        "appending-and-resuming-benchmarksappend_designspy")


def test_every_docs_page_is_there_and_linked_from_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert sorted(path.stem for path in (REPO / "docs").glob("*.md")) == sorted(DOCS)
    for name in DOCS:
        assert f"](docs/{name}.md)" in readme, f"README.md does not link docs/{name}.md"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_every_link_resolves(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not checked here
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(REPO) if linked.is_relative_to(REPO) else linked}")
        elif fragment and (linked.suffix != ".md" or fragment not in anchors(linked)):
            broken.append(f"{target}: no heading with anchor #{fragment}")
    assert not broken, "\n".join(broken)


def test_the_readme_stays_short_and_opens_with_the_two_commands():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200
    top = "\n".join(lines[:40])
    assert "make test" in top and "make demo" in top
