"""Start positions of new durable subscriptions, seek (replay), drop and list, also on the CLI."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from _helpers import Collector, run_cli, ticket_type

import pgbus


async def _published(durable_bus, events) -> None:
    publisher = durable_bus()
    await publisher.publish_many(events)
    await publisher.stop()


@pytest.mark.both_buses
async def test_earliest_replays_the_journal_latest_does_not(durable_bus, channel):
    """A new subscription with start="earliest" gets what was journaled before it; "latest" not."""
    ticket = ticket_type(channel)
    await _published(durable_bus, [ticket(n=0), ticket(n=1)])
    early, late = Collector(), Collector()
    bus = durable_bus()
    bus.subscribe(ticket, durable="early", name="early", start="earliest")(early)
    bus.subscribe(ticket, durable="late", name="late")(late)
    async with bus:
        await bus.publish(ticket(n=2))
        await early.wait_for(3)
        await late.wait_for(1)
    assert [e.n for e in early.items] == [0, 1, 2]
    assert [e.n for e in late.items] == [2]


@pytest.mark.both_buses
async def test_a_datetime_start_takes_the_events_from_then_on(durable_bus, sql, channel):
    """start=<aware datetime> gets the events journaled from that time on."""
    ticket = ticket_type(channel)
    await _published(durable_bus, [ticket(n=0)])
    since: dt.datetime = await sql.fetchval("SELECT now()")
    await _published(durable_bus, [ticket(n=1)])
    got = Collector()
    bus = durable_bus()
    bus.subscribe(ticket, durable="since", start=since)(got)
    async with bus:
        await got.wait_for(1)
    assert 1 in [e.n for e in got.items]


@pytest.mark.both_buses
async def test_an_existing_subscription_keeps_its_position_whatever_start_says(
    durable_bus, channel
):
    """start= only applies to a new subscription: a restart with "earliest" replays nothing."""
    ticket = ticket_type(channel)
    got = Collector()
    bus = durable_bus()
    bus.subscribe(ticket, durable="kept")(got)
    async with bus:
        await bus.publish(ticket(n=0))
        await got.wait_for(1)
    again = Collector()
    bus = durable_bus()
    bus.subscribe(ticket, durable="kept", start="earliest")(again)
    async with bus:
        await bus.publish(ticket(n=1))
        await again.wait_for(1)
    assert [e.n for e in again.items] == [1]


@pytest.mark.both_buses
async def test_seek_back_replays_and_seek_latest_skips(durable_bus, channel):
    """bus.seek(to="earliest") replays handled events; to="latest" skips the rest."""
    ticket = ticket_type(channel)
    got = Collector()
    bus = durable_bus(plugin={"poll_interval": 0.2})
    bus.subscribe(ticket, durable="replay")(got)
    async with bus:
        await bus.publish_many([ticket(n=0), ticket(n=1)])
        await got.wait_for(2)
        assert await bus.seek("replay", to="earliest") is True
        await got.wait_for(4)
        assert await bus.seek("replay", to="latest") is True
        await bus.publish(ticket(n=2))
        await got.wait_for(5)
        assert await bus.seek("nobody", to="latest") is False
    assert [e.n for e in got.items] == [0, 1, 0, 1, 2]


@pytest.mark.both_buses
async def test_list_and_drop(durable_bus, channel):
    """durable_subscriptions() lists each group; drop_subscription() deletes it once."""
    ticket = ticket_type(channel)
    bus = durable_bus()
    bus.subscribe(ticket, durable="listed")(Collector())
    async with bus:
        [listed] = await bus.durable_subscriptions()
    assert (listed.name, listed.channels, listed.backlog, listed.retries) == (
        "listed",
        (channel,),
        0,
        0,
    )
    assert listed.types == (ticket.pgbus_type,)
    assert await bus.drop_subscription("listed") is True
    assert await bus.drop_subscription("listed") is False
    assert await bus.durable_subscriptions() == []


@pytest.mark.both_buses
async def test_the_backlog_counts_events_published_while_no_consumer_runs(durable_bus, channel):
    """Events journaled while every member is down count in the backlog, with their age
    (`pgbus durable list`, the dashboard): nobody has taken them in yet."""
    ticket = ticket_type(channel)
    consumer = durable_bus()
    consumer.subscribe(ticket, durable="down")(Collector())
    async with consumer:
        pass  # registers the subscription, then its only member stops
    async with durable_bus() as publisher:
        await publisher.publish_many([ticket(n=n) for n in range(3)])
        [listed] = await publisher.durable_subscriptions()
    assert (listed.name, listed.backlog, listed.retries) == ("down", 3, 0)
    assert listed.oldest is not None
    assert dt.timedelta(0) <= dt.datetime.now(dt.UTC) - listed.oldest < dt.timedelta(minutes=1)


@pytest.mark.both_buses
@pytest.mark.parametrize("start", ["first", dt.datetime(2030, 1, 1), 0])  # noqa: DTZ001 - bad input
def test_unknown_start_values_are_config_errors(durable_bus, channel, start):
    """An unknown start, a naive datetime or another type is a ConfigError at subscribe."""
    bus = durable_bus()

    async def handler(event: Any) -> None: ...

    with pytest.raises(pgbus.ConfigError, match="'latest', 'earliest' or an aware datetime"):
        bus.subscribe(ticket_type(channel), durable="bad", start=start)(handler)


async def test_start_needs_durable_and_the_bus_methods_need_durable_mode(pg_dsn, channel):
    """start= on a plain subscription, and seek() on a plain bus, are ConfigErrors."""
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False)

    async def handler(event: Any) -> None: ...

    with pytest.raises(pgbus.ConfigError, match="start= needs a durable subscription"):
        bus.subscribe(ticket_type(channel), start="earliest")(handler)
    with pytest.raises(pgbus.ConfigError, match="needs durable mode"):
        await bus.seek("x", to="earliest")
    with pytest.raises(pgbus.ConfigError, match="needs durable mode"):
        await bus.durable_subscriptions()
    await bus.stop()


async def test_cli_lists_seeks_and_drops(durable_bus, pg_dsn, schema, channel):
    """`pgbus durable list --json`, `seek NAME --to`, `drop NAME` work; bad input exits 1."""
    ticket = ticket_type(channel)
    got = Collector()
    bus = durable_bus(plugin={"poll_interval": 0.2})
    bus.subscribe(ticket, durable="cli")(got)
    base = ("--dsn", pg_dsn, "durable", "--schema", schema)
    async with bus:
        await bus.publish(ticket(n=0))
        await got.wait_for(1)
        code, out = await run_cli(*base, "list", "--json")
        assert code == 0, out
        assert [s["name"] for s in json.loads(out)] == ["cli"]
        code, out = await run_cli(*base, "seek", "cli", "--to", "earliest")
        assert (code, out.strip()) == (0, "cli: moved to earliest")
        await got.wait_for(2)
        code, out = await run_cli(*base, "seek", "cli", "--to", "2026-01-01T00:00:00")
        assert code == 1
        assert "time zone" in out
    assert [e.n for e in got.items] == [0, 0]
    code, out = await run_cli(*base, "drop", "cli")
    assert (code, out.strip()) == (0, "cli: dropped")
    code, out = await run_cli(*base, "drop", "cli")
    assert code == 1
    assert "no durable subscription 'cli'" in out
