"""The package boundaries the architecture promises, checked from the code's own imports.

- `sidecar` (data plane) and `control_plane` never import each other; both import `mesh`.
- `mesh` imports neither, and nothing but `outrigger` imports `outrigger` (the CLI and tools).
- No import cycles between modules, counting imports inside functions and under TYPE_CHECKING:
  a cycle hidden from the interpreter is still two modules that cannot be read apart.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mesh", "sidecar", "control_plane", "outrigger")
# package -> packages it must never import
FORBIDDEN = {
    "mesh": {"sidecar", "control_plane", "outrigger"},
    "sidecar": {"control_plane", "outrigger"},
    "control_plane": {"sidecar", "outrigger"},
    "outrigger": set(),
}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imported(path: Path, name: str, known: dict[str, Path]) -> Iterator[str]:
    """Every project module `path` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod when there is one
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imported(path, name, known)) for name, path in known.items()}


def test_packages_import_only_what_the_architecture_allows() -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if target.split(".")[0] in FORBIDDEN[module.split(".")[0]]
    )
    assert wrong == []


def test_no_import_cycles_between_modules() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            # a package's __init__ importing its own submodules is how packages work
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert [" -> ".join(c) for c in cycles] == []
