"""atroposlib is imported by one package only: ``structenv.adapters.atropos``.

Everything else (the core, the agent loop, the examples, the demo) reaches atroposlib through
that package, so the core stays usable on Trio and without the ``atropos`` extra.
"""

from __future__ import annotations

import ast
from pathlib import Path

import structenv

SRC = Path(structenv.__file__).resolve().parent
ADAPTER = SRC / "adapters" / "atropos"


def _imports_atroposlib(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(name == "atroposlib" or name.startswith("atroposlib.") for name in names):
            lines.append(node.lineno)
    return lines


def test_only_the_atropos_adapter_package_imports_atroposlib() -> None:
    offenders = {
        str(path.relative_to(SRC)): lines
        for path in sorted(SRC.rglob("*.py"))
        if ADAPTER not in path.parents and (lines := _imports_atroposlib(path))
    }
    assert offenders == {}
    # The check would see an import if there were one: the adapter itself has them.
    assert _imports_atroposlib(ADAPTER / "__init__.py")


def test_examples_import_structenv_as_a_user_would() -> None:
    """Examples use public names only (their own package's modules aside)."""
    for path in sorted((SRC / "examples").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level != 1:
                parts = node.module.split(".")
                assert not any(p.startswith("_") for p in parts if p != "__future__"), (
                    f"{path.name}:{node.lineno} imports private module {node.module}"
                )
