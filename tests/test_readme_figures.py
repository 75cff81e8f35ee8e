"""The README's figures come from committed results files, its links resolve, and it stays a front door.

A table of figures is marked by an HTML comment on the line just above it, and the paragraph above
names the same file for readers::

    <!-- figures: benchmarks/results/digits_cpu.json -->

Each body row of a marked table is checked against that results file: the numbers in its cells, the
label's included, must appear in the same order in one line of the file's Markdown twin
(``digits_cpu.md``), each as printed there or rounded from it (``29.47`` stands for a printed ``29.467``
when a value in the JSON twin prints as both: the documented rounding is the table's own number of
decimals). So a figure moved to another row or column fails as surely as an invented one. Numbers in
`code` (options, addresses) are not figures. The same holds for marked tables in docs/*.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
MAX_README_LINES = 220

MARKER = re.compile(r"^<!--\s*figures:\s*(?P<path>\S+)\s*-->\s*$")
# A number standing on its own: not the 50 of p50, the 1.5 of SD1.5 or the 8 of int8; units may follow (1.84x, 2.50M).
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e[-+]\d+)?")
CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def numbers(text: str) -> list[str]:
    return NUMBER.findall(CODE.sub("", text))


def decimals(text: str) -> int:
    return len(text.partition("e")[0].partition(".")[2])


def formatted(value: float, like: str) -> str:
    """``value`` written with as many decimals as ``like`` (in ``like``'s notation)."""
    return f"{value:.{decimals(like)}{'e' if 'e' in like else 'f'}}"


@dataclass(frozen=True)
class Row:
    page: str
    line: int
    figures: tuple[str, ...]  # the numbers in the row's cells, in order
    results: Path


def marked_tables(page: Path) -> list[tuple[Path, int, list[str]]]:
    """(results file, line number of the marker, the table's lines) for each marked table of ``page``."""
    lines = page.read_text().splitlines()
    tables = []
    for i, line in enumerate(lines):
        match = MARKER.match(line)
        if not match:
            continue
        end = i + 1
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        tables.append((REPO / match["path"], i + 1, lines[i + 1:end]))
    return tables


def rows(page: Path) -> list[Row]:
    found = []
    for results, marker, table in marked_tables(page):
        for offset, line in enumerate(table[2:], start=2):  # header and separator are not figures
            found.append(Row(page.name, marker + offset, tuple(numbers(line)), results))
    return found


class ResultsFile:
    """What one results file prints (Markdown, line by line) and holds (JSON)."""

    def __init__(self, path: Path):
        self.name = path.relative_to(REPO)
        self.lines = [tuple(numbers_as_printed) for line in path.with_suffix(".md").read_text().splitlines()
                      if (numbers_as_printed := NUMBER.findall(line))]
        self.printed = {n for line in self.lines for n in line}
        self.values: list[float] = []
        self._collect(json.loads(path.with_suffix(".json").read_text()))

    def _collect(self, node) -> None:
        if isinstance(node, dict):
            for value in node.values():
                self._collect(value)
        elif isinstance(node, list):
            for value in node:
                self._collect(value)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            self.values.append(float(node))

    def stands_for(self, figure: str, printed: str) -> bool:
        """``figure`` is ``printed``, or the same JSON value written with fewer decimals."""
        if figure == printed:
            return True
        return (decimals(figure) < decimals(printed)
                and any(formatted(v, figure) == figure and formatted(v, printed) == printed for v in self.values))

    def holds(self, figure: str) -> bool:
        """Anywhere in the file: printed, or a JSON value at ``figure``'s decimals."""
        return figure in self.printed or any(formatted(v, figure) == figure for v in self.values)

    def holds_row(self, figures: tuple[str, ...]) -> bool:
        """The figures, in order, in one printed line (a line may hold more numbers between them)."""
        for line in self.lines:
            i = 0
            for printed in line:
                if i < len(figures) and self.stands_for(figures[i], printed):
                    i += 1
            if i == len(figures):
                return True
        return False


@cache
def results_file(path: Path) -> ResultsFile:
    return ResultsFile(path)


def problems(row: Row) -> list[str]:
    results = results_file(row.results)
    where = f"{row.page}:{row.line}"
    found = [f"{where}: {n} is not in {results.name}" for n in row.figures if not results.holds(n)]
    if not found and row.figures and not results.holds_row(row.figures):
        found.append(f"{where}: {', '.join(row.figures)} are not, in this order, one line of {results.name.with_suffix('.md')}")
    return found


def mutate(text: str) -> str:
    """The figure with its last digit changed: what a hand edit of one figure looks like."""
    mantissa, e, exponent = text.partition("e")
    i = max(i for i, c in enumerate(mantissa) if c.isdigit())
    return mantissa[:i] + str((int(mantissa[i]) + 1) % 10) + mantissa[i + 1:] + e + exponent


def test_the_readme_has_marked_tables_and_every_table_of_decimal_figures_is_marked():
    lines = README.read_text().splitlines()
    assert marked_tables(README), "the README marks no table of figures"
    marked = {marker for _, marker, _ in marked_tables(README)}
    for i, line in enumerate(lines):
        starts_table = line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|"))
        if not starts_table:
            continue
        end = i
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        has_decimals = any("." in n for body in lines[i + 2:end] for n in numbers(body))
        assert not has_decimals or i in marked, f"README.md:{i + 1}: a table of figures without a <!-- figures: ... --> line above it"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_marked_tables_name_existing_results_files_in_their_caption(page):
    lines = page.read_text().splitlines()
    for results, marker, table in marked_tables(page):
        name = results.relative_to(REPO)
        assert results.suffix == ".json" and results.parent == REPO / "benchmarks" / "results", f"{page.name}:{marker}: {name}"
        assert results.is_file() and results.with_suffix(".md").is_file(), f"{page.name}:{marker}: {name} or its .md is missing"
        assert len(table) > 2, f"{page.name}:{marker}: the marker is not followed by a table"
        # readers do not see the comment: the paragraph just above it names the file too
        above = "\n".join(lines[:marker - 1]).rstrip()
        caption = above.rsplit("\n\n", 1)[-1]
        assert str(name.with_suffix("")) in caption, f"{page.name}:{marker}: the paragraph above the table does not name {name}"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_every_figure_in_a_marked_table_is_in_its_results_file(page):
    found = [p for row in rows(page) for p in problems(row)]
    assert not found, "\n".join(found)


def test_an_edited_figure_is_caught():
    checked = [row for page in (README, *PAGES) for row in rows(page)]
    assert len([r for r in checked if r.page == "README.md" and r.figures]) >= 5
    missed = []
    for row in checked:
        for i, figure in enumerate(row.figures):
            edited = Row(row.page, row.line, (*row.figures[:i], mutate(figure), *row.figures[i + 1:]), row.results)
            if not problems(edited):
                missed.append(f"{row.page}:{row.line}: {figure} -> {mutate(figure)}")
    assert not missed, "edits the figure check would not catch:\n" + "\n".join(missed)


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    in_code = False
    for line in page.read_text().splitlines():
        in_code ^= line.startswith("```")
        if not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for match in LINK.finditer(page.read_text()):
        target = match["target"]
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_readme_links_every_docs_page_and_stays_short():
    text = README.read_text()
    linked = {m["target"].partition("#")[0] for m in LINK.finditer(text)}
    assert {f"docs/{p.name}" for p in PAGES} <= linked, "a docs page the README does not link"
    assert len(text.splitlines()) <= MAX_README_LINES
