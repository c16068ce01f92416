"""``pgbus triggers``: install, list and remove table change triggers (:mod:`pgbus.changes`).

::

    pgbus triggers install orders --channel orders_changes
    pgbus triggers install "Order Items" --schema sales --model app.events:ItemChanged
    pgbus triggers install orders --channel orders_changes --journal pgbus   # durable
    pgbus triggers list --json
    pgbus triggers remove orders

Table, schema and column names are taken exactly as given: no quoting, no case folding,
no ``schema.table`` splitting (pass ``--schema``).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.table import Table

from pgbus import changes
from pgbus.cli._common import CliError, State, dumps, load_model, stdout, with_connection

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import asyncpg

T = TypeVar("T")

__all__ = ["triggers"]

T_OPS = click.Choice(changes.ALL_OPERATIONS, case_sensitive=False)


@click.group()
@click.option(
    "--dsn",
    metavar="DSN",
    help="The PostgreSQL database (default: pgbus --dsn, then $PGBUS_DSN).",
)
@click.pass_context
def triggers(ctx: click.Context, dsn: str | None) -> None:
    """Publish every committed row change of a table, from a database trigger."""
    parent = ctx.find_object(State)
    if dsn is None:
        dsn = parent.dsn if parent is not None else os.environ.get("PGBUS_DSN")
    timeout = parent.timeout if parent is not None else 5.0
    ctx.obj = State(dsn, timeout)


#: What :mod:`pgbus.changes` calls an argument, and the option that sets it here.
_OPTIONS = (
    ("pass key=[...] columns", "pass --key COLUMN (repeatable) for the columns"),
    ("choose another name=", "choose another --name"),
    ("pass channel= (or a model= bound to a channel)", "pass --channel (or a --model with one)"),
    ("event_type ", "--type "),
    ("model must be", "--model must be"),
)


def _in_cli_words(state: State, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run ``work`` like :func:`with_connection`, its errors naming options, not arguments."""
    try:
        return with_connection(state, work)
    except click.ClickException as exc:
        message = exc.message
        for python, cli in _OPTIONS:
            message = message.replace(python, cli)
        raise CliError(message) from exc


def _row(trigger: changes.ChangeTrigger) -> dict[str, Any]:
    return dataclasses.asdict(trigger)


@triggers.command()
@click.argument("table")
@click.option("--schema", help="The table's schema (default: the search path's).")
@click.option("--channel", help="The channel to notify (default: the --model's).")
@click.option(
    "--model",
    metavar="MODULE:CLASS",
    help="A pgbus.RowChanged subclass; gives the channel and the event type.",
)
@click.option(
    "--type",
    "event_type",
    help=f"The envelope type (default {changes.ROW_CHANGED_TYPE!r}, or the --model's).",
)
@click.option(
    "-c",
    "--column",
    "columns",
    multiple=True,
    help="A column to send as row data (repeat; default: all columns).",
)
@click.option("--key", multiple=True, help="A key column (repeat; default: the primary key).")
@click.option(
    "--op",
    "operations",
    multiple=True,
    type=T_OPS,
    help="An operation to report (repeat; default: INSERT, UPDATE and DELETE).",
)
@click.option(
    "--name", default=changes.DEFAULT_TRIGGER_NAME, show_default=True, help="The trigger's name."
)
@click.option(
    "--journal",
    metavar="SCHEMA",
    help="Also write every change into the durable journal in SCHEMA (e.g. pgbus).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the installed trigger as JSON.")
@click.pass_obj
def install(
    state: State,
    *,
    table: str,
    schema: str | None,
    channel: str | None,
    model: str | None,
    event_type: str | None,
    columns: tuple[str, ...],
    key: tuple[str, ...],
    operations: tuple[str, ...],
    name: str,
    journal: str | None,
    as_json: bool,
) -> None:
    """Install (or replace) the change trigger on TABLE."""
    row_model: Any = None
    if model is not None:
        row_model = load_model(model)
        if not issubclass(row_model, changes.RowChanged):
            raise click.BadParameter(
                f"{model} is not a pgbus.RowChanged subclass", param_hint="--model"
            )
    trigger: changes.ChangeTrigger = _in_cli_words(
        state,
        lambda conn: changes.install_change_trigger(
            conn,
            table,
            schema=schema,
            channel=channel,
            model=row_model,
            event_type=event_type,
            columns=columns or None,
            operations=operations or changes.ALL_OPERATIONS,
            key=key or None,
            name=name,
            journal=journal,
        ),
    )
    if as_json:
        click.echo(dumps(_row(trigger)))
        return
    click.echo(
        f"installed trigger {trigger.name} on {trigger.schema}.{trigger.table}:"
        f" {', '.join(trigger.operations)} -> channel {trigger.channel}"
        f" (type {trigger.event_type}, key {', '.join(trigger.key)})"
    )


@triggers.command(name="list")
@click.option("--table", help="Only this table's triggers.")
@click.option("--schema", help="Only triggers on tables in this schema.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_obj
def list_(state: State, table: str | None, schema: str | None, as_json: bool) -> None:
    """List the change triggers in the database."""
    found: list[changes.ChangeTrigger] = with_connection(
        state, lambda conn: changes.list_change_triggers(conn, table=table, schema=schema)
    )
    if as_json:
        click.echo(dumps([_row(t) for t in found]))
        return
    if not found:
        click.echo("no change triggers")
        return
    out = Table(title="pgbus change triggers", title_justify="left")
    for column in (
        "table",
        "trigger",
        "channel",
        "type",
        "operations",
        "key",
        "columns",
        "journal",
    ):
        # a name is never split mid-word at 80 columns ("public.i" / "tems"): lists wrap
        out.add_column(column, no_wrap=column in ("table", "trigger", "channel", "type"))
    for t in found:
        out.add_row(
            f"{t.schema}.{t.table}",
            t.name + ("" if t.enabled else " (disabled)"),
            t.channel,
            t.event_type,
            ", ".join(t.operations),
            ", ".join(t.key),
            "all" if t.columns is None else ", ".join(t.columns),
            t.journal or "",
        )
    stdout().print(out)


@triggers.command()
@click.argument("table")
@click.option("--schema", help="The table's schema (default: the search path's).")
@click.option(
    "--name", default=changes.DEFAULT_TRIGGER_NAME, show_default=True, help="The trigger's name."
)
@click.pass_obj
def remove(state: State, table: str, schema: str | None, name: str) -> None:
    """Remove the change trigger from TABLE (and the trigger function, once unused)."""
    removed: bool = with_connection(
        state, lambda conn: changes.remove_change_trigger(conn, table, schema=schema, name=name)
    )
    where = f"{schema}.{table}" if schema is not None else table
    click.echo(
        f"removed trigger {name} from {where}" if removed else f"no trigger {name} on {where}"
    )
