"""The test suite's own rule: test modules share helpers through conftest fixtures or plain
helper modules (tests/helpers.py, tests/gguf_writer.py), never by importing a test module or a
conftest (pytest imports those itself, and an import from one runs its fixtures' module twice
under another name)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_no_test_module_or_conftest_is_imported():
    files = sorted(TESTS.rglob("*.py"))
    assert len(files) > 20
    assert TESTS / "conftest.py" in files
    bad = []
    for path in files:
        for name in _imported_modules(path):
            leaf = name.rsplit(".", 1)[-1]
            if name.startswith(".") or (
                name.split(".")[0] == "tests" and (leaf == "conftest" or leaf.startswith("test_"))
            ):
                bad.append(f"{path.relative_to(TESTS.parent)} imports {name}")
    assert not bad, bad
