"""The typer application shared by every command module, plus the CLI-only helpers.

Logging is configured here once; progress bars and the ``--json`` summary line live here too, so library
code only logs and reports progress through callbacks.

Errors are handled here, once for every command (:class:`_Commands`): a command raises, and the user reads
one line saying what went wrong and where (``-v`` adds the traceback above it). The exit status is 2 when the
command cannot work as given (a bad option, input or output path, missing credentials: running it again
unchanged fails again) and 1 when it failed while running (storage full or unreachable, a worker's death, a
lock held by another run: running it again may work). See :func:`describe_failure`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import typer
import typer.main
from rich.console import Console
from rich.logging import RichHandler
from typer.core import TyperCommand, TyperGroup, TyperOption

# Human-readable output goes to stderr so that stdout carries only the --json summary line when asked.
console = Console(stderr=True)
_verbose = False  # -v: tracebacks above the one-line errors


# Commands whose options are built only when the command is run (or shows its help), so that building them
# costs nothing to the other commands' start-up: name -> the function returning the command's callback.
_lazy: dict[str, Callable[[], Callable[..., Any]]] = {}


class _Commands(TyperGroup):
    """The command group: runs a command and turns what it raises into one line and an exit status."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] in _lazy and getattr(self.commands.get(args[0]), "placeholder", False):
            self.commands[args[0]] = command_named(args[0])
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if type(exc).__module__.startswith(("typer", "click")):  # usage errors: typer prints them (status 2)
                raise
            code, message = describe_failure(exc)
            if _verbose:
                traceback.print_exception(exc, file=sys.stderr)
            fail(message, code)


# Old spellings of options, accepted for one release with a warning: old -> new. A command takes the old one
# where it has the new option and no option of the old name.
DEPRECATED_SPELLINGS = {"--name": "--clustering"}
CONFIG_HELP = ("Read options from a TOML file: keys are option names (levels = \"4,256\" or [4, 256]), at the top "
               "level or in a table named after the command; options given on the command line override it.")
logger = logging.getLogger("dataengine.app")


class _Command(TyperCommand):
    """A command of the tool: its usage line names its arguments in capitals (``STORE``, not ``{store}``), it
    takes ``--config FILE.toml`` and the deprecated spellings of its options, and ``-v`` logs the options it
    runs with and where each came from."""

    placeholder = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.placeholder:
            self.params.append(TyperOption(param_decls=["--config"], metavar="FILE.toml", is_eager=True,
                                           expose_value=False, callback=_read_config, help=CONFIG_HELP))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [piece[1:-1].upper() if piece.startswith("{") and piece.endswith("}") else piece
                for piece in super().collect_usage_pieces(ctx)]

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _respell(self, args))

    def invoke(self, ctx: Any) -> Any:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s with %s", ctx.command_path, resolved_options(ctx))
        return super().invoke(ctx)


def _spellings(command: Any) -> dict[str, Any]:
    """Every ``--option`` spelling of ``command`` -> its parameter."""
    return {opt: param for param in command.params
            for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])] if opt.startswith("--")}


def _respell(command: Any, args: list[str]) -> list[str]:
    """``args`` with deprecated option spellings replaced by the current ones (a warning for each)."""
    spellings, out = _spellings(command), []
    for position, arg in enumerate(args):
        if arg == "--":
            return out + args[position:]
        old, equals, value = arg.partition("=")
        new = DEPRECATED_SPELLINGS.get(old)
        if new and old not in spellings and new in spellings:
            logger.warning("%s is deprecated (it goes in a later release): use %s", old, new)
            arg = new + equals + value
        out.append(arg)
    return out


def _config_key(name: str) -> str:
    return name.lstrip("-").replace("_", "-")


