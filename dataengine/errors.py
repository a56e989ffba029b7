"""Named exceptions for bad user input, unusable data and failures of the storage underneath.

Per-sample problems (a corrupt JPEG, a bad metadata line) are *not* exceptions that stop a run: they are
recorded with a status by the stage that meets them. These exceptions are for whole-run problems; each message
is one line saying what went wrong and where. ``exit_code`` is what the command line exits with: 2 when the
command cannot work as given (a bad option, input or output path: running it again unchanged fails again),
1 when it failed while running (storage, network, a worker's death: running it again may work).
"""


class DataEngineError(Exception):
    """Base class of dataengine's own errors."""

    exit_code = 1


class InputUnusableError(DataEngineError):
    """The input as a whole cannot be used (nothing found, wrong format everywhere)."""

    exit_code = 2


class OutputExistsError(DataEngineError):
    """The output exists and was made with another configuration; pass --overwrite or another path."""

    exit_code = 2


class IncompleteOutputError(DataEngineError):
    """An output a stage depends on is missing its manifest (it is incomplete)."""

    exit_code = 2


class OutputUnusableError(DataEngineError):
    """The output path cannot be written: it is a file, lies under a file, or is not writable."""

    exit_code = 2


class OutputLockedError(DataEngineError):
    """Another run is writing the same output (the message names its process, host and lock)."""


class StorageError(DataEngineError):
    """The storage failed underneath a run: the disk is full, an endpoint cannot be reached."""


class StorageConfigError(DataEngineError):
    """The storage cannot be used as configured: an unknown storage option, missing credentials."""

    exit_code = 2


class InputCorruptError(InputUnusableError):
    """An input file is truncated or malformed as a whole (a cut ``.gz``, a corrupt tar header); the message
    names the file and what is wrong with it."""
