"""The package layering, as a test: ``indexes`` imports neither ``dataengine`` nor ``trainer``,
``dataengine`` never imports ``trainer``, and no package imports ``tools``.

Sources are parsed, not imported, so every import counts, including those inside functions and under
``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# ``tools`` (benchmarks, one-off scripts) is imported by nothing.
FORBIDDEN = {"indexes": {"dataengine", "trainer", "tools"}, "dataengine": {"trainer", "tools"}, "trainer": {"tools"}}


def imported_packages(path: Path, package: str, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in ``path``, a module of ``root / package``, sorted by
    line; relative imports are resolved against the module's own package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module_parts = [package, *path.relative_to(root / package).with_suffix("").parts]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, (node.module or "").split(".")[0]))
            else:
                # ``from .. import x`` climbs out of the module's package; an import above the root is an error.
                base = module_parts[: len(module_parts) - node.level]
                found.append((node.lineno, base[0] if base else "<beyond top level>"))
    return sorted(found)


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    sources = _sources(package)
    assert sources, f"no sources found under {ROOT / package}"
    violations = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for path in sources
        for line, imported in imported_packages(path, package)
        if imported in FORBIDDEN[package] or imported == "<beyond top level>"
    ]
    assert not violations, "layering violated:\n" + "\n".join(violations)


def test_the_checker_sees_every_kind_of_import(tmp_path):
    source = tmp_path / "indexes" / "sub" / "mod.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "import numpy\n"
        "from dataengine.fs import Location\n"
        "def f():\n    import trainer.losses\n"
        "from . import sibling\n"
        "from ... import beyond\n"
    )
    found = imported_packages(source, "indexes", root=tmp_path)
    assert found == [(1, "numpy"), (2, "dataengine"), (4, "trainer"), (5, "indexes"), (6, "<beyond top level>")]
