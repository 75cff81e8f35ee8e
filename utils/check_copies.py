"""Check that code copied into stand-alone files still equals its source; diffusers' ``utils/check_copies.py`` is the model.

The device scripts (``deploykit/device/scripts/``) run where deploykit is not installed, so they repeat a few
of its functions. Each copy is marked on the line above its ``def`` / ``class`` (above its decorators) or
module-level assignment::

    # Copied from deploykit.io.sha256_file
    def sha256_file(path, chunk=1 << 20): ...

    # Copied from deploykit.engines.tensorrt.build_engine with DeployKitError->BuildError, InputError->BuildError

The marker names the source by its dotted path: a module of this repository, by file (so the device scripts,
which are not importable, can be sources too: ``deploykit.device.scripts.build_engines.log``), then the object
in it (``Class.method`` for a method). The copy's text must equal the source's after the ``with A->B``
replacements (plain text, applied in order), up to indentation.

    python utils/check_copies.py          report every drifted copy (a diff each); exit status 1 if any
    python utils/check_copies.py --fix    overwrite each drifted copy with its source
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^\s*# Copied from ([\w.]+)(?: with (.+))?\s*$")
_NAMED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)


@dataclass
class Copy:
    path: Path
    start: int  # first line of the copy (1-based; its first decorator if any), the marker is the line before
    end: int  # last line
    source: str  # dotted name from the marker
    replacements: list[tuple[str, str]]


@dataclass
class Drift:
    copy: Copy
    reason: str
    expected: str | None = None  # the source's text as the copy should read (indented as the copy is)

    def __str__(self) -> str:
        where = f"{_relative(self.copy.path)}:{self.copy.start}"
        if self.expected is None:
            return f"{where}: copy of {self.copy.source}: {self.reason}"
        actual = _lines(self.copy.path)[self.copy.start - 1:self.copy.end]
        diff = difflib.unified_diff(self.expected.splitlines(), [x.rstrip("\n") for x in actual], "source", "copy",
                                    lineterm="", n=1)
        return f"{where}: copy of {self.copy.source} {self.reason}\n" + "\n".join(diff)


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def _names(node: ast.AST) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]  # type: ignore[attr-defined]
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _span(node: ast.AST) -> tuple[int, int]:
    decorators = getattr(node, "decorator_list", [])
    return (decorators[0].lineno if decorators else node.lineno), node.end_lineno  # type: ignore[attr-defined]


def _walk(body: list[ast.stmt]):
    """Named statements at module level and inside classes (a method can be a copy too)."""
    for node in body:
        if isinstance(node, _NAMED):
            yield node
        if isinstance(node, ast.ClassDef):
            yield from _walk(node.body)


def find_copies(path: Path) -> list[Copy]:
    lines = _lines(path)
    copies = []
    for node in _walk(ast.parse("".join(lines), str(path)).body):
        start, end = _span(node)
        match = MARKER.match(lines[start - 2]) if start >= 2 else None
        if match:
            replacements = []
            for pair in (match[2] or "").split(","):
                if pair.strip():
                    old, _, new = pair.strip().partition("->")
                    replacements.append((old.strip(), new.strip()))
            copies.append(Copy(path, start, end, match[1], replacements))
    return copies


def resolve(dotted: str, root: Path = REPO) -> tuple[Path, list[str]] | None:
    """The file a dotted name's module is in, and the object's path inside it."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        base = root.joinpath(*parts[:i])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate, parts[i:]
    return None


def source_text(path: Path, qualname: list[str]) -> str | None:
    lines = _lines(path)
    body = ast.parse("".join(lines), str(path)).body
    node = None
    for name in qualname:
        node = next((n for n in body if isinstance(n, _NAMED) and name in _names(n)), None)
        if node is None:
            return None
        body = getattr(node, "body", [])
    start, end = _span(node)
    return "".join(lines[start - 1:end])


def _normalized(text: str) -> str:
    return textwrap.dedent("\n".join(line.rstrip() for line in text.splitlines()))


def check_copy(copy: Copy, root: Path = REPO) -> Drift | None:
    found = resolve(copy.source, root)
    if found is None:
        return Drift(copy, "names no module of this repository")
    text = source_text(*found)
    if text is None:
        return Drift(copy, f"names nothing in {_relative(found[0])}")
    for old, new in copy.replacements:
        text = text.replace(old, new)
    actual = "".join(_lines(copy.path)[copy.start - 1:copy.end])
    if _normalized(actual) == _normalized(text):
        return None
    indent = len(actual) - len(actual.lstrip(" "))
    return Drift(copy, "differs from its source", textwrap.indent(_normalized(text), " " * indent))


def check(paths: list[Path], root: Path = REPO) -> tuple[list[Copy], list[Drift]]:
    """Every marked copy under ``paths`` (files or folders of .py files) and the ones that drifted."""
    files = sorted({f for p in paths for f in ([p] if p.is_file() else p.rglob("*.py"))})
    copies = [c for f in files for c in find_copies(f)]
    return copies, [d for d in (check_copy(c, root) for c in copies) if d is not None]


def fix(drifts: list[Drift]) -> None:
    """Overwrite each drifted copy with its source (copies whose source is missing are left alone)."""
    by_file: dict[Path, list[Drift]] = {}
    for d in drifts:
        if d.expected is not None:
            by_file.setdefault(d.copy.path, []).append(d)
    for path, found in by_file.items():
        lines = _lines(path)
        for d in sorted(found, key=lambda d: d.copy.start, reverse=True):
            lines[d.copy.start - 1:d.copy.end] = [line + "\n" for line in d.expected.splitlines()]
        path.write_text("".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check that marked copies (# Copied from ...) equal their sources.")
    parser.add_argument("paths", nargs="*", type=Path, default=[REPO / "deploykit"])
    parser.add_argument("--fix", action="store_true", help="overwrite each drifted copy with its source")
    args = parser.parse_args(argv)
    copies, drifts = check(args.paths)
    for d in drifts:
        print(d, file=sys.stderr)
    if drifts and args.fix:
        fix(drifts)
        print(f"{len(drifts)} of {len(copies)} copies rewritten from their sources", file=sys.stderr)
        return 1 if any(d.expected is None for d in drifts) else 0
    print(f"{len(copies)} copies, {len(drifts)} drifted", file=sys.stderr)
    return 1 if drifts else 0


if __name__ == "__main__":
    sys.exit(main())
