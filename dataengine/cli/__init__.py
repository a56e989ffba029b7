"""The ``dataengine`` command line: one typer app, one module per stage.

Each command module registers its commands on :data:`dataengine.cli.app.app` when imported. Heavy libraries
(torch, faiss) are imported inside the commands that need them, so ``dataengine ingest`` starts fast.
"""

from dataengine.cli.app import app
# Command modules register themselves on import (one line each).
from dataengine.cli import ingest as _ingest  # noqa: F401
from dataengine.cli import embed as _embed  # noqa: F401
from dataengine.cli import synth as _synth  # noqa: F401
from dataengine.cli import demo as _demo  # noqa: F401
from dataengine.cli import cluster as _cluster  # noqa: F401
from dataengine.cli import report as _report  # noqa: F401


def _load_plugins() -> None:
    """Register commands of packages that build on dataengine (``trainer`` adds ``train`` and ``eval``).

    They are found through the ``dataengine.commands`` entry-point group, so that ``dataengine`` itself never
    imports a package above it (the layering the tests enforce).
    """
    from importlib.metadata import entry_points

    for entry in entry_points(group="dataengine.commands"):
        entry.load()


_load_plugins()


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
