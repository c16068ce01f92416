"""``pgbus relay`` and ``pgbus relay status`` (a ``pgbus.commands`` entry point).

Only click is imported here: ``pgbus --help`` imports this module for the short help.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

import click

if TYPE_CHECKING:
    from pgbus_relay._status import RelayStatus

_SCHEMA = click.option(
    "--schema",
    default="pgbus",
    show_default=True,
    metavar="NAME",
    help="The PostgreSQL schema of pgbus's durable tables.",
)


class _State(Protocol):
    """What the ``pgbus`` group passes its commands (``ctx.obj``)."""

    timeout: float

    def require_dsn(self) -> str: ...


@click.group(invoke_without_command=True)
@click.option(
    "--to",
    metavar="URL",
    help="The broker: kafka://host:port or nats://host:port?stream=NAME (JetStream).",
)
@click.option(
    "--channel",
    "channels",
    multiple=True,
    metavar="NAME",
    help="A channel to relay (repeatable; at least one).",
)
@click.option(
    "--topic",
    default="{channel}",
    show_default=True,
    metavar="TEMPLATE",
    help="The topic (Kafka) or subject (NATS) of each event, from {channel} and {type}.",
)
@click.option(
    "--key",
    metavar="FIELD",
    help="A payload field: events with equal values keep their order (the Kafka record key).",
)
@click.option(
    "--name",
    default="relay",
    show_default=True,
    help="The relay's name: processes with the same name share the work.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Events in flight at once, per channel.",
)
@click.option(
    "--start",
    default="earliest",
    show_default=True,
    help="Where a relay new to the database starts: earliest, latest, or an ISO time.",
)
@click.option(
    "--lease",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds a process's claim on events lasts: a killed one's go to the others after it.",
)
@_SCHEMA
@click.pass_context
def relay(  # noqa: PLR0917 - click passes each option
    ctx: click.Context,
    to: str | None,
    channels: tuple[str, ...],
    topic: str,
    key: str | None,
    name: str,
    concurrency: int,
    start: str,
    lease: float,
    schema: str,
) -> None:
    r"""Relay durable events to Kafka or NATS JetStream until SIGTERM or SIGINT.

    The relay is a durable subscription per channel: an event's position moves only
    once the broker acknowledged it, so nothing is lost across restarts and broker
    outages. `pgbus relay status` shows each relay's lag and last error.

    \b
      pgbus relay --to kafka://127.0.0.1:9092 --channel orders --key order_id
      pgbus relay --to 'nats://127.0.0.1:4222?stream=ORDERS' --channel orders
    """
    if ctx.invoked_subcommand is not None:
        return
    if not to:
        raise click.UsageError("give the broker: --to URL")
    if not channels:
        raise click.UsageError("give at least one --channel")
    state: _State = ctx.obj
    options = {"topic": topic, "key": key, "name": name, "concurrency": concurrency}
    plugin = {"schema": schema, "lease": lease}
    asyncio.run(_serve(state, to, list(channels), plugin=plugin, start=start, options=options))


async def _serve(
    state: _State,
    to: str,
    channels: list[str],
    *,
    plugin: dict[str, Any],
    start: str,
    options: dict[str, Any],
) -> None:
    import datetime as dt  # noqa: PLC0415 - not for --help

    import pgbus  # noqa: PLC0415 - not for --help
    from pgbus.durable import DurablePlugin  # noqa: PLC0415 - not for --help
    from pgbus_relay._relay import Relay  # noqa: PLC0415 - not for --help

    position: str | dt.datetime = start
    if start not in ("earliest", "latest"):
        try:
            position = dt.datetime.fromisoformat(start)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--start") from exc
    bus = pgbus.Bus(
        state.require_dsn(),
        plugins=[DurablePlugin(**plugin)],
        connect_timeout=state.timeout,
        start_timeout=state.timeout,
    )
    Relay(bus, to=to, channels=channels, start=position, **options)
    await bus.run_forever()


@relay.command()
@_SCHEMA
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.pass_obj
def status(state: _State, schema: str, as_json: bool) -> None:
    """Show each relay's lag (events, seconds behind) and the broker's last error."""
    rows = asyncio.run(_status(state, schema))
    if as_json:
        import dataclasses  # noqa: PLC0415 - not for --help
        import json  # noqa: PLC0415 - not for --help

        click.echo(json.dumps([dataclasses.asdict(row) for row in rows], default=str))
        return
    from rich.console import Console  # noqa: PLC0415 - not for --help
    from rich.table import Table  # noqa: PLC0415 - not for --help

    table = Table(title="pgbus relays", title_justify="left")
    for column in ("relay", "channel", "to", "lag", "behind", "state", "last error"):
        table.add_column(column, justify="right" if column in ("lag", "behind") else "left")
    for row in rows:
        behind = "-" if row.behind is None else f"{row.behind:.1f} s"
        when = "" if row.last_error_at is None else f" ({row.last_error_at:%Y-%m-%d %H:%M:%S})"
        table.add_row(
            row.relay,
            row.channel,
            row.target,
            str(row.lag),
            behind,
            "failing" if row.failing else "ok",
            f"{row.last_error}{when}" if row.last_error else "",
        )
    Console(highlight=False, soft_wrap=True).print(table if rows else "no relay has started yet")


async def _status(state: _State, schema: str) -> list[RelayStatus]:
    import asyncpg  # noqa: PLC0415 - not for --help

    from pgbus_relay._status import relay_status  # noqa: PLC0415 - not for --help

    conn = await asyncpg.connect(state.require_dsn(), timeout=state.timeout)
    try:
        return await relay_status(conn, schema)
    finally:
        await conn.close()
