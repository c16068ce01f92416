"""Bus("memory://"): the same behaviour as on PostgreSQL, with no server at all.

The tests taking ``any_bus`` are the shared behaviour set: each runs once on a bus on
the test server and once on an in-memory bus, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from _helpers import Collector, event_on

import pgbus


@pytest.fixture(params=["postgresql", "memory"])
def any_bus(request, make_bus):
    """Build buses on the test server, or on one fresh in-memory broker per test."""
    memory = f"memory://{uuid.uuid4().hex}" if request.param == "memory" else None
    return lambda **options: make_bus(memory, **options)


async def test_typed_and_annotated_subscribers_get_the_event(any_bus, channel):
    """A typed and an annotation-routed subscriber both receive a published event."""
    Ping = event_on(channel)
    typed, annotated = Collector(), Collector()
    bus = any_bus()
    bus.subscribe(Ping)(typed)

    async def on_ping(event):
        await annotated(event)

    on_ping.__annotations__ = {"event": Ping, "return": None}  # a class local to the test
    bus.subscribe(on_ping)
    async with bus:
        event_id = await bus.publish(Ping(n=1), headers={"k": "v"})
        await typed.wait_for(1)
        await annotated.wait_for(1)
    assert typed.items == annotated.items == [Ping(n=1)]
    assert isinstance(event_id, str)
    assert len(event_id) == 32


async def test_envelope_is_the_wire_format(any_bus, channel):
    """A raw subscriber sees the JSON envelope, with the id publish returned and headers."""
    Ping = event_on(channel)
    raw = Collector()
    bus = any_bus()
    bus.subscribe(channel)(raw)
    async with bus:
        event_id = await bus.publish(Ping(n=5), headers={"k": "v"})
        [message] = await raw.wait_for(1)
    envelope = json.loads(message.payload)
    assert (envelope["id"], envelope["data"], envelope["headers"]) == (
        event_id,
        {"n": 5},
        {"k": "v"},
    )


async def test_publish_many_keeps_each_channels_order(any_bus, channel):
    """A batch across two channels arrives complete, in order within each channel."""
    Ping, Pong = event_on(channel), event_on(f"{channel}_b", "Pong")
    pings, pongs = Collector(), Collector()
    bus = any_bus()
    bus.subscribe(Ping)(pings)
    bus.subscribe(Pong)(pongs)
    async with bus:
        await bus.publish_many([Ping(n=1), Pong(n=1), Ping(n=2), Pong(n=2)])
        await pings.wait_for(2)
        await pongs.wait_for(2)
    assert [e.n for e in pings.items] == [1, 2]
    assert [e.n for e in pongs.items] == [1, 2]


async def test_retry_then_dead_letter_with_metrics(any_bus, channel):
    """A failing handler is retried, then dead-lettered; later events flow; metrics count it."""
    Order = event_on(channel)
    handled = Collector()
    bus = any_bus()

    @bus.subscribe(Order, name="orders", retry=pgbus.Retry(attempts=2, backoff=0))
    async def handler(event: pgbus.Event) -> None:
        if event.n == 13:  # type: ignore[attr-defined]
            raise ValueError("poison")
        await handled(event)

    async with bus:
        ids = await bus.publish_many([Order(n=13), Order(n=2)])
        await handled.wait_for(1)
    [letter] = bus.dead_letters
    assert (letter.subscription, letter.attempts, letter.id) == ("orders", 2, ids[0])
    assert str(letter.error) == "poison"
    stats = bus.metrics.snapshot().subscriptions["orders"]
    assert (stats.handled, stats.failed, stats.retried, stats.dead_lettered) == (1, 2, 1, 1)


async def test_listen_and_unlisten_while_running(any_bus, channel):
    """A subscription added while running receives; after unlisten it receives no more."""
    Ping = event_on(channel)
    seen, marker = Collector(), Collector()
    bus = any_bus()
    bus.subscribe(f"{channel}_marker")(marker)
    async with bus:
        sub = await bus.listen(Ping, seen)
        await bus.publish(Ping(n=1))
        await seen.wait_for(1)
        await bus.unlisten(sub)
        await bus.publish(Ping(n=2))
        await bus.notify(f"{channel}_marker")
        await marker.wait_for(1)
    assert [e.n for e in seen.items] == [1]


async def test_too_large_is_refused_before_sending(any_bus, channel):
    """An event of 8000 bytes or more raises PayloadTooLarge on either bus."""
    Big = type("Big", (pgbus.Event,), {"__annotations__": {"s": str}}, channel=channel)
    async with any_bus() as bus:
        with pytest.raises(pgbus.PayloadTooLarge):
            await bus.publish(Big(s="x" * 8000))


# -- only the in-memory bus -------------------------------------------------------------


async def test_buses_of_one_name_share_a_broker_and_others_do_not(channel):
    """memory://a buses see each other's events; a memory://b bus sees none of them."""
    Ping = event_on(channel)
    name = uuid.uuid4().hex
    seen_a, seen_b = Collector(), Collector()
    sender = pgbus.Bus(f"memory://{name}", load_entrypoints=False)
    receiver = pgbus.Bus(f"memory://{name}", load_entrypoints=False)
    other = pgbus.Bus(f"memory://{name}-other", load_entrypoints=False)
    receiver.subscribe(Ping)(seen_a)
    other.subscribe(Ping)(seen_b)
    async with sender, receiver, other:
        assert receiver.ready
        await sender.publish(Ping(n=1))
        await seen_a.wait_for(1)
        await other.publish(Ping(n=2))
        await seen_b.wait_for(1)
    assert [e.n for e in seen_a.items] == [1]
    assert [e.n for e in seen_b.items] == [2]


async def test_what_needs_a_database_is_a_config_error(channel):
    """connection=, the publish pool and durable mode raise ConfigError on memory://."""
    Ping = event_on(channel)
    with pytest.raises(pgbus.ConfigError, match="durable mode needs PostgreSQL"):
        pgbus.Bus("memory://", durable=True, load_entrypoints=False)
    async with pgbus.Bus("memory://", load_entrypoints=False) as bus:
        with pytest.raises(pgbus.ConfigError, match="no transaction to join"):
            await bus.publish(Ping(n=1), connection=object())  # type: ignore[arg-type]
        with pytest.raises(pgbus.ConfigError, match="no publish pool"):
            await bus.pool()


async def test_a_memory_dsn_found_late_is_a_config_error(monkeypatch):
    """A memory:// DSN from PGBUS_DSN at start raises ConfigError, not a connection error."""
    monkeypatch.setenv("PGBUS_DSN", "memory://late")
    bus = pgbus.Bus(load_entrypoints=False)
    with pytest.raises(pgbus.ConfigError, match=r"pass the DSN to Bus\(\) itself"):
        await bus.start()


async def test_stop_ends_run_forever(channel):
    """wait_closed returns once a memory bus is stopped, as with a server."""
    bus = pgbus.Bus("memory://", load_entrypoints=False)
    await bus.start()
    waiter = asyncio.create_task(bus.wait_closed())
    await bus.stop()
    await asyncio.wait_for(waiter, 5)
