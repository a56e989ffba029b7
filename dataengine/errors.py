"""Named exceptions for bad user input and unusable data.

Per-sample problems (a corrupt JPEG, a bad metadata line) are *not* exceptions that stop a run: they are
recorded with a status by the stage that meets them. These exceptions are for whole-run problems.
"""


class DataEngineError(Exception):
    """Base class of dataengine's own errors."""


class InputUnusableError(DataEngineError):
    """The input as a whole cannot be used (nothing found, wrong format everywhere)."""


class OutputExistsError(DataEngineError):
    """The output exists and was made with another configuration; pass --overwrite or another path."""


class IncompleteOutputError(DataEngineError):
    """An output a stage depends on is missing its manifest (it is incomplete)."""


class InputCorruptError(InputUnusableError):
    """An input file is truncated or malformed as a whole (a cut ``.gz``, a corrupt tar header); the message
    names the file and what is wrong with it."""
