"""Where relays stand: lag from the durable tables, the last error from ``relays``.

The ``relays`` table (in the durable schema) is the relay's own: a relay creates it
when it first starts, and keeps one row per channel it relays, with the broker's last
error. The lag is read from the durable subscription itself: the events in its
batches and the journal rows on its channels it has not taken in yet.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datetime as dt

    import asyncpg

    Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


def _quoted(schema: str) -> str:
    quoted = schema.replace('"', '""')
    return f'"{quoted}"'


@dataclasses.dataclass(frozen=True, slots=True)
class RelayStatus:
    """One channel of one relay, as the database knows it.

    :ivar relay: the relay's name (its consumer group).
    :ivar channel: the channel it relays.
    :ivar subscription: its durable subscription.
    :ivar target: the broker URL (without a password).
    :ivar lag: events journaled on the channel and not yet acknowledged by the broker.
    :ivar behind: seconds since the oldest of them was journaled (``None``: no lag).
    :ivar failing: whether the broker is failing it now.
    :ivar last_error: the broker's last error, if any.
    :ivar last_error_at: when it happened.
    :ivar started_at: when a relay process last started on it.

    .. versionadded:: 0.1.0
    """

    relay: str
    channel: str
    subscription: str
    target: str
    lag: int
    behind: float | None
    failing: bool
    last_error: str | None
    last_error_at: dt.datetime | None
    started_at: dt.datetime


_CREATE = """
CREATE TABLE IF NOT EXISTS {s}.relays (
    subscription text PRIMARY KEY,
    relay text NOT NULL,
    channel text NOT NULL,
    target text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    failing boolean NOT NULL DEFAULT false,
    last_error text,
    last_error_at timestamptz
)"""

_REGISTER = """
INSERT INTO {s}.relays (subscription, relay, channel, target) VALUES ($1, $2, $3, $4)
ON CONFLICT (subscription) DO UPDATE
SET relay = EXCLUDED.relay, channel = EXCLUDED.channel, target = EXCLUDED.target,
    started_at = now()"""

_MARK = """
UPDATE {s}.relays SET failing = $3,
    last_error = coalesce($2, last_error),
    last_error_at = CASE WHEN $2 IS NULL THEN last_error_at ELSE now() END
WHERE subscription = $1"""

# Pending: the journal ids in the subscription's batches, and the journal rows on its
# channels that committed after its snapshot (not taken in yet), but for those a pump
# cut short (more than one statement's worth) already took in: up to ``batch_cursor``
# of ``batch_snap``.
_STATUS = """
SELECT r.relay, r.channel, r.subscription, r.target, r.failing, r.last_error,
       r.last_error_at, r.started_at, p.lag, p.behind
FROM {s}.relays r
LEFT JOIN {s}.subscriptions s ON s.name = r.subscription
LEFT JOIN LATERAL (
    SELECT count(*)::bigint AS lag,
           extract(epoch FROM now() - min(created_at))::float8 AS behind
    FROM (
        SELECT j.created_at FROM {s}.batches b
        CROSS JOIN LATERAL unnest(b.journal_ids) AS ids(id)
        JOIN {s}.journal j ON j.id = ids.id
        WHERE b.subscription = s.name
        UNION ALL
        SELECT j.created_at FROM {s}.journal j
        WHERE j.channel = ANY(s.channels)
          AND j.xid >= pg_snapshot_xmin(s.snap)
          AND NOT pg_visible_in_snapshot(j.xid, s.snap)
          AND NOT (s.batch_snap IS NOT NULL AND j.id <= s.batch_cursor
                   AND pg_visible_in_snapshot(j.xid, s.batch_snap))
    ) pending
) p ON true
ORDER BY r.relay, r.channel"""


async def _ensure(conn: Connection, s: str) -> None:
    async with conn.transaction():  # one creator at a time: CREATE ... IF NOT EXISTS races
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('pgbus_relay.relays'))")
        await conn.execute(_CREATE.format(s=s))


async def register(
    conn: Connection, schema: str, subscription: str, *, relay: str, channel: str, target: str
) -> None:
    """Create the ``relays`` table if need be, and (re)register one channel of a relay."""
    s = _quoted(schema)
    await _ensure(conn, s)
    await conn.execute(_REGISTER.format(s=s), subscription, relay, channel, target)


async def mark(
    conn: Connection, schema: str, subscription: str, error: str | None, *, failing: bool
) -> None:
    """Record the broker's error (or that it recovered: ``error=None, failing=False``)."""
    await conn.execute(_MARK.format(s=_quoted(schema)), subscription, error, failing)


async def relay_status(conn: Connection, schema: str = "pgbus") -> list[RelayStatus]:
    """Every relay's status in ``schema``, one row per relayed channel.

    :param conn: an asyncpg connection to the database the relays read.
    :param schema: the durable schema.
    :returns: the rows, by relay and channel (none when no relay ever started).

    .. versionadded:: 0.1.0
    """
    s = _quoted(schema)
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{s}.relays")
    if not exists:
        return []
    rows = await conn.fetch(_STATUS.format(s=s))
    return [
        RelayStatus(
            relay=row["relay"],
            channel=row["channel"],
            subscription=row["subscription"],
            target=row["target"],
            lag=row["lag"] or 0,
            behind=row["behind"],
            failing=row["failing"],
            last_error=row["last_error"],
            last_error_at=row["last_error_at"],
            started_at=row["started_at"],
        )
        for row in rows
    ]
