"""The application layer: the ``dataengine`` command line and the demo pipeline.

It sits above both the data plane (``dataengine``) and the trainer (``trainer``) and is the only part of
``dataengine`` that may import ``trainer``. Each command module registers its commands on
:data:`dataengine.app.cli.app` when imported; heavy libraries (torch, faiss, the trainer) are imported inside
the commands that need them, so ``dataengine ingest`` and ``--help`` start fast.
"""

from dataengine.app.cli import app
# Command modules register themselves on import (one line each).
from dataengine.app import ingest as _ingest  # noqa: F401
from dataengine.app import embed as _embed  # noqa: F401
from dataengine.app import synth as _synth  # noqa: F401
from dataengine.app import demo as _demo  # noqa: F401
from dataengine.app import cluster as _cluster  # noqa: F401
from dataengine.app import report as _report  # noqa: F401
from dataengine.app import train as _train  # noqa: F401
from dataengine.app import curate as _curate  # noqa: F401
from dataengine.app import export as _export  # noqa: F401
from dataengine.app import plan as _plan  # noqa: F401


def main() -> None:
    """Console-script entry point (also ``python -m dataengine``)."""
    app(prog_name="dataengine")


__all__ = ["app", "main"]
