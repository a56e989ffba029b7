"""Command-line options written once: typed aliases for the options many commands share, and options derived
from a config dataclass's fields (name, type, default, docstring), so that a new config field is a new option
without a second spelling.

A derived option defaults to ``None`` ("not given"), and the command builds its config from the options that
were given, the config's own defaults filling the rest. A ``--config FILE.toml`` would merge the same way: the
file's values first, the given options over them.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Optional, Union

import typer

STORAGE_OPTIONS_HELP = "fsspec options as a JSON object (endpoint_url, key, secret...)."
StorageOptions = Annotated[Optional[str], typer.Option("--storage-options", metavar="JSON", help=STORAGE_OPTIONS_HELP)]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON summary as the last line on stdout.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an output made with another configuration.")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: every core).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
# The network's input and how it is run, as embed and eval take them.
Checkpoint = Annotated[Optional[str], typer.Option("--checkpoint", help="Trainer checkpoint file or run folder.")]
Layer = Annotated[Optional[str], typer.Option("--layer", help="Feature layer (default: the penultimate).")]
ImageSize = Annotated[int, typer.Option("--image-size", help="Center-crop side fed to the network.")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Images per forward (default: the largest "
                                                  "that fits in memory).")]
DecodeWorkers = Annotated[Optional[int], typer.Option(
    "--workers", help="Processes decoding images (0: in this process). Default: min(4, cores).")]
InitSeed = Annotated[int, typer.Option("--seed", help="Seed of the random initialisation.")]


@dataclass(frozen=True)
class Flag:
    """How a config field appears on the command line when its name and type alone do not say it."""

    name: str | None = None
    """The option's spelling (default: ``--field-name``; ``--x/--no-x`` for booleans)."""
    type: Any = None
    """What the command line reads when it differs from the field's type (``str`` for ``4,64``)."""
    parse: Callable[[Any], Any] | None = None
    """Turns what was read into the field's value."""
    metavar: str | None = None
    """The placeholder in the help (upper case)."""
    help: str | None = None
    """Help when the field's docstring does not fit the option."""


@functools.cache
def _module_tree(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as handle:
        return ast.parse(handle.read())


def field_docs(kind: type) -> dict[str, str]:
    """The docstring of every field of dataclass ``kind`` (the string literal below it), on one line."""
    tree = _module_tree(inspect.getsourcefile(kind))
    body = next(node.body for node in tree.body if isinstance(node, ast.ClassDef) and node.name == kind.__name__)
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = _plain_text(after.value.value)
    return docs


def _plain_text(docstring: str) -> str:
    """A docstring as help text: one line, without reStructuredText roles and literals."""
    import re

    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", " ".join(docstring.split()))
    return text.replace("``", "")


def _plain(annotation: Any) -> Any:
    """``int`` for ``int | None`` and ``Optional[int]``; the annotation itself otherwise."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def _default_text(field: dataclasses.Field) -> str | None:
    if field.default is not dataclasses.MISSING and field.default is not None:
        value = field.default
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return None


def config_options(kinds: Iterable[type], flags: dict[str, Flag] | None = None,
                   skip: Iterable[str] = ()) -> list[inspect.Parameter]:
    """One keyword parameter, a typer option defaulting to ``None``, per field of the ``kinds`` dataclasses
    (fields that are themselves dataclasses and those in ``skip`` left out)."""
    flags = flags or {}
    parameters = []
    for kind in kinds:
        hints, docs = typing.get_type_hints(kind), field_docs(kind)
        for field in dataclasses.fields(kind):
            hint = _plain(hints[field.name])
            if field.name in skip or dataclasses.is_dataclass(hint):
                continue
            flag = flags.get(field.name, Flag())
            cli_type = flag.type or hint
            spelling = flag.name or "--" + field.name.replace("_", "-")
            if cli_type is bool and "/" not in spelling:
                spelling = f"{spelling}/--no-{spelling[2:]}"
            option = typer.Option(None, spelling, help=flag.help or docs.get(field.name, ""),
                                  metavar=flag.metavar, show_default=_default_text(field) or False)
            parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                                annotation=Optional[cli_type]))
    return parameters


def given(values: dict[str, Any], flags: dict[str, Flag] | None = None) -> dict[str, Any]:
    """The options that were given (not ``None``), parsed into field values."""
    flags = flags or {}
    return {name: (flags[name].parse(value) if name in flags and flags[name].parse else value)
            for name, value in values.items() if value is not None}


def with_parameters(function: Callable[..., Any], parameters: list[inspect.Parameter]) -> Callable[..., Any]:
    """``function`` (taking ``**values``) presented to typer with ``parameters`` as its signature."""

    @functools.wraps(function)
    def command(**values: Any) -> Any:
        return function(**values)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    return command

