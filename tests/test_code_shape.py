"""Issue 20, part 3: the package's shape, kept.

- No function over 60 lines without a reason in its docstring. A longer function says why with a line starting
  ``Long:`` (e.g. ``Long: one collective sequence that every process must run in the same order``).
- No module imports another module's private (``_name``) helper: what is shared is public and named for what it is."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "simclr_cli"
LIMIT = 60


def _long_functions(paths) -> list[str]:
    out = []
    for path in sorted(paths):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            doc = ast.get_docstring(node) or ""
            if lines > LIMIT and not any(line.strip().startswith("Long:") for line in doc.splitlines()):
                out.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return out


@pytest.mark.parametrize("part", sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
                         + ["."])
def test_no_long_function_without_a_reason(part):
    # "." is the top-level modules alone (each sub-package is its own case)
    paths = PACKAGE.glob("*.py") if part == "." else (PACKAGE / part).rglob("*.py")
    assert _long_functions(paths) == []


def test_no_private_name_is_imported_from_another_module():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("simclr_cli"):
                found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.module}.{a.name}"
                          for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []
