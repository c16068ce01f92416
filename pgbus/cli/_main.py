"""The ``pgbus`` group: its options, and its commands, each imported when it runs.

``pgbus --help`` and ``pgbus --version`` import click and nothing heavy: a command's
module (and asyncpg, pydantic, rich, the bench, the server helpers behind it) is
imported only when that command is asked for.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

import click

from pgbus._version import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

#: Each command: ``(name, "module:attribute", its short help)``; ``pgbus --help`` lists
#: these without importing the commands (a test checks they match the commands' own).
COMMANDS = (
    (
        "bench",
        "pgbus.cli.bench:bench",
        "Measure pgbus side by side with raw asyncpg, in the same run.",
    ),
    (
        "dashboard",
        "pgbus.cli._dashboard:dashboard",
        "Serve a web page where operators see the buses of the database and act on them.",
    ),
    (
        "dead-letters",
        "pgbus.cli.durable:dead_letters",
        "List stored dead letters (the default) and deliver chosen ones again.",
    ),
    (
        "demo",
        "pgbus.cli._demo:demo",
        "Show pgbus end to end in a few seconds: no setup needed.",
    ),
    (
        "doctor",
        "pgbus.cli._doctor:doctor",
        "Check that the database works for pgbus, and say what to fix.",
    ),
    (
        "durable",
        "pgbus.cli.durable:durable",
        "List durable subscriptions, move their position (replay) or drop them.",
    ),
    (
        "listen",
        "pgbus.cli._app:listen",
        "Print notifications on CHANNELs as they arrive.",
    ),
    (
        "migrate",
        "pgbus.cli.durable:migrate_command",
        "Create or upgrade the durable mode's schema (idempotent, safe to run concurrently).",
    ),
    (
        "plugins",
        "pgbus.cli._app:plugins",
        "List every plugin a Bus would register, where it comes from, and its hooks.",
    ),
    (
        "publish",
        "pgbus.cli._app:publish",
        "Publish PAYLOAD on CHANNEL (read it from stdin with -).",
    ),
    (
        "run",
        "pgbus.cli._run:run_command",
        "Serve the Bus that MODULE:ATTR names until SIGTERM or SIGINT.",
    ),
    (
        "schema",
        "pgbus.cli._schema:schema",
        "Print the JSON Schema of event models, grouped by channel.",
    ),
    (
        "top",
        "pgbus.cli._top:top",
        "Show live per-channel rates, lag and errors of running buses.",
    ),
    (
        "triggers",
        "pgbus.cli.triggers:triggers",
        "Publish every committed row change of a table, from a database trigger.",
    ),
)


class _Group(click.Group):
    """Commands loaded on demand; expected errors reported in one line, never a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *(name for name, _, _ in COMMANDS)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is not None:
            return found
        path = next((path for name, path, _ in COMMANDS if name == cmd_name), None)
        if path is None:
            return None
        module, _, attr = path.partition(":")
        command: click.Command = getattr(importlib.import_module(module), attr)
        from pgbus.cli._common import accept_dsn  # noqa: PLC0415 - loaded with the command

        accept_dsn(command)
        self.add_command(command, cmd_name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:  # noqa: ARG002 - click's signature
        """List the commands from :data:`COMMANDS`, without importing them."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, _, text in COMMANDS])

    def invoke(self, ctx: click.Context) -> Any:
        from pgbus.cli._common import EXPECTED_ERRORS, one_line  # noqa: PLC0415 - not for --help

        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise
        except EXPECTED_ERRORS as exc:
            raise click.ClickException(one_line(exc)) from exc


@click.group(cls=_Group, context_settings=CONTEXT_SETTINGS)
@click.option(
    "--dsn",
    envvar="PGBUS_DSN",
    default=None,
    show_envvar=True,
    metavar="DSN",
    help="The PostgreSQL database, e.g. postgresql://user@host:5432/db (also after a "
    "command; default: PGBUS_DSN, then libpq's PGHOST, PGDATABASE, PGSERVICE, ...).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds to keep trying to connect before giving up.",
)
@click.option("-v", "--verbose", count=True, help="Log what pgbus does (-vv: debug).")
@click.version_option(__version__, "-V", "--version", prog_name="pgbus")
@click.pass_context
def cli(ctx: click.Context, dsn: str | None, timeout: float, verbose: int) -> None:
    """pgbus: a typed event bus on PostgreSQL LISTEN/NOTIFY.

    Start with `pgbus demo`: it needs no setup.
    """
    from pgbus.cli._common import State, stderr  # noqa: PLC0415 - not for --help

    if not verbose:  # the commands report what matters; -v shows pgbus's own log
        log = logging.getLogger("pgbus")
        if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
            log.addHandler(logging.NullHandler())  # no "last resort" stderr output
    else:
        from rich.logging import RichHandler  # noqa: PLC0415 - only with -v

        logging.basicConfig(
            level=logging.DEBUG if verbose > 1 else logging.INFO,
            format="%(message)s",
            handlers=[RichHandler(console=stderr(), show_path=False)],
        )
    ctx.obj = State(dsn, timeout)


def main() -> None:
    """Run the ``pgbus`` command line (the console script's entry point).

    .. versionadded:: 0.1.0
    """
    try:
        cli(prog_name="pgbus")
    except BrokenPipeError:  # `pgbus listen --json | head`: the reader is gone; so are we
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
