"""data/'s sub-packages import one way (issue 20): no import cycle among its modules, counting the imports inside
functions and under ``TYPE_CHECKING``; listing/, the bottom, imports nothing else from data/ and no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import simclr_cli.data

DATA = Path(simclr_cli.data.__file__).parent
SRC = DATA.parent.parent


def _name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in DATA.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """The modules of data/ that ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # from simclr_cli.data.x import module
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in MODULES and m != "simclr_cli.data"}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (module -> modules it imports), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_the_modules_of_data_import_each_other_without_a_cycle():
    graph = {m: _imports(p) - {m} for m, p in MODULES.items()}
    assert _cycle(graph) == []
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check itself finds one


def test_listing_imports_nothing_else_from_data_and_no_torch():
    for name, path in MODULES.items():
        if name.startswith("simclr_cli.data.listing"):
            above = {m for m in _imports(path) if not m.startswith("simclr_cli.data.listing")}
            assert not above, f"{path} imports {sorted(above)}: listing/ is the bottom of data/"
    listing = [m for m in MODULES if m.startswith("simclr_cli.data.listing")]
    code = f"import sys; import {', '.join(listing)}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
