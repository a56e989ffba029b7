"""The ``dataengine`` command line: one typer app, one module per stage.

Each command module registers its commands on :data:`dataengine.cli.app.app` when imported. Heavy libraries
(torch, faiss) are imported inside the commands that need them, so ``dataengine ingest`` starts fast.
Commands of other packages (plugins) are registered by :func:`load_plugins`, which :func:`main` calls unless
the command line names a built-in command.
"""

import sys

from dataengine.cli.app import app
# Command modules register themselves on import (one line each).
from dataengine.cli import ingest as _ingest  # noqa: F401
from dataengine.cli import embed as _embed  # noqa: F401
from dataengine.cli import synth as _synth  # noqa: F401
from dataengine.cli import demo as _demo  # noqa: F401
from dataengine.cli import cluster as _cluster  # noqa: F401
from dataengine.cli import report as _report  # noqa: F401


_BUILT_IN = frozenset(info.name or info.callback.__name__.replace("_", "-") for info in app.registered_commands)
_plugins_loaded = False


def load_plugins() -> None:
    """Register commands of packages that build on dataengine (``trainer`` adds ``train`` and ``eval``, and
    a stage of ``dataengine demo``).

    They are found through the ``dataengine.commands`` entry-point group, so that ``dataengine`` itself never
    imports a package above it (the layering the tests enforce). Finding them reads the metadata of every
    installed distribution (~25 ms), which is why built-in commands other than ``demo`` skip it.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group="dataengine.commands"):
        entry.load()


def main() -> None:
    """Console-script entry point."""
    # The global options are flags, so the first argument that is not an option names the command.
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if command not in _BUILT_IN:  # a plugin's command, or help that lists every command
        load_plugins()
    app()


__all__ = ["app", "load_plugins", "main"]
