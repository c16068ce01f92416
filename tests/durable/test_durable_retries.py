"""Durable nacks: retries persisted in the database, due at their time, never blocking."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import pytest
from _helpers import Letters, ticket_type

import pgbus
import pgbus.durable._schema
from pgbus.durable import SCHEMA_VERSION, DurablePlugin, migrate

if TYPE_CHECKING:
    import asyncpg


@pytest.mark.both_buses
async def test_nacked_retry_survives_a_bus_restart_and_comes_at_its_time(durable_bus, channel):
    """A retry nacked before a restart is handled after it, not before its delay, as attempt 2."""
    ticket = ticket_type(channel)
    nacked = asyncio.Event()
    nacked_at = 0.0

    async def first(event: Any) -> None:
        nonlocal nacked_at
        nacked_at = time.monotonic()
        nacked.set()
        raise pgbus.Nack(delay=1.0)

    bus = durable_bus()
    bus.subscribe(ticket, durable="later")(first)
    async with bus:
        await bus.publish(ticket(n=1))
        await asyncio.wait_for(nacked.wait(), 10)
    [sub] = await bus.durable_subscriptions()  # stopped: what was decided is acked
    assert (sub.backlog, sub.retries) == (0, 1)  # a retry not yet due

    seen: list[tuple[int, bool, float]] = []
    done = asyncio.Event()

    async def second(event: Any, context: pgbus.Context) -> None:
        seen.append((context.attempt, context.redelivered, time.monotonic() - nacked_at))
        done.set()

    bus = durable_bus()  # a new bus, so nothing of the first one's memory is left
    bus.subscribe(ticket, durable="later")(second)
    async with bus:
        await asyncio.wait_for(done.wait(), 10)  # the poll is 60 s: the due time wakes it
    [(attempt, redelivered, after)] = seen
    assert (attempt, redelivered) == (2, True)
    assert after >= 1.0
    [sub] = await bus.durable_subscriptions()
    assert (sub.backlog, sub.retries) == (0, 0)


async def test_a_durable_retry_does_not_hold_up_the_events_behind_it(
    durable_bus, sql, schema, channel
):
    """With concurrency=1, an event nacked for a minute leaves the next one to be handled now."""
    ticket = ticket_type(channel)
    handled = asyncio.Event()

    async def handler(event: Any) -> None:
        if event.n == 1:
            raise pgbus.Nack(delay=60)
        handled.set()

    bus = durable_bus()
    bus.subscribe(ticket, durable="behind")(handler)
    async with bus:
        await bus.publish_many([ticket(n=1), ticket(n=2)])
        await asyncio.wait_for(handled.wait(), 10)
    waiting = await sql.fetchval(f'SELECT count(*) FROM "{schema}".batches WHERE attempt = 2')
    assert waiting == 1


async def test_persisted_attempts_count_towards_the_retry_policy(durable_bus, sql, schema, channel):
    """Persisted nack attempts reach the policy's limit: a dead letter of 3 attempts."""
    ticket = ticket_type(channel)
    attempts: list[int] = []

    async def handler(event: Any, context: pgbus.Context) -> None:
        attempts.append(context.attempt)
        raise pgbus.Nack(delay=0.01)

    letters = Letters()
    bus = durable_bus()
    bus.plugins.register(letters)
    bus.subscribe(ticket, durable="limit", retry=pgbus.Retry(attempts=3))(handler)
    async with bus:
        await bus.publish(ticket(n=1))
        letter = await letters.next()
    assert attempts == [1, 2, 3]
    assert letter.attempts == 3
    assert await sql.fetchval(f'SELECT attempts FROM "{schema}".dead_letters') == 3


async def test_v2_batches_survive_the_upgrade_to_persisted_retries(
    pg_dsn: str, schema_name: str, sql: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
):
    """A batch a v2 schema held is handled once, as a first attempt, after `migrate` to v3."""
    ticket = ticket_type(schema_name)
    s = f'"{schema_name}"'
    with monkeypatch.context() as m:  # this pgbus as it was at v2
        m.setattr(pgbus.durable._schema, "MIGRATIONS", pgbus.durable._schema.MIGRATIONS[:2])
        m.setattr(pgbus.durable._schema, "SCHEMA_VERSION", 2)
        assert await migrate(sql, schema_name) == (0, 2)
    try:
        await sql.execute(
            f"INSERT INTO {s}.subscriptions (name, channels, types, snap)"
            " VALUES ('old', $1, NULL, pg_current_snapshot())",
            [schema_name],
        )
        publisher = pgbus.Bus(
            pg_dsn,
            load_entrypoints=False,
            plugins=[DurablePlugin(schema_name, prune_interval=None)],
        )
        await publisher.publish(ticket(n=7))
        await publisher.stop()
        await sql.execute(  # what a v2 pump did: the row into a batch, the position past it
            f"INSERT INTO {s}.batches (subscription, journal_ids)"
            f" SELECT 'old', array_agg(id) FROM {s}.journal;"
            f" UPDATE {s}.subscriptions SET snap = pg_current_snapshot()"
        )
        assert await migrate(sql, schema_name) == (2, SCHEMA_VERSION)

        seen: list[tuple[int, int, bool]] = []
        done = asyncio.Event()

        async def handler(event: Any, context: pgbus.Context) -> None:
            seen.append((event.n, context.attempt, context.redelivered))
            done.set()

        bus = pgbus.Bus(
            pg_dsn,
            load_entrypoints=False,
            stop_timeout=5.0,
            plugins=[DurablePlugin(schema_name, poll_interval=60.0, prune_interval=None)],
        )
        bus.subscribe(ticket, durable="old")(handler)
        async with bus:
            await asyncio.wait_for(done.wait(), 10)
        assert seen == [(7, 1, False)]
    finally:
        await sql.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
