"""``pgbus migrate`` and ``pgbus dead-letters``: the durable mode's schema and dead letters.

::

    pgbus migrate                      # create or upgrade the schema "pgbus"
    pgbus migrate --schema bus --check # exit 1 unless it is up to date (changes nothing)
    pgbus dead-letters                 # list the dead letters not yet redelivered
    pgbus dead-letters list --subscription billing --json
    pgbus dead-letters redeliver 12 13
    pgbus durable list                 # the durable subscriptions, with their backlog
    pgbus durable seek billing --to earliest   # replay what the journal still holds
    pgbus durable drop billing

.. versionadded:: 0.1.0
.. versionchanged:: 0.3.0 ``pgbus durable``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import click
from rich.table import Table

from pgbus.cli._common import CliError, State, dumps, stdout, with_connection
from pgbus.durable import (
    DEFAULT_SCHEMA,
    SCHEMA_VERSION,
    drop_subscription,
    list_dead_letters,
    list_subscriptions,
    migrate,
    redeliver,
    schema_version,
    seek,
)

__all__ = ["dead_letters", "durable", "migrate_command"]

#: The ``--schema`` option of every command on the durable tables (``pgbus dashboard`` too).
SCHEMA_OPTION = click.option(
    "--schema",
    default=DEFAULT_SCHEMA,
    show_default=True,
    envvar="PGBUS_SCHEMA",
    help="The PostgreSQL schema of pgbus's durable tables.",
)


def _state(ctx: click.Context) -> State:
    state = ctx.find_object(State)
    return state if state is not None else State(None, 5.0)


@click.command("migrate")
@SCHEMA_OPTION
@click.option("--check", is_flag=True, help="Change nothing; exit 1 unless up to date.")
@click.pass_context
def migrate_command(ctx: click.Context, schema: str, check: bool) -> None:
    """Create or upgrade the durable mode's schema (idempotent, safe to run concurrently)."""
    state = _state(ctx)
    if check:
        version = with_connection(state, lambda conn: schema_version(conn, schema))
        if version != SCHEMA_VERSION:
            found = "missing" if version is None else f"at version {version}"
            raise CliError(
                f"durable schema {schema!r} is {found}; this pgbus needs {SCHEMA_VERSION}:"
                f" run `pgbus migrate --schema {schema}`"
            )
        click.echo(f"durable schema {schema!r} is up to date (version {SCHEMA_VERSION})")
        return
    before, after = with_connection(state, lambda conn: migrate(conn, schema))
    if before == after:
        click.echo(f"durable schema {schema!r} is up to date (version {after})")
    else:
        click.echo(f"durable schema {schema!r}: version {before} -> {after}")


@click.group("dead-letters", invoke_without_command=True)
@SCHEMA_OPTION
@click.pass_context
def dead_letters(ctx: click.Context, schema: str) -> None:
    """List stored dead letters (the default) and deliver chosen ones again."""
    ctx.meta["pgbus.schema"] = schema
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_command)


@dead_letters.command("list")
@click.option("--subscription", help="Only those of this durable subscription.")
@click.option("--all", "include_all", is_flag=True, help="Include those already redelivered.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
@click.pass_context
def list_command(
    ctx: click.Context,
    subscription: str | None = None,
    include_all: bool = False,
    limit: int = 100,
    as_json: bool = False,
) -> None:
    """List dead letters, oldest first."""
    schema = ctx.meta.get("pgbus.schema", DEFAULT_SCHEMA)
    rows = with_connection(
        _state(ctx),
        lambda conn: list_dead_letters(
            conn,
            schema,
            subscription=subscription,
            include_redelivered=include_all,
            limit=limit,
        ),
    )
    if as_json:
        click.echo(dumps([dataclasses.asdict(row) for row in rows]))
        return
    if not rows:
        click.echo("no dead letters")
        return
    table = Table(title="pgbus dead letters", title_justify="left")
    for column in ("id", "subscription", "channel", "event id", "attempts", "error", "at"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row.id),
            row.subscription or "-",
            row.channel,
            row.event_id or "-",
            str(row.attempts),
            row.error if len(row.error) <= 80 else row.error[:77] + "...",  # noqa: PLR2004 - column width
            row.created_at.isoformat(timespec="seconds"),
        )
    stdout().print(table)


