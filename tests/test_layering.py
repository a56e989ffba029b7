"""The package layering, as a test, from the bottom up:

* ``indexes`` (numerical kernels) imports neither ``dataengine`` nor ``trainer``;
* ``dataengine`` (the data plane) never imports ``trainer`` nor the application layer ``dataengine.app``;
* ``trainer`` builds on the data plane but never imports ``dataengine.app``;
* ``dataengine.app`` (the command line and the demo) sits on top and may import all of them;
* no package imports ``tools``.

Sources are parsed, not imported, so every import counts, including those inside functions and under
``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = "dataengine.app"
# Layer -> what it may not import. A layer is a package or a subpackage (dotted); a module belongs to the
# most specific layer containing it, and an import names the most specific layer containing the imported
# module. ``tools`` (benchmarks, one-off scripts) is imported by nothing.
FORBIDDEN = {
    "indexes": {"dataengine", APP, "trainer", "tools"},
    "dataengine": {APP, "trainer", "tools"},
    "trainer": {APP, "tools"},
    APP: {"tools"},
}
# Modules that belong to a layer other than the package holding them: ``python -m dataengine`` runs the app.
PLACED = {"dataengine.__main__": APP}


def layer_of(module: str) -> str:
    """The most specific layer holding the dotted module name (or its top-level package if none does)."""
    if module in PLACED:
        return PLACED[module]
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in FORBIDDEN:
            return ".".join(parts[:end])
    return parts[0]


def imported_modules(path: Path, package: str, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``path``, a module of ``root / package``, sorted by line;
    ``from X import name`` counts as importing ``X.name`` (it may be a submodule); relative imports are
    resolved against the module's own package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module_parts = [package, *path.relative_to(root / package).with_suffix("").parts]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = (node.module or "").split(".")
            else:
                # ``from .. import x`` climbs out of the module's package; an import above the root is an error.
                base = module_parts[: len(module_parts) - node.level]
                if not base:
                    found.append((node.lineno, "<beyond top level>"))
                    continue
                base = base + (node.module.split(".") if node.module else [])
            found += [(node.lineno, ".".join(base + [alias.name])) for alias in node.names]
    return sorted(found)


def imported_packages(path: Path, package: str, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, layer) of every import in ``path`` (see :func:`imported_modules` and :func:`layer_of`)."""
    return [(line, module if module.startswith("<") else layer_of(module))
            for line, module in imported_modules(path, package, root)]


def violations(package: str, root: Path = ROOT) -> list[str]:
    """Every import of a module under ``root / package`` that its layer may not make."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        layer = layer_of(module)
        found += [f"{path.relative_to(root)}:{line} imports {imported}"
                  for line, imported in imported_packages(path, package, root)
                  if imported in FORBIDDEN[layer] or imported == "<beyond top level>"]
    return found


@pytest.mark.parametrize("package", ["dataengine", "indexes", "trainer"])
def test_no_upward_imports(package):
    assert sorted((ROOT / package).rglob("*.py")), f"no sources found under {ROOT / package}"
    found = violations(package)
    assert not found, "layering violated:\n" + "\n".join(found)


def test_the_trainer_is_imported_by_the_application_layer():
    # The one layer allowed to import the trainer exists and does so (the rules above are not vacuous).
    sources = sorted((ROOT / "dataengine" / "app").rglob("*.py"))
    assert "trainer" in {layer for path in sources for _, layer in imported_packages(path, "dataengine")}


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


def test_the_checker_places_the_application_layer_on_top(tmp_path):
    def write(relative: str, text: str) -> None:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)

    write("dataengine/__init__.py", "")
    write("dataengine/fs.py", "from dataengine.app import main\n"   # the data plane reaching up: forbidden
                               "from dataengine import app\n"         # the same, spelled as a name
                               "from . import app as _app\n"          # the same, relative
                               "from dataengine import store\n")      # its own layer: fine
    write("dataengine/store.py", "import trainer.loop\n")
    write("dataengine/app/__init__.py", "from .. import fs\nimport trainer\nimport indexes\n")
    write("dataengine/app/cli.py", "from trainer.loop import run_train\nfrom . import cli\nimport tools.bench\n")
    write("dataengine/__main__.py", "from dataengine.app import main\n")  # placed in the app layer: fine
    write("trainer/loop.py", "import dataengine.fs\nimport dataengine.app.cli\nfrom dataengine.app import cli\n")
    assert violations("dataengine", tmp_path) == [
        "dataengine/app/cli.py:3 imports tools",
        "dataengine/fs.py:1 imports dataengine.app",
        "dataengine/fs.py:2 imports dataengine.app",
        "dataengine/fs.py:3 imports dataengine.app",
        "dataengine/store.py:1 imports trainer",
    ]
    assert violations("trainer", tmp_path) == ["trainer/loop.py:2 imports dataengine.app",
                                               "trainer/loop.py:3 imports dataengine.app"]
