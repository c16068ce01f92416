"""Durable publish(connection=X) for every async driver: the journal row follows X."""

from __future__ import annotations

import psycopg
import pytest
from _drivers import ASYNC_DRIVERS, BlockError, open_driver
from _helpers import Collector, ticket_type

import pgbus
import pgbus._publish
import pgbus.sync
from pgbus.durable import DurablePlugin, SchemaError


@pytest.fixture(params=ASYNC_DRIVERS)
async def tx(request, pg_dsn):
    async with open_driver(request.param, pg_dsn) as opened:
        yield opened


async def journaled(sql, schema: str) -> int:
    return await sql.fetchval(f'SELECT count(*) FROM "{schema}".journal')


async def test_journal_rows_follow_the_callers_transaction(durable_bus, sql, schema, tx, channel):
    """Commit journals and delivers; rollback and an exception in the block journal nothing."""
    ticket = ticket_type(channel)
    seen = Collector()
    bus: pgbus.Bus = durable_bus()
    bus.subscribe(ticket, durable="drivers")(seen)
    async with bus:
        await tx.begin()
        await bus.publish(ticket(n=1), connection=tx.target)
        await tx.rollback()
        with pytest.raises(BlockError):
            await tx.fail_in_block(lambda: bus.publish_many([ticket(n=2)], connection=tx.target))
        assert await journaled(sql, schema) == 0
        async with tx.block():
            await bus.publish(ticket(n=3), connection=tx.target)
            await bus.publish_many([ticket(n=4), ticket(n=5)], connection=tx.target)
            assert await tx.in_transaction()
            assert await journaled(sql, schema) == 0  # not before the commit
        await seen.wait_for(3)
    assert [e.n for e in seen.items] == [3, 4, 5]
    assert await journaled(sql, schema) == 3


async def test_a_taken_id_is_a_duplicate_event_id_on_any_driver(
    durable_bus, sql, schema, tx, channel, monkeypatch: pytest.MonkeyPatch
):
    """An id the journal holds fails the publish in X's transaction, naming the id."""
    ticket = ticket_type(channel)
    await sql.execute(
        f'INSERT INTO "{schema}".journal (channel, event_id, type, payload)'
        " VALUES ($1, $2, 'Ticket', '{}')",
        channel,
        "d" * 32,
    )
    monkeypatch.setattr(pgbus._publish, "new_event_id", lambda: "d" * 32)
    bus: pgbus.Bus = durable_bus()
    await tx.begin()
    with pytest.raises(pgbus.DuplicateEventId) as info:
        await bus.publish(ticket(n=1), connection=tx.target)
    await tx.rollback()
    await bus.stop()
    assert info.value.event_ids == ("d" * 32,)
    assert await journaled(sql, schema) == 1


async def test_missing_schema_is_a_schema_error_on_any_driver(pg_dsn, schema_name, tx, channel):
    """A durable publish on X into a schema never migrated names `pgbus migrate`."""
    ticket = ticket_type(channel)
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[DurablePlugin(schema_name)])
    await tx.begin()
    with pytest.raises(SchemaError, match="pgbus migrate"):
        await bus.publish(ticket(n=1), connection=tx.target)
    await tx.rollback()
    await bus.stop()


async def test_sync_durable_publish_journals_in_the_callers_transaction(
    durable_bus, sql, schema, pg_dsn, channel
):
    """pgbus.sync.publish(durable=True) journals on commit only; durable subscribers get it."""
    ticket = ticket_type(channel)
    seen = Collector()
    bus: pgbus.Bus = durable_bus()
    bus.subscribe(ticket, durable="sync")(seen)
    async with bus:
        with psycopg.connect(pg_dsn) as conn:
            pgbus.sync.publish(ticket(n=1), connection=conn, durable=True, schema=schema)
            conn.rollback()
            with conn.transaction():
                sent = pgbus.sync.publish_many(
                    [ticket(n=2), ticket(n=3)], connection=conn, durable=True, schema=schema
                )
        await seen.wait_for(2)
    assert [e.n for e in seen.items] == [2, 3]
    rows = await sql.fetch(f'SELECT event_id FROM "{schema}".journal ORDER BY id')
    assert [r["event_id"] for r in rows] == sent


def test_sync_durable_publish_without_the_schema_names_migrate(pg_dsn, schema_name, channel):
    """A sync durable publish into a schema never migrated raises SchemaError."""
    ticket = ticket_type(channel)
    with psycopg.connect(pg_dsn) as conn, pytest.raises(SchemaError, match="pgbus migrate"):
        pgbus.sync.publish(ticket(n=1), connection=conn, durable=True, schema=schema_name)
