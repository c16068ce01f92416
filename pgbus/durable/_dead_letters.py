"""Stored dead letters: list them, and deliver chosen ones again."""

from __future__ import annotations

import dataclasses
import datetime as dt  # noqa: TC003 - dataclass fields are resolved at run time
from typing import TYPE_CHECKING

from pgbus._channels import MAX_PAYLOAD_BYTES
from pgbus._identifiers import quote_ident
from pgbus.durable._schema import DEFAULT_SCHEMA, check_schema

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pgbus._publish import Connection


@dataclasses.dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """A dead letter kept in the ``dead_letters`` table.

    :ivar id: its row id (what ``pgbus dead-letters redeliver`` takes).
    :ivar subscription: the durable name (or subscription name) whose handler gave up;
        ``None`` for a notification that could not be decoded.
    :ivar channel: the channel.
    :ivar event_id: the event's id, when known.
    :ivar journal_id: the journal row of a durable event.
    :ivar payload: the raw payload.
    :ivar error: the error, as text.
    :ivar attempts: how many times the handler ran.
    :ivar created_at: when it was given up on.
    :ivar redelivered_at: when it was last delivered again, if ever.

    .. versionadded:: 0.1.0
    """

    id: int
    subscription: str | None
    channel: str
    event_id: str | None
    journal_id: int | None
    payload: str
    error: str
    attempts: int
    created_at: dt.datetime
    redelivered_at: dt.datetime | None


async def list_dead_letters(
    conn: Connection,
    schema: str = DEFAULT_SCHEMA,
    *,
    subscription: str | None = None,
    include_redelivered: bool = False,
    limit: int = 100,
    channel: str | None = None,
    error: str | None = None,
) -> list[StoredDeadLetter]:
    """Return stored dead letters, oldest first.

    :param conn: an asyncpg connection.
    :param schema: the durable schema.
    :param subscription: only those of this subscription.
    :param include_redelivered: also those already delivered again.
    :param limit: at most this many.
    :param channel: only those of this channel.
    :param error: only those whose error contains this text (case-insensitive).
    :returns: the dead letters.
    :raises SchemaError: when the schema is missing or at another version.

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.3.0 ``channel`` and ``error``.
    """
    await check_schema(conn, schema)
    rows = await conn.fetch(
        f"""SELECT id, subscription, channel, event_id, journal_id, payload, error, attempts,
                   created_at, redelivered_at
            FROM {quote_ident(schema)}.dead_letters
            WHERE ($1::text IS NULL OR subscription = $1)
              AND ($2 OR redelivered_at IS NULL)
              AND ($4::text IS NULL OR channel = $4)
              AND ($5::text IS NULL OR strpos(lower(error), lower($5)) > 0)
            ORDER BY id LIMIT $3""",  # noqa: S608 - quoted identifier
        subscription,
        include_redelivered,
        limit,
        channel,
        error,
    )
    return [StoredDeadLetter(**dict(row)) for row in rows]


async def redeliver(
    conn: Connection, ids: Iterable[int], schema: str = DEFAULT_SCHEMA
) -> dict[int, str]:
    """Deliver chosen dead letters again.

    A durable one goes back to its subscription as a batch of its own (only that subscription gets
    it again), provided its journal row was not pruned. Any other one is sent again
    with ``NOTIFY`` on its channel, so every plain subscriber of the channel gets it.
    Each one is marked ``redelivered_at``.

    :param conn: an asyncpg connection (not in a transaction of yours: it commits).
    :param ids: the dead letters' ids.
    :param schema: the durable schema.
    :returns: for each id, ``"inbox"``, ``"notify"``, or why it was not redelivered.
    :raises SchemaError: when the schema is missing or at another version.

    .. versionadded:: 0.1.0
    """
    await check_schema(conn, schema)
    s = quote_ident(schema)
    outcome: dict[int, str] = {}
    for dead_id in ids:
        async with conn.transaction():
            row = await conn.fetchrow(
                f"SELECT * FROM {s}.dead_letters WHERE id = $1 FOR UPDATE",  # noqa: S608 - quoted identifier
                dead_id,
            )
            if row is None:
                outcome[dead_id] = "not found"
                continue
            if row["journal_id"] is not None and row["subscription"] is not None:
                inserted = await conn.fetchval(
                    f"""INSERT INTO {s}.batches (subscription, journal_ids)
                        SELECT $1, ARRAY[id] FROM {s}.journal WHERE id = $2
                        RETURNING 1""",  # noqa: S608 - quoted identifier
                    row["subscription"],
                    row["journal_id"],
                )
                if inserted is None:
                    outcome[dead_id] = "journal row pruned"
                    continue
                outcome[dead_id] = "inbox"
            else:
                if len(row["payload"].encode()) >= MAX_PAYLOAD_BYTES:
                    outcome[dead_id] = "payload too large for NOTIFY"
                    continue
                await conn.execute("SELECT pg_notify($1, $2)", row["channel"], row["payload"])
                outcome[dead_id] = "notify"
            await conn.execute(
                f"UPDATE {s}.dead_letters SET redelivered_at = now() WHERE id = $1",  # noqa: S608 - quoted identifier
                dead_id,
            )
    return outcome


async def discard(conn: Connection, ids: Iterable[int], schema: str = DEFAULT_SCHEMA) -> list[int]:
    """Delete chosen dead letters for good.

    :param conn: an asyncpg connection.
    :param ids: the dead letters' ids.
    :param schema: the durable schema.
    :returns: the ids that were deleted (an unknown id is left out).
    :raises SchemaError: when the schema is missing or at another version.

    .. versionadded:: 0.3.0
    """
    await check_schema(conn, schema)
    rows = await conn.fetch(
        f"DELETE FROM {quote_ident(schema)}.dead_letters WHERE id = ANY($1::bigint[])"  # noqa: S608 - quoted identifier
        " RETURNING id",
        list(ids),
    )
    return sorted(row["id"] for row in rows)
