"""The project's documents agree with its code.

- Every `file::name` that docs/ cites (the tests holding each hardening rule, the functions on the
  walk of a request) exists, and so does every file or folder they name.
- Every hardening rule names at least one test.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
HARDENING = ROOT / "docs" / "hardening.md"

# `sidecar/app.py::Sidecar.apply`, `tests/test_docs.py`, `sidecar/protocol/`
_REFERENCE = re.compile(
    r"`((?:mesh|sidecar|control_plane|outrigger|tests|docs|examples|helm)/[\w./-]*)"
    r"(?:::([\w.]+))?`"
)
# Modules and folders that do not exist yet, named where the architecture says they will go.
_PLANNED_SECTION = "## Where the next pieces go"


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
    """(document, path, name or None, planned) for every code reference in docs/."""
    for doc in DOCS:
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