@dead_letters.command("redeliver")
@click.argument("ids", nargs=-1, required=True, type=int)
@click.pass_context
def redeliver_command(ctx: click.Context, ids: tuple[int, ...]) -> None:
    """Deliver the dead letters IDS again (durable ones to their subscription only)."""
    schema = ctx.meta.get("pgbus.schema", DEFAULT_SCHEMA)
    outcome: dict[int, str] = with_connection(
        _state(ctx), lambda conn: redeliver(conn, ids, schema)
    )
    failed = False
    for dead_id, what in outcome.items():
        if what in ("inbox", "notify"):
            click.echo(f"{dead_id}: redelivered ({what})")
        else:
            failed = True
            click.echo(f"{dead_id}: not redelivered: {what}", err=True)
    if failed:
        raise click.exceptions.Exit(1)


@click.group("durable", invoke_without_command=True)
@SCHEMA_OPTION
@click.pass_context
def durable(ctx: click.Context, schema: str) -> None:
    """List durable subscriptions, move their position (replay) or drop them."""
    ctx.meta["pgbus.schema"] = schema
    if ctx.invoked_subcommand is None:
        ctx.invoke(durable_list)


@durable.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
@click.pass_context
def durable_list(ctx: click.Context, as_json: bool = False) -> None:
    """List the durable subscriptions, with what they have taken in and not handled."""
    schema = ctx.meta.get("pgbus.schema", DEFAULT_SCHEMA)
    rows = with_connection(_state(ctx), lambda conn: list_subscriptions(conn, schema))
    if as_json:
        click.echo(dumps([dataclasses.asdict(row) for row in rows]))
        return
    if not rows:
        click.echo("no durable subscriptions")
        return
    table = Table(title="pgbus durable subscriptions", title_justify="left")
    for column in ("name", "channels", "types", "backlog", "retries", "pumped at"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.name,
            ", ".join(row.channels),
            ", ".join(row.types) if row.types else "all",
            str(row.backlog),
            str(row.retries),
            row.pumped_at.isoformat(timespec="seconds") if row.pumped_at else "-",
        )
    stdout().print(table)


def _position(value: str) -> str | dt.datetime:
    """``--to``: earliest, latest, or an ISO 8601 timestamp with its time zone."""
    if value in ("earliest", "latest"):
        return value
    try:
        at = dt.datetime.fromisoformat(value)
    except ValueError:
        raise CliError(
            f"--to takes earliest, latest or an ISO 8601 timestamp, not {value!r}"
        ) from None
    if at.utcoffset() is None:
        raise CliError(f"--to {value}: give the time zone (e.g. {value}+00:00 or {value}Z)")
    return at


@durable.command("seek")
@click.argument("name")
@click.option("--to", "to", required=True, help="earliest, latest or an ISO 8601 timestamp.")
@click.pass_context
def durable_seek(ctx: click.Context, name: str, to: str) -> None:
    """Move durable subscription NAME; back in time replays what the journal still holds."""
    schema = ctx.meta.get("pgbus.schema", DEFAULT_SCHEMA)
    position = _position(to)
    moved = with_connection(_state(ctx), lambda conn: seek(conn, name, position, schema))
    if not moved:
        raise CliError(f"no durable subscription {name!r} in schema {schema!r}")
    click.echo(f"{name}: moved to {to}")


@durable.command("drop")
@click.argument("name")
@click.pass_context
def durable_drop(ctx: click.Context, name: str) -> None:
    """Delete durable subscription NAME (stop its consumers first)."""
    schema = ctx.meta.get("pgbus.schema", DEFAULT_SCHEMA)
    dropped = with_connection(_state(ctx), lambda conn: drop_subscription(conn, name, schema))
    if not dropped:
        raise CliError(f"no durable subscription {name!r} in schema {schema!r}")
    click.echo(f"{name}: dropped")
