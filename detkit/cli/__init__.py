"""The ``detkit`` command line.

Each subcommand lives in its own module with a ``register(app)`` function, so the
commands stay independent and heavy imports happen only inside the command that needs
them. Exit codes: 0 all requested checks passed, 1 a check failed (``--fail-on``),
2 usage or environment error.
"""

from __future__ import annotations

import importlib
import sys

import typer

from detkit.errors import DetkitError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2

_COMMAND_MODULES = ("env", "kernels", "audit", "report", "probe")

app = typer.Typer(
    name="detkit",
    help="Make LLM inference reproducible and prove it: batch-invariant kernels, audits, probes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def version() -> None:
    """Print detkit's version."""
    from detkit import __version__

    typer.echo(__version__)


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        module = importlib.import_module(f"detkit.cli.{name}")
        module.register(app)


@app.callback()
def _root() -> None:
    """Make LLM inference reproducible and prove it: batch-invariant kernels, audits, probes."""


_register_all()


def main() -> None:
    """Console entry point: detkit errors become one line on stderr and exit code 2."""
    try:
        app()
    except DetkitError as err:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
