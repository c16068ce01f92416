"""publish(connection=X) for every async driver: delivery follows X's transaction only."""

from __future__ import annotations

import contextlib
import uuid

import asyncpg
import psycopg
import pytest
from _drivers import ASYNC_DRIVERS, BlockError, open_driver
from _helpers import Collector, event_on

import pgbus
from pgbus._drivers import _pyformat


@pytest.fixture(params=ASYNC_DRIVERS)
async def tx(request, pg_dsn):
    async with open_driver(request.param, pg_dsn) as opened:
        yield opened


@pytest.fixture
async def table(pg_conn: asyncpg.Connection):
    """A table for the caller's own statements, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    await pg_conn.execute(f"CREATE TABLE {name} (n int)")
    yield name
    await pg_conn.execute(f"DROP TABLE {name}")


@pytest.fixture
def subscribed(make_bus, channel):
    """An event type on the test's channel, and a bus whose subscriber collects it."""
    Ping = event_on(channel)
    seen = Collector()
    bus = make_bus()
    bus.subscribe(Ping)(seen)
    return Ping, seen, bus


async def rows(pg_conn: asyncpg.Connection, table: str) -> list[int]:
    return [r[0] for r in await pg_conn.fetch(f"SELECT n FROM {table} ORDER BY n")]


async def test_commit_delivers_with_the_callers_statements(subscribed, tx, table, pg_conn):
    """A publish and publish_many in the caller's block arrive on commit, with its rows."""
    Ping, seen, bus = subscribed
    async with bus:
        async with tx.block():
            await tx.run(f"INSERT INTO {table} VALUES (1)")
            await bus.publish(Ping(n=1), connection=tx.target)
            await bus.publish_many([Ping(n=2), Ping(n=3)], connection=tx.target)
            assert await tx.in_transaction()  # pgbus left the transaction open
            await tx.run(f"INSERT INTO {table} VALUES (2)")
            assert await rows(pg_conn, table) == []  # nothing committed yet
        await seen.wait_for(3)
    assert [e.n for e in seen.items] == [1, 2, 3]
    assert await rows(pg_conn, table) == [1, 2]


async def test_rollback_delivers_nothing(subscribed, tx, table, pg_conn):
    """Events published in a transaction the caller rolls back never arrive."""
    Ping, seen, bus = subscribed
    async with bus:
        await tx.begin()
        await tx.run(f"INSERT INTO {table} VALUES (1)")
        await bus.publish(Ping(n=1), connection=tx.target)
        await bus.publish_many([Ping(n=2)], connection=tx.target)
        await tx.rollback()
        await bus.publish(Ping(n=3))  # a marker: anything earlier would come first
        await seen.wait_for(1)
    assert [e.n for e in seen.items] == [3]
    assert await rows(pg_conn, table) == []


async def test_exception_in_the_block_delivers_nothing(subscribed, tx, table, pg_conn):
    """An exception leaving the caller's transaction block takes the events with it."""
    Ping, seen, bus = subscribed
    async with bus:

        async def body() -> None:
            await tx.run(f"INSERT INTO {table} VALUES (1)")
            await bus.publish(Ping(n=1), connection=tx.target)

        with pytest.raises(BlockError):
            await tx.fail_in_block(body)
        await bus.publish(Ping(n=2))
        await seen.wait_for(1)
    assert [e.n for e in seen.items] == [2]
    assert await rows(pg_conn, table) == []


async def test_notify_goes_through_the_callers_connection(make_bus, tx, channel):
    """bus.notify(connection=X) sends its plain NOTIFY when X commits."""
    seen = Collector()
    bus = make_bus()
    bus.subscribe(channel)(seen)
    async with bus:
        async with tx.block():
            await bus.notify(channel, "raw", connection=tx.target)
        await seen.wait_for(1)
    assert seen.items[0].payload == "raw"


async def test_refused_statement_is_a_publish_error(make_bus, tx, channel):
    """A publish the server refuses on X (its transaction failed) raises PublishError."""
    Ping = event_on(channel)
    async with make_bus() as bus:
        await tx.begin()
        with contextlib.suppress(Exception):
            await tx.run("SELECT 1/0")
        with pytest.raises(pgbus.PublishError, match="NOTIFY failed"):
            await bus.publish(Ping(n=1), connection=tx.target)
        await tx.rollback()


async def test_unsupported_connection_is_a_config_error(make_bus, channel):
    """An object no supported driver made raises a ConfigError naming the accepted types."""
    Ping = event_on(channel)
    async with make_bus() as bus:
        with pytest.raises(pgbus.ConfigError, match="SQLAlchemy AsyncConnection or AsyncSession"):
            await bus.publish(Ping(n=1), connection=object())  # type: ignore[arg-type]


async def test_sync_connection_points_to_pgbus_sync(make_bus, pg_dsn, channel):
    """A sync connection given to the async publish says to use pgbus.sync.publish."""
    Ping = event_on(channel)
    async with make_bus() as bus:
        with (
            psycopg.connect(pg_dsn) as conn,
            pytest.raises(pgbus.ConfigError, match=r"pgbus\.sync"),
        ):
            await bus.publish(Ping(n=1), connection=conn)  # type: ignore[arg-type]


async def test_an_asyncpg_pool_still_publishes(make_bus, pg_dsn, channel):
    """An asyncpg Pool as connection= publishes at once, as before the other drivers came."""
    Ping = event_on(channel)
    seen = Collector()
    bus = make_bus()
    bus.subscribe(Ping)(seen)
    async with bus, asyncpg.create_pool(pg_dsn, min_size=1, max_size=1) as pool:
        await bus.publish(Ping(n=1), connection=pool)
        await seen.wait_for(1)


def test_placeholders_become_pyformat_in_reference_order():
    """$n placeholders turn into %s in the order they appear, and a literal % is escaped."""
    assert _pyformat("SELECT $2, '%', $1, $2") == ("SELECT %s, '%%', %s, %s", (1, 0, 1))
