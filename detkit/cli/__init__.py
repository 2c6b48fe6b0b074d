"""The ``detkit`` command line.

Each subcommand lives in its own module with a ``register(app)`` function, so the
commands stay independent and heavy imports happen only inside the command that needs
them. Exit codes: 0 all requested checks passed, 1 a check failed (``--fail-on``),
2 usage or environment error, 3 an unexpected error (traceback on stderr), 130
interrupted.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import typer

from detkit.errors import DetkitError, InputError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
# Not 1: a CI that gates on --fail-on must not read a crash (an out-of-memory error, a
# bug) as "a check failed". 3 is pytest's code for an internal error too.
EXIT_UNEXPECTED = 3

_COMMAND_MODULES = ("env", "kernels", "audit", "report", "probe", "coverage")


class Interrupt:
    """What :func:`sigterm_as_interrupt` saw. ``requested`` stays True once SIGINT or SIGTERM
    arrived, even where a library caught the KeyboardInterrupt it raised: a Ctrl-C that
    lands in torch's lazy imports came back as an AttributeError, and the run exited 0."""

    def __init__(self) -> None:
        self.requested = False
        self.holding = False

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Inside, the first signal is only recorded (a report's files are finished, not cut
        halfway); a second one raises, so that a stuck write can still be stopped."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[Interrupt]:
    """SIGTERM (a CI timeout, `docker stop`) raises KeyboardInterrupt inside the block, as
    SIGINT (Ctrl-C) does, so a long run ends as on Ctrl-C: finished results kept, report
    partial, exit 130. Both are recorded in the :class:`Interrupt` it yields."""
    state = Interrupt()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        state.requested = True
        if state.holding:
            state.holding = False
            return
        raise KeyboardInterrupt

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_signal)}
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a job started with SIGINT ignored stays so
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_signal)
    try:
        yield state
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def output_dir(out: Path, option: str = "--out") -> Path:
    """Create ``out`` (and its parents) before a long run, or say why it cannot be used."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{option} {out} is a file; pass a directory (report.json, .md and .html go inside)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{option} {out}: cannot create this directory ({e.strerror}: {e.filename}); "
                         "pass a directory you can write to") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"{option} {out}: the directory is not writable; pass a directory you can write to")
    return out


def output_file(out: Path, option: str = "--out") -> Path:
    """Check that a file can be written at ``out`` (its parents are created)."""
    if out.is_dir():
        raise InputError(f"{option} {out} is a directory; pass a file path inside it")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise InputError(f"{option} {out}: {parent} is a file, not a directory; pass a file path in a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{option} {out}: cannot create its directory ({e.strerror}); pass a path you can write to") from e
    return out

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
    """Console entry point: detkit errors become one line on stderr and exit code 2,
    anything unexpected a traceback and exit code 3."""
    try:
        app()
    except DetkitError as err:
        from rich.console import Console
        from rich.markup import escape

        # escape: paths and TOML keys ("[[prompts]]") must not be read as rich markup
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:
        import traceback

        traceback.print_exc()
        print(f"detkit: unexpected error (exit {EXIT_UNEXPECTED}): the traceback above says where; if it is not "
              "your environment (memory, disk, a driver), please report it with that traceback", file=sys.stderr)
        sys.exit(EXIT_UNEXPECTED)
