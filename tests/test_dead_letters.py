"""Dead letters: poison events and undecodable payloads are kept, reported, never lost."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest
from _helpers import Letters, event_on, logged

import pgbus
from pgbus.default_plugins.dead_letters import DeadLetters

#: Shared behaviour: each test runs on the PostgreSQL bus and on a memory:// bus.
pytestmark = pytest.mark.both_buses


async def test_poison_event_is_dead_lettered_while_later_events_flow(make_bus, channel):
    """A poison event goes to dead letters with its error; the events after it are handled."""
    Order = event_on(channel)
    handled: asyncio.Queue[int] = asyncio.Queue()
    bus = make_bus()

    @bus.subscribe(Order, name="orders", retry=pgbus.Retry(attempts=2, backoff=0))
    async def handler(event: pgbus.Event) -> None:
        if event.n == 13:  # type: ignore[attr-defined]
            raise ValueError("poison")
        await handled.put(event.n)  # type: ignore[attr-defined]

    async with bus:
        ids = await bus.publish_many([Order(n=1), Order(n=13), Order(n=2), Order(n=3)])
        got = [await asyncio.wait_for(handled.get(), 5) for _ in range(3)]
    assert got == [1, 2, 3]
    [letter] = bus.dead_letters
    assert letter.channel == channel
    assert letter.subscription == "orders"
    assert letter.attempts == 2
    assert isinstance(letter.error, ValueError)
    assert str(letter.error) == "poison"
    assert letter.id == ids[1]
    assert json.loads(letter.payload)["data"] == {"n": 13}
    assert letter.published_at is not None


async def test_undecodable_payload_is_dead_lettered_with_the_raw_payload(make_bus, channel):
    """A payload no model accepts is a dead letter (0 attempts, no subscription); events flow on."""
    Order = event_on(channel)
    handled: asyncio.Queue[int] = asyncio.Queue()
    letters = Letters()
    bus = make_bus(plugins=[letters])

    @bus.subscribe(Order)
    async def handler(event: pgbus.Event) -> None:
        await handled.put(event.n)  # type: ignore[attr-defined]

    async with bus:
        await bus.notify(channel, '{"n": "not a number"}')
        await bus.publish(Order(n=5))
        letter = await letters.next()
        assert await asyncio.wait_for(handled.get(), 5) == 5
    assert letter.payload == '{"n": "not a number"}'
    assert isinstance(letter.error, pgbus.DecodeError)
    assert (letter.subscription, letter.attempts, letter.id) == (None, 0, None)
    assert bus.dead_letters == [letter]


async def test_hook_pgbus_on_dead_letter(make_bus, channel, pg_dsn, pg_conn):
    """An async pgbus_on_dead_letter is awaited: here it persists each dead letter in a table."""
    Order = event_on(channel)
    table = f"dead_{uuid.uuid4().hex[:10]}"
    await pg_conn.execute(
        f"CREATE TABLE {table} (channel text, subscription text, payload text, error text,"
        " attempts int)"
    )
    stored = asyncio.Event()

    class Persist:
        def __init__(self) -> None:
            self.conn: asyncpg.Connection | None = None

        @pgbus.hookimpl
        async def pgbus_on_dead_letter(self, dead_letter: pgbus.DeadLetter) -> None:
            assert self.conn is not None
            await self.conn.execute(
                f"INSERT INTO {table} VALUES ($1, $2, $3, $4, $5)",
                dead_letter.channel,
                dead_letter.subscription,
                dead_letter.payload,
                repr(dead_letter.error),
                dead_letter.attempts,
            )
            stored.set()

    persist = Persist()
    persist.conn = await asyncpg.connect(pg_dsn)
    try:
        bus = make_bus(plugins=[persist])

        @bus.subscribe(Order, name="fails", retry=pgbus.Retry(attempts=1))
        async def handler(event: pgbus.Event) -> None:
            raise KeyError("missing")

        async with bus:
            await bus.publish(Order(n=9))
            await asyncio.wait_for(stored.wait(), 5)
        rows = await pg_conn.fetch(f"SELECT * FROM {table}")
    finally:
        await persist.conn.close()
        await pg_conn.execute(f"DROP TABLE {table}")
    assert [tuple(r) for r in rows] == [
        (channel, "fails", rows[0]["payload"], "KeyError('missing')", 1)
    ]
    assert json.loads(rows[0]["payload"])["data"] == {"n": 9}


async def test_dead_letters_are_logged(make_bus, channel):
    """Each dead letter is logged at warning level with the subscription and the error."""
    Order = event_on(channel)
    letters = Letters()
    bus = make_bus(plugins=[letters])

    @bus.subscribe(Order, name="logged", retry=pgbus.Retry(attempts=1))
    async def handler(event: pgbus.Event) -> None:
        raise RuntimeError("kaput")

    with logged("pgbus.default_plugins.dead_letters") as records:
        async with bus:
            await bus.publish(Order(n=1))
            await letters.next()
    assert len(records) == 1
    assert "logged" in records[0].getMessage()
    assert "kaput" in records[0].getMessage()


async def test_only_the_most_recent_dead_letters_are_kept(make_bus, channel):
    """A replacement DeadLetters(maxlen=2) keeps the last two; `total` counts them all."""
    Order = event_on(channel)
    letters = Letters()
    bus = make_bus(plugins=[letters])
    bus.plugins.unregister("dead_letters")
    bus.plugins.register(DeadLetters(maxlen=2), name="dead_letters")

    @bus.subscribe(Order, retry=pgbus.Retry(attempts=1))
    async def handler(event: pgbus.Event) -> None:
        raise RuntimeError(event.n)  # type: ignore[attr-defined]

    async with bus:
        await bus.publish_many([Order(n=i) for i in range(4)])
        for _ in range(4):
            await letters.next()
    assert [str(d.error) for d in bus.dead_letters] == ["2", "3"]
    plugin = bus.plugins.get("dead_letters")
    assert plugin.total == 4
    plugin.clear()
    assert bus.dead_letters == []


async def test_without_the_plugin_the_hook_still_gets_every_dead_letter(make_bus, channel):
    """Blocking the in-memory plugin keeps the hook: a persisting plugin still sees them."""
    Order = event_on(channel)
    letters = Letters()
    bus = make_bus(disable_plugins=["dead_letters"], plugins=[letters])

    @bus.subscribe(Order, retry=pgbus.Retry(attempts=1))
    async def handler(event: pgbus.Event) -> None:
        raise RuntimeError

    async with bus:
        await bus.publish(Order(n=1))
        letter = await letters.next()
    assert letter.attempts == 1
    with pytest.raises(pgbus.ConfigError):
        _ = bus.dead_letters


def test_dead_letters_plugin_refuses_a_bad_size():
    """DeadLetters(maxlen=0) is a ConfigError."""
    with pytest.raises(pgbus.ConfigError):
        DeadLetters(maxlen=0)