def _read_config(ctx: Any, param: Any, path: str | None) -> None:
    """``--config FILE.toml``: its values become the command's defaults (``ctx.default_map``), so that options
    given on the command line override them.

    The keys are the command's option names with or without dashes (``sample-per-centroid``, ``pca``), at the
    top level of the file or in a table named after the command (``[cluster]``), which wins over the top level.
    An unknown key is a usage error, except a top-level one in a file with tables (shared by several commands).
    Lists become comma-separated values (``levels = [4, 256]``) unless the option is repeatable; tables become
    JSON (``[cluster.storage-options]``).
    """
    import tomllib

    if not path:
        return
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror or exc}", ctx, param) from None
    except tomllib.TOMLDecodeError as exc:
        raise typer.BadParameter(f"{path} is not valid TOML: {exc}", ctx, param) from None
    command = ctx.command
    shared = {key: value for key, value in data.items() if not isinstance(value, dict) or _config_key(key) in
              {_config_key(opt) for opt in _spellings(command)}}
    own = data.get(command.name) if isinstance(data.get(command.name), dict) else {}
    has_tables = len(shared) < len(data)
    by_key = {_config_key(opt): p for opt, p in _spellings(command).items()
              if opt in getattr(p, "opts", []) and p.expose_value}
    by_key.update({_config_key(p.name): p for p in command.params if p.name and p.expose_value})
    by_key.update({_config_key(old): by_key[_config_key(new)] for old, new in DEPRECATED_SPELLINGS.items()
                   if _config_key(new) in by_key and _config_key(old) not in by_key})
    defaults: dict[str, Any] = {}
    for values, strict in ((shared, not has_tables), (own, True)):
        for key, value in values.items():
            target = by_key.get(_config_key(key))
            if target is None:
                if strict:
                    raise typer.BadParameter(f"{path}: {key!r} is not an option of {command.name}", ctx, param)
                continue
            defaults[target.name] = _config_value(target, value)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def _config_value(param: Any, value: Any) -> Any:
    """A TOML value as the option ``param`` reads it from the command line."""
    if isinstance(value, dict):
        return json.dumps(value)
    if getattr(param, "multiple", False) or (getattr(param, "nargs", 1) != 1):
        return list(value) if isinstance(value, list) else [value]
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


_SECRET_KEYS = {"key", "secret", "token", "password", "session_token", "aws_secret_access_key",
                "aws_session_token", "aws_access_key_id"}


def resolved_options(ctx: Any) -> str:
    """The options a command runs with, each with where its value came from (command line, config file or
    default), secrets in ``--storage-options`` masked: one line for ``-v``."""
    origin = {"COMMANDLINE": "", "DEFAULT_MAP": " (config file)", "ENVIRONMENT": " (environment)"}
    parts = []
    for name, value in ctx.params.items():
        if name == "storage_options" and isinstance(value, str):
            with contextlib.suppress(ValueError, AttributeError):
                value = json.dumps({k: "***" if k.lower() in _SECRET_KEYS else v for k, v in json.loads(value).items()})
        parts.append(f"{name}={value!r}{origin.get(getattr(ctx.get_parameter_source(name), 'name', ''), ' (default)')}")
    return ", ".join(parts)


class _Placeholder(_Command):
    """Stands for a lazy command in the list of commands until it is run (see :func:`lazy_command`)."""

    placeholder = True


class _App(typer.Typer):
    """The typer app whose commands are :class:`_Command`."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or _Command, **kwargs)


def lazy_command(name: str, build: Callable[[], Callable[..., Any]], summary: str) -> None:
    """Register command ``name``, whose callback (with its options) ``build`` makes when it is first run; until
    then a placeholder with help ``summary`` stands in the list of commands."""
    _lazy[name] = build

    @app.command(name, help=summary, add_help_option=False, cls=_Placeholder)
    def placeholder() -> None:  # replaced before it could run (see _Commands.resolve_command)
        raise RuntimeError(f"command {name} was not built")


def command_named(name: str) -> Any:
    """The click command ``name`` with every option (a lazy command is built now)."""
    if name not in _lazy:
        return typer.main.get_command(app).commands[name]
    single = _App(add_completion=False, pretty_exceptions_enable=False)
    single.command(name)(_lazy[name]())
    command = typer.main.get_command(single)
    command.name = name
    return command


def _version(value: bool) -> None:
    if value:
        from dataengine import __version__

        typer.echo(f"dataengine {__version__}")
        raise typer.Exit()


app = _App(
    name="dataengine",
    help="Streaming data engine for uncurated web images: ingest, embed, cluster, report, train.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Commands,
)


@app.callback()
def _configure(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Configure logging once for every command."""
    global _verbose
    _verbose = verbose
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs its CPU-feature probing at INFO


