"""The documentation stays true to the tree: every relative link resolves (file and heading), and docs/cli.md
names every option of every command."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import click
import pytest

from packager.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "model_repository" / "README.md",
                    *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _prose(path: Path) -> str:
    return FENCE.sub("", path.read_text())  # links inside code blocks are examples, not links


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation and symbols dropped, spaces to hyphens."""
    kept = "".join(c for c in heading.strip().lower()
                   if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen = set(), {}
    for line in _prose(path).splitlines():
        if match := re.match(r"#{1,6}\s+(.*)", line):
            slug = _slug(match.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(_prose(path)) if not re.match(r"[a-z]+:", target)]


def test_the_documents_exist():
    names = {path.relative_to(ROOT).as_posix() for path in DOCUMENTS}
    assert {"README.md", "CONTRIBUTING.md", "model_repository/README.md", "docs/architecture.md",
            "docs/benchmarks.md", "docs/cli.md", "docs/quantization.md"} <= names


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_an_existing_file_and_heading(document):
    broken = []
    for target in _relative_links(document):
        file_part, _, anchor = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, f"{document.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_slug_follows_github():
    assert _slug("Accuracy: yolov8n (COCO mAP, machine A)") == "accuracy-yolov8n-coco-map-machine-a"
    assert _slug("The stages: build → render → [engines] → serve → verify") == \
        "the-stages-build--render--engines--serve--verify"
    assert _slug("`yqpack build`") == "yqpack-build"


def _section(text: str, command: str) -> str:
    start = text.index(f"## `yqpack {command}`")
    following = text.find("\n## ", start + 1)
    return text[start:following if following != -1 else len(text)]


def test_cli_doc_names_every_option_of_every_command():
    text = (ROOT / "docs" / "cli.md").read_text()
    missing = {}
    for name, command in main.commands.items():
        # the first cell of each option table row, e.g. "`--end2end / --no-end2end`"
        rows = " ".join(re.findall(r"^\| ([^|]*(?:\\\|[^|]*)*) \|", _section(text, name), re.M))
        options = [opt for param in command.params if isinstance(param, click.Option)
                   for opt in (*param.opts, *param.secondary_opts) if opt.startswith("--") and opt != "--help"]
        absent = [opt for opt in options if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", rows)]
        if absent:
            missing[name] = absent
    assert not missing, f"options missing from their docs/cli.md section: {missing}"
