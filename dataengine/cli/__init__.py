"""The ``dataengine`` command line: one typer app, one module per stage.

Each command module registers its commands on :data:`dataengine.cli.app.app` when imported. Heavy libraries
(torch, faiss) are imported inside the commands that need them, so ``dataengine ingest`` starts fast.
"""

from dataengine.cli.app import app
# Command modules register themselves on import (one line each).
from dataengine.cli import ingest as _ingest  # noqa: F401
from dataengine.cli import synth as _synth  # noqa: F401
from dataengine.cli import demo as _demo  # noqa: F401


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
