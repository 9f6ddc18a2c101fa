"""reid command line: a thin Typer layer that parses, calls ``reid.*`` and renders.

Results go to stdout; progress, warnings and logs to stderr. Heavy imports (torch, faiss)
happen inside the commands so that ``reid --help`` is instant.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="Person re-identification gallery search: index crops, query, evaluate, train.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console(highlight=False)


def command(*args, **kwargs):
    """Register a Typer command whose ReidError becomes one line on stderr and exit code 1."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            from reid.errors import ReidError

            try:
                return fn(*a, **k)
            except ReidError as e:
                err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
                raise typer.Exit(1)
            except KeyboardInterrupt:
                err.print("[yellow]interrupted[/]")
                raise typer.Exit(130)

        return app.command(*args, **kwargs)(wrapper)

    return decorate


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details to stderr.")) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, show_time=False)],
    )


# --- model (issue 2) --------------------------------------------------------------------------

# --- index / query / info / demo (issue 4) ----------------------------------------------------

# --- evaluate (issue 6) -----------------------------------------------------------------------

# --- train (issue 5) --------------------------------------------------------------------------


if __name__ == "__main__":
    app()
