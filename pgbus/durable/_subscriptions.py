"""Durable subscriptions in the database: list them, move their position, drop them."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import TYPE_CHECKING

from pgbus._subscription import check_position
from pgbus.durable._schema import DEFAULT_SCHEMA, Sql, check_schema

if TYPE_CHECKING:
    from pgbus._publish import Connection


@dataclasses.dataclass(frozen=True, slots=True)
class DurableSubscription:
    """A durable subscription (a consumer group) as the database keeps it.

    :ivar name: its durable name.
    :ivar channels: the channels it takes events from.
    :ivar types: the event types it takes (``None``: every type on them).
    :ivar created_at: when it was first registered.
    :ivar pumped_at: when it last took events in, if ever.
    :ivar backlog: events committed on its channels and not yet handled, whether taken in
        or not (retries not yet due aside).
    :ivar retries: nacked events waiting for their retry.
    :ivar oldest: when the oldest event of the backlog was journaled (``None``: none).

    .. versionadded:: 0.3.0
    """

    name: str
    channels: tuple[str, ...]
    types: tuple[str, ...] | None
    created_at: dt.datetime
    pumped_at: dt.datetime | None
    backlog: int
    retries: int
    oldest: dt.datetime | None = None


def position_args(to: object) -> tuple[str, dt.datetime | None]:
    """The SQL arguments of a position (``"latest"``, ``"earliest"`` or an aware datetime).

    :raises ConfigError: for anything else.
    """
    position = check_position(to, "seek: to")
    if isinstance(position, dt.datetime):
        return "at", position
    return position, None


async def list_subscriptions(
    conn: Connection, schema: str = DEFAULT_SCHEMA
) -> list[DurableSubscription]:
    """Return the durable subscriptions of ``schema``, by name.

    :param conn: an asyncpg connection.
    :param schema: the durable schema.

    .. versionadded:: 0.3.0
    """
    await check_schema(conn, schema)
    rows = await conn.fetch(Sql(schema).list_subscriptions)
    return [
        DurableSubscription(
            name=row["name"],
            channels=tuple(row["channels"]),
            types=None if row["types"] is None else tuple(row["types"]),
            created_at=row["created_at"],
            pumped_at=row["pumped_at"],
            backlog=row["backlog"],
            retries=row["retries"],
            oldest=row["oldest"],
        )
        for row in rows
    ]


async def seek(
    conn: Connection, name: str, to: str | dt.datetime, schema: str = DEFAULT_SCHEMA
) -> bool:
    """Move durable subscription ``name`` to a position; back in time replays.

    What it had taken in and not handled (retries too) is dropped; from ``"earliest"``
    or a datetime it takes in again every event still in the journal from there (see
    the retention), from ``"latest"`` only what is published from now on. Running
    consumers of it go on from there after their batch in hand.

    :param conn: an asyncpg connection.
    :param name: the durable name.
    :param to: ``"earliest"``, ``"latest"`` or an aware datetime.
    :param schema: the durable schema.
    :returns: whether the subscription exists (and was moved).
    :raises ConfigError: for another ``to``.

    .. versionadded:: 0.3.0
    """
    mode, at = position_args(to)
    await check_schema(conn, schema)
    status = await conn.execute(Sql(schema).seek, name, mode, at)
    return bool(status.endswith(" 1"))


async def drop_subscription(conn: Connection, name: str, schema: str = DEFAULT_SCHEMA) -> bool:
    """Delete durable subscription ``name``: its position and what it had not handled.

    Stop its consumers first. The journal rows only it still needed are pruned then.

    :param conn: an asyncpg connection.
    :param name: the durable name.
    :param schema: the durable schema.
    :returns: whether it existed.

    .. versionadded:: 0.3.0
    """
    await check_schema(conn, schema)
    status = await conn.execute(Sql(schema).drop_subscription, name)
    return bool(status.endswith(" 1"))