def emit_summary(summary: dict[str, Any], as_json: bool) -> None:
    """Print the machine-readable summary as the last line on stdout (with ``--json``)."""
    if as_json:
        sys.stdout.write(json.dumps(summary, sort_keys=True, default=str) + "\n")
        sys.stdout.flush()


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Print a small rich table to the console (stderr)."""
    from rich.table import Table  # here, not at import: rich.table and rich.progress cost ~10 ms of start-up

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column != columns[0] else "left")
    for row in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None, unit: str = "rows",
                 completed: int = 0) -> Iterator[Callable[..., None]]:
    """Yield a callback ``update(advance=1, total=None, description=None, completed=None)`` driving a rich
    progress bar (``completed`` given: the bar starts over at ``completed`` done of ``total``).

    The bar shows done/total (``total`` None: done/?), the rate in ``unit`` per second of this run and, with
    a total, the time left. ``completed``: units done by an earlier run (a resumed output), counted in the
    done/total but not in the rate.

    Without a terminal (scripts, CI, logs) there is no bar to draw: the callback does nothing, and rich.progress
    is not even imported (0.03 CPU-s, taken from the workers of a short ingest).
    """
    if not console.is_terminal:
        yield lambda advance=1, total=None, description=None, completed=None: None
        return
    from rich.progress import Progress

    with Progress(*_columns(unit), console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total, completed=completed)

        def update(advance: int = 1, total: int | None = None, description: str | None = None,
                   completed: int | None = None) -> None:
            if completed is not None:  # a new phase (a training epoch): done/total, rate and ETA start over
                progress.reset(task, total=total, completed=completed, description=description)
                return
            kwargs: dict[str, Any] = {"advance": advance}
            if total is not None:
                kwargs["total"] = total
            if description is not None:
                kwargs["description"] = description
            progress.update(task, **kwargs)

        yield update


def _columns(unit: str) -> list[Any]:
    """The bar's columns: description, bar, done/total (done/? without a total), the rate of this run in
    ``unit``/s (rich's speed: the updates of the last 30 s, so a resumed count never inflates it), elapsed
    and remaining time (rich.progress imported here, only when a bar is drawn)."""
    from rich.progress import BarColumn, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.text import Text

    class Done(ProgressColumn):
        def render(self, task: Any) -> Text:
            total = "?" if task.total is None else f"{int(task.total):,}"
            return Text(f"{int(task.completed):,}/{total}", style="progress.download")

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text("? " if speed is None else rate_text(speed) + f" {unit}/s", style="progress.data.speed")

    return [TextColumn("[bold]{task.description}"), BarColumn(), Done(), Rate(), TimeElapsedColumn(),
            TimeRemainingColumn()]


def rate_text(per_second: float) -> str:
    """A rate on 3 significant digits: ``0.512``, ``12.3``, ``4,350``."""
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


class Timer:
    """Wall-clock timer for summaries: ``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    """A comma-separated list of integers given to ``option`` (``"0,256"`` -> ``(0, 256)``).

    Raises:
        ValueError: naming the option and an example.
    """
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers like 4,256, got {text!r}") from None


def fail(message: str, code: int = 2) -> None:
    """Print an error for the user on one line (never wrapped, no markup read in it) and exit with ``code``
    (no traceback for bad input)."""
    from rich.text import Text

    console.print(Text.assemble(("error:", "red"), " ", " ".join(message.split())), soft_wrap=True)
    raise typer.Exit(code)


# Failures of object storage met below fsspec, by class name (botocore and aiohttp are not imported for this).
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                "ClientConnectorError", "ServerDisconnectedError", "ServerTimeoutError"}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def describe_failure(exc: BaseException) -> tuple[int, str]:
    """The exit status and the one-line message for an exception a command raised.

    dataengine's own errors carry both (:mod:`dataengine.errors`); storage failures below fsspec are
    recognised anywhere in the exception's chain; the rest by type: bad values and missing inputs are usage
    errors (2), other system errors runtime failures (1). An unexpected exception is one line too, with a hint.
    """
    from dataengine.errors import DataEngineError


    for link in _chain(exc):
        name = type(link).__name__
        if name in _NO_CREDENTIALS:
            return 2, (f"object storage refused the credentials or found none ({name}: {link}); set "
                       "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or key and secret in --storage-options")
        if name in _UNREACHABLE:
            return 1, f"cannot reach the storage endpoint ({name}): {link}"
        if isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {link.filename}" if link.filename else ""
            return 1, f"no space left on the device{where} ({link.strerror or link}); free some and re-run to resume"
    if isinstance(exc, DataEngineError):
        return exc.exit_code, str(exc)
    if isinstance(exc, KeyError):
        return 2, str(exc.args[0]) if exc.args else repr(exc)
    if isinstance(exc, ValueError):
        return 2, str(exc)
    if isinstance(exc, EOFError):
        return 2, f"an input ended early (truncated or corrupt?): {exc}"
    if isinstance(exc, FileNotFoundError):
        return 2, f"no such file or folder: {exc.filename or exc}"
    if isinstance(exc, IsADirectoryError):
        return 2, f"{exc.filename or exc} is a folder, not a file"
    if isinstance(exc, NotADirectoryError):
        return 2, f"{exc.filename or exc}: a part of this path is a file, not a folder"
    if isinstance(exc, PermissionError):
        return 2, f"permission denied: {exc.filename or exc}"
    if isinstance(exc, MemoryError):
        return 1, f"out of memory: {exc}" if str(exc) else "out of memory"
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return 1, f"{exc.strerror or exc}{where}"
    return 1, f"unexpected {type(exc).__name__}: {exc} (run with -v for the traceback, and please report it)"
