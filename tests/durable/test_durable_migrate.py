"""Upgrading a v1 durable schema (an inbox row per event) to v2 (batches) in place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from _helpers import Collector, ticket_type

import pgbus
import pgbus.durable._schema
from pgbus.durable import SCHEMA_VERSION, DurablePlugin, migrate, schema_version

if TYPE_CHECKING:
    import asyncpg
    import pytest


async def test_v1_events_and_positions_survive_the_upgrade(
    pg_dsn: str, schema_name: str, sql: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
):
    """Events a v1 subscription had taken in (one claimed by a dead member) or not yet
    seen are each handled once, in order, after `migrate` moved the schema to v2."""
    ticket = ticket_type(schema_name)
    s = f'"{schema_name}"'
    with monkeypatch.context() as m:  # this pgbus as it was at v1
        m.setattr(pgbus.durable._schema, "MIGRATIONS", pgbus.durable._schema.MIGRATIONS[:1])
        m.setattr(pgbus.durable._schema, "SCHEMA_VERSION", 1)
        assert await migrate(sql, schema_name) == (0, 1)
    try:
        await sql.execute(
            f"INSERT INTO {s}.subscriptions (name, channels, types, snap)"
            " VALUES ('ledger', $1, NULL, pg_current_snapshot())",
            [schema_name],
        )
        publisher = pgbus.Bus(
            pg_dsn,
            load_entrypoints=False,
            plugins=[DurablePlugin(schema_name, prune_interval=None)],
        )
        await publisher.publish_many([ticket(n=i) for i in range(3)])
        # What a v1 pump did: the rows into the inbox, the position past them; the
        # first row claimed by a member that died.
        await sql.execute(
            f"""WITH moved AS (
                    INSERT INTO {s}.inbox (subscription, journal_id)
                    SELECT 'ledger', id FROM {s}.journal ORDER BY id RETURNING journal_id)
                UPDATE {s}.subscriptions SET snap = pg_current_snapshot()
                WHERE (SELECT count(*) FROM moved) = 3"""
        )
        await sql.execute(
            f"UPDATE {s}.inbox SET claimed_by = 'dead', deliveries = 1,"
            " claimed_until = now() + interval '1 hour'"
            f" WHERE journal_id = (SELECT min(id) FROM {s}.journal)"
        )
        await publisher.publish_many([ticket(n=i) for i in range(3, 6)])  # not pumped yet
        await publisher.stop()

        assert await migrate(sql, schema_name) == (1, SCHEMA_VERSION)
        assert await schema_version(sql, schema_name) == SCHEMA_VERSION
        assert await sql.fetchval(f"SELECT to_regclass('{s}.inbox')") is None

        got = Collector()
        bus = pgbus.Bus(
            pg_dsn,
            load_entrypoints=False,
            stop_timeout=5.0,
            plugins=[DurablePlugin(schema_name, poll_interval=60.0, prune_interval=None)],
        )
        bus.subscribe(ticket, durable="ledger")(got)
        async with bus:
            await got.wait_for(6)
        assert [e.n for e in got.items] == list(range(6))
        assert await sql.fetchval(f"SELECT count(*) FROM {s}.batches") == 0
    finally:
        await sql.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
