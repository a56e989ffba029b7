"""The typer application shared by every command module, plus the CLI-only helpers.

Logging is configured here once; progress bars and the ``--json`` summary line live here too, so library
code only logs and reports progress through callbacks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler

app = typer.Typer(
    name="dataengine",
    help="Streaming data engine for uncurated web images: ingest, embed, cluster, report, train.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Human-readable output goes to stderr so that stdout carries only the --json summary line when asked.
console = Console(stderr=True)


@app.callback()
def _configure(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only."),
) -> None:
    """Configure logging once for every command."""
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

    console.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)
    raise typer.Exit(code)
