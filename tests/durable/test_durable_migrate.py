"""Upgrading durable schemas in place: v1 (an inbox row per event) to batches, v4 to v5."""

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


async def test_v4_consumers_go_on_through_the_upgrade_to_plpgsql_functions(
    pg_dsn: str, schema_name: str, sql: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
):
    """`migrate` to v5 replaces the claim and the ack under a running v4 consumer, which
    handles what follows as before; the functions are PL/pgSQL (parsed once a session)."""
    ticket = ticket_type(schema_name)
    got = Collector()
    bus = pgbus.Bus(
        pg_dsn,
        load_entrypoints=False,
        stop_timeout=5.0,
        plugins=[DurablePlugin(schema_name, prune_interval=None)],
    )
    bus.subscribe(ticket, durable="ledger")(got)
    languages = f"""
        SELECT array_agg(l.lanname::text ORDER BY p.proname) FROM pg_proc p
        JOIN pg_language l ON l.oid = p.prolang
        WHERE p.pronamespace = '"{schema_name}"'::regnamespace
          AND p.proname IN ('ack', 'claim', 'claim_ordered')"""
    try:
        with monkeypatch.context() as m:  # this pgbus as it was at v4, started
            m.setattr(pgbus.durable._schema, "MIGRATIONS", pgbus.durable._schema.MIGRATIONS[:4])
            m.setattr(pgbus.durable._schema, "SCHEMA_VERSION", 4)
            assert await migrate(sql, schema_name) == (0, 4)
            assert await sql.fetchval(languages) == ["sql", "sql", "sql"]
            await bus.start()
        await bus.publish_many([ticket(n=i) for i in range(3)])
        await got.wait_for(3)
        assert await migrate(sql, schema_name) == (4, SCHEMA_VERSION)
        await bus.publish_many([ticket(n=i) for i in range(3, 6)])
        await got.wait_for(6)
        await bus.stop()  # acks the last batch
        assert [e.n for e in got.items] == list(range(6))
        assert await sql.fetchval(languages) == ["plpgsql", "plpgsql", "plpgsql"]
        pump = await sql.fetchval(
            f"SELECT prosrc FROM pg_proc WHERE proname = 'pump'"
            f" AND pronamespace = '\"{schema_name}\"'::regnamespace"
        )
        assert "j.xid >= low AND j.xid < high" in pump  # a range a generic plan can use
        assert await sql.fetchval(f'SELECT count(*) FROM "{schema_name}".batches') == 0
    finally:
        await bus.stop()
        await sql.execute(f'DROP SCHEMA IF EXISTS "{schema_name}" CASCADE')
