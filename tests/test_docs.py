"""The READMEs and docs/ stay usable: every relative link and image resolves (the file and, for #anchors, the
heading), the README stays short, and docs/results.md is what benchmarks/write_results.py renders from the measured
numbers in benchmarks/results/*.jsonl."""

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import write_results  # noqa: E402

PAGES = [ROOT / "README.md", ROOT / "benchmarks/README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text without code blocks and code spans, where brackets are code, not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchors(path: Path) -> Iterator[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for line in prose(path.read_text()).splitlines():
        if found := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            slug = re.sub(r"[^\w\- ]", "", found.group(1).lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not ours to check
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in set(anchors(path)):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## How long 50,000-sample FID takes\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n[ok](other.md#how-long-50000-sample-fid-takes) ![ok](other.md) [self](#page)\n"
        "[gone](missing.md) [no heading](other.md#nowhere) `[code](missing.md)`\n"
    )
    assert [b.split(":")[0] for b in broken_links(page)] == ["missing.md", "other.md#nowhere"]


def test_readme_is_at_most_300_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_results_page_is_what_the_measured_numbers_give():
    assert (ROOT / "docs/results.md").read_text() == write_results.render(), (
        "docs/results.md differs from benchmarks/results/*.jsonl: run python benchmarks/write_results.py"
    )


def test_a_new_measurement_replaces_its_row_and_names_its_machine(tmp_path):
    (tmp_path / "page.md.in").write_text(
        "# Numbers\n{{ quality budgets }}\n{{ edits inpainting | mask=mask; inpainted=inpainted:% }}\n"
    )
    old = {"study": "budgets", "setting": "CD", "sampling": "1 step", "fid": 11.32, "is": 8.33, "date": "2026-11-27"}
    write_results.append("quality", [{**old, "machine": "2 CPU cores"}], tmp_path)
    write_results.append("quality", [{**old, "fid": 10.5, "machine": "one H200", "date": "2026-12-02"}], tmp_path)
    two_steps = {**old, "sampling": "2 steps", "fid": 9.0, "is": None, "machine": "one H200"}
    write_results.append("quality", [two_steps], tmp_path)
    edit = {"study": "inpainting", "mask": "box", "inpainted": 0.552, "machine": "m"}
    write_results.append("edits", [edit], tmp_path)
    page = write_results.render(tmp_path / "page.md.in", tmp_path)
    assert "| CD | 10.5 / 8.33 | 9.0 / - |" in page  # the newest record of (setting, sampling) wins
    assert "| box | 55.2 % |" in page
    assert "Measured on one H200, " in page and "2026-12-02" in page
    with pytest.raises(ValueError, match="no record of study 'other'"):
        (tmp_path / "bad.md.in").write_text("{{ quality other }}\n")
        write_results.render(tmp_path / "bad.md.in", tmp_path)
