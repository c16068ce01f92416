"""Delayed delivery: publish(delay=/at=) in durable mode, cancel(), and bad input."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import pytest
from _helpers import Collector, ticket_type

import pgbus


@pytest.mark.both_buses
async def test_a_delayed_event_is_handled_no_earlier_than_its_delay(durable_bus, channel):
    """publish(delay=0.5) returns the id at once; the handler gets the event after 0.5 s."""
    ticket = ticket_type(channel)
    got: list[tuple[str | None, float]] = []
    done = asyncio.Event()

    async def handler(event: Any, context: pgbus.Context) -> None:
        got.append((context.id, time.monotonic()))
        done.set()

    bus = durable_bus()
    bus.subscribe(ticket, durable="later")(handler)
    async with bus:
        start = time.monotonic()
        event_id = await bus.publish(ticket(n=1), delay=0.5)
        await asyncio.wait_for(done.wait(), 10)
    [(handled_id, handled_at)] = got
    assert handled_id == event_id
    assert handled_at - start >= 0.5


@pytest.mark.both_buses
async def test_a_delayed_event_goes_to_the_subscriptions_that_exist_when_it_is_due(
    durable_bus, channel
):
    """A durable subscription made after the publish, before the due time, gets the event."""
    ticket = ticket_type(channel)
    publisher = durable_bus()
    async with publisher:
        await publisher.publish(ticket(n=7), at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1))
    got = Collector()
    bus = durable_bus()  # a new process: its scheduler finds the event at start
    bus.subscribe(ticket, durable="newcomer")(got)
    async with bus:
        await got.wait_for(1, timeout=10)
    assert [e.n for e in got.items] == [7]


@pytest.mark.both_buses
async def test_cancel_removes_an_event_not_yet_due(durable_bus, channel):
    """cancel() of a pending event returns True and it is never handled; again it is False."""
    ticket = ticket_type(channel)
    got = Collector()
    bus = durable_bus()
    bus.subscribe(ticket, durable="cancelled")(got)
    async with bus:
        doomed = await bus.publish(ticket(n=1), delay=60)
        count, due = await bus.plugins.get("durable").scheduled()
        assert count == 1
        assert 55 < due <= 60
        kept = await bus.publish_many([ticket(n=2)], delay=0.1)
        assert await bus.cancel(doomed) is True
        assert await bus.cancel(doomed) is False
        await got.wait_for(1, timeout=10)
        assert await bus.cancel(kept[0]) is False  # due and delivered already
        assert await bus.plugins.get("durable").scheduled() == (0, None)  # none kept
    assert [e.n for e in got.items] == [2]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delay": -1}, "non-negative"),
        ({"at": dt.datetime(2030, 1, 1)}, "aware datetime"),  # noqa: DTZ001 - the bad input
        ({"delay": 1, "at": dt.datetime.now(dt.UTC)}, "not both"),
    ],
)
@pytest.mark.both_buses
async def test_bad_delays_are_config_errors(durable_bus, channel, options, message):
    """A negative delay, a naive datetime or both arguments are a ConfigError, nothing sent."""
    bus = durable_bus()
    with pytest.raises(pgbus.ConfigError, match=message):
        await bus.publish(ticket_type(channel)(n=1), **options)


async def test_plain_mode_refuses_delayed_delivery_and_cancel(pg_dsn, channel):
    """Without the durable plugin, delay=, at= and cancel() say durable mode is needed."""
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False)
    ticket = ticket_type(channel)
    with pytest.raises(pgbus.ConfigError, match="needs durable mode"):
        await bus.publish(ticket(n=1), delay=1)
    with pytest.raises(pgbus.ConfigError, match="needs durable mode"):
        await bus.publish_many([ticket(n=1)], at=dt.datetime.now(dt.UTC))
    with pytest.raises(pgbus.ConfigError, match="needs durable mode"):
        await bus.cancel("nope")
    await bus.stop()


async def test_a_delayed_publish_joins_the_callers_transaction(durable_bus, sql, schema, channel):
    """publish(delay=, connection=conn) keeps the event only if the transaction commits."""
    ticket = ticket_type(channel)
    got = Collector()
    bus = durable_bus(plugin={"poll_interval": 0.2})
    bus.subscribe(ticket, durable="tx")(got)
    async with bus:
        tx = sql.transaction()
        await tx.start()
        await bus.publish(ticket(n=1), delay=0.1, connection=sql)
        await tx.rollback()
        assert await sql.fetchval(f'SELECT count(*) FROM "{schema}".scheduled') == 0
        async with sql.transaction():
            await bus.publish(ticket(n=2), delay=0.1, connection=sql)
        await got.wait_for(1, timeout=10)
    assert [e.n for e in got.items] == [2]
