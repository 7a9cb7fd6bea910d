"""The project's documents agree with its code.

- Every `file::name` that docs/ cites (the tests holding each hardening rule, the functions on the
  walk of a request) exists, and so does every file or folder that docs/ and the READMEs (the
  top one, k8s/examples') name.
- Every hardening rule names at least one test.
- Every document the code and the docs cite is in this repository, and so is every rule and
  section they cite in it.
- The README's table of honoured xDS fields is `sidecar.xds.interpret.HONOURED_FIELDS`, row by
  row.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.xds.interpret import HONOURED_FIELDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
HARDENING = ROOT / "docs" / "hardening.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
README = ROOT / "README.md"
EXAMPLES_README = ROOT / "k8s" / "examples" / "README.md"

# `sidecar/app.py::Sidecar.apply`, `tests/test_docs.py`, `sidecar/protocol/`
_REFERENCE = re.compile(
    r"`((?:mesh|sidecar|control_plane|outrigger|tests|docs|examples|helm)/[\w./-]*)"
    r"(?:::([\w.]+))?`"
)
# Modules and folders that do not exist yet, named where the architecture says they will go.
_PLANNED_SECTION = "## Where the next pieces go"

# A document named in prose or comments: `docs/hardening.md`, `README.md`; URLs are skipped.
_DOCUMENT = re.compile(r"https?://\S+|(?P<path>[\w./-]*\w\.md)\b")
_RULES = re.compile(r"docs/hardening\.md,? rules? (?P<numbers>\d+(?:(?:, | and |-)\d+)*)")
_SECTION = re.compile(r"(?P<doc>docs/\w+\.md|README\.md), \"(?P<title>[^\"]+)\"")
# The shared design brief's file names, which are not in this repository.
_OUTSIDE = re.compile(r"\b(?:HARDENING|ARCHITECTURE|STYLE)\b")

_TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".sh", ".txt"}
_TEXT_NAMES = {"Makefile", "Dockerfile", "run"}
_SKIP_DIRS = {
    ".git",
    ".venv",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "__pycache__",
    "build",
    "dist",
    "results",
}


def _sections(path: Path) -> dict[str, str]:
    """`## heading` -> the text under it (the text before the first heading under "")."""
    sections: dict[str, str] = {}
    heading = ""
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("## "):
            heading = line.rstrip()
            sections[heading] = ""
        else:
            sections[heading] = sections.get(heading, "") + line
    return sections


def _names(scope: list[ast.stmt]) -> dict[str, list[ast.stmt]]:
    """Functions, classes and assigned names of one scope, with the body of each def/class."""
    names: dict[str, list[ast.stmt]] = {}
    for node in scope:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node.body
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = []
        elif isinstance(node, ast.Assign):
            names.update((t.id, []) for t in node.targets if isinstance(t, ast.Name))
    return names


def _defined(path: Path, name: str) -> bool:
    """`name` ("f", "CONSTANT", "Class", "Class.method") is defined in the module at `path`."""
    scope: list[ast.stmt] = ast.parse(path.read_text(), str(path)).body
    for part in name.split("."):
        body = _names(scope).get(part)
        if body is None:
            return False
        scope = body
    return True


def _references() -> Iterator[tuple[str, str, str | None, bool]]:
    """(document, path, name or None, planned) for every code reference in docs/, the README
    and the examples' README."""
    for doc in [*DOCS, README, EXAMPLES_README]:
        for heading, text in _sections(doc).items():
            for match in _REFERENCE.finditer(text):
                planned = heading == _PLANNED_SECTION
                yield doc.name, match.group(1), match.group(2), planned


def test_every_file_and_name_the_docs_cite_exists() -> None:
    missing = []
    for doc, path, name, planned in _references():
        target = ROOT / path
        if name is not None:
            if not target.is_file() or not _defined(target, name):
                missing.append(f"{doc}: {path}::{name}")
        elif not planned and not target.exists():
            missing.append(f"{doc}: {path}")
    assert missing == []


def test_the_docs_cite_tests_the_way_pytest_names_them() -> None:
    tests = [(path, name) for _, path, name, _ in _references() if path.startswith("tests/")]
    assert len([name for _, name in tests if name is not None]) >= 100
    assert all(name is None or name.startswith("test_") for _, name in tests)


def test_every_hardening_rule_is_held_by_a_test() -> None:
    rules = {
        int(m.group(1)): text
        for heading, text in _sections(HARDENING).items()
        if (m := re.match(r"## Rule (\d+):", heading))
    }
    assert sorted(rules) == list(range(1, len(rules) + 1)) and len(rules) >= 11
    untested = [
        number
        for number, text in rules.items()
        if not any(m.group(2) for m in _REFERENCE.finditer(text) if m.group(1).startswith("tests/"))
    ]
    assert untested == []


def _text_files() -> Iterator[Path]:
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(folder) / name
            text = path.suffix in _TEXT_SUFFIXES or name in _TEXT_NAMES
            if text and path != Path(__file__).resolve():
                yield path


def _headings(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("#")]


def test_every_document_the_project_cites_is_in_the_repository() -> None:
    wrong = []
    for path in _text_files():
        where = path.relative_to(ROOT)
        text = path.read_text(errors="replace")
        for match in _DOCUMENT.finditer(text):
            cited = match.group("path")
            if cited and not ((ROOT / cited).is_file() or (path.parent / cited).is_file()):
                wrong.append(f"{where}: {cited} does not exist")
        for match in _OUTSIDE.finditer(text):
            wrong.append(f"{where}: {match.group()!r} names the design brief, not a file here")
    assert wrong == []


def test_every_rule_and_section_the_project_cites_exists() -> None:
    rules = {int(m) for m in re.findall(r"^## Rule (\d+):", HARDENING.read_text(), re.M)}
    wrong = []
    cited_rules = 0
    for path in _text_files():
        where = path.relative_to(ROOT)
        text = path.read_text(errors="replace")
        for match in _RULES.finditer(text):
            numbers = {int(n) for n in re.findall(r"\d+", match.group("numbers"))}
            cited_rules += 1
            wrong += [f"{where}: rule {n} is not in docs/hardening.md" for n in numbers - rules]
        for match in _SECTION.finditer(text):
            doc, title = match.group("doc"), match.group("title")
            if not any(title in heading for heading in _headings(ROOT / doc)):
                wrong.append(f'{where}: {doc} has no section "{title}"')
    assert wrong == []
    assert cited_rules >= 10  # the codec and transport cite the rules they enforce


def _readme_table(section: str) -> list[tuple[str, ...]]:
    """The rows of the first table in a README section (without its header)."""
    rows: list[str] = []
    for line in _sections(README)[section].splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    cells = [tuple(cell.strip() for cell in row.strip("|").split(" | ")) for row in rows]
    return cells[2:]  # after the header and the |---| line


def test_readme_table_of_honoured_xds_fields_is_the_codes_table() -> None:
    readme = _readme_table("## xDS resources and the fields honoured")
    assert readme == list(HONOURED_FIELDS)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(docs/hardening.md rules 2, 3 and 11)", [2, 3, 11]),
        ("(docs/hardening.md, rule 4)", [4]),
        ("docs/hardening.md rules 1-4, 6", [1, 4, 6]),
    ],
)
def test_rule_citations_are_read_whole(text: str, expected: list[int]) -> None:
    match = _RULES.search(text)
    assert match is not None
    assert [int(n) for n in re.findall(r"\d+", match.group("numbers"))] == expected
