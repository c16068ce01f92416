"""Bus("memory://"): the same behaviour as on PostgreSQL, with no server at all.

The tests marked ``both_buses`` are the shared behaviour set: their ``make_bus`` builds
buses on the test server, then on an in-memory broker of their own, so the two cannot
drift apart (``tests/conftest.py``; the routing, retry, outcome, context, dead-letter,
metrics, timeout, key-order, concurrency and request modules, and the durable tests in
``tests/durable``, are marked the same way).
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from _helpers import Collector, event_on

import pgbus
from pgbus.durable import DurablePlugin, MemoryDurablePlugin


@pytest.mark.both_buses
async def test_typed_and_annotated_subscribers_get_the_event(make_bus, channel):
    """A typed and an annotation-routed subscriber both receive a published event."""
    Ping = event_on(channel)
    typed, annotated = Collector(), Collector()
    bus = make_bus()
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


@pytest.mark.both_buses
async def test_envelope_is_the_wire_format(make_bus, channel):
    """A raw subscriber sees the JSON envelope, with the id publish returned and headers."""
    Ping = event_on(channel)
    raw = Collector()
    bus = make_bus()
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


@pytest.mark.both_buses
async def test_publish_many_keeps_each_channels_order(make_bus, channel):
    """A batch across two channels arrives complete, in order within each channel."""
    Ping, Pong = event_on(channel), event_on(f"{channel}_b", "Pong")
    pings, pongs = Collector(), Collector()
    bus = make_bus()
    bus.subscribe(Ping)(pings)
    bus.subscribe(Pong)(pongs)
    async with bus:
        await bus.publish_many([Ping(n=1), Pong(n=1), Ping(n=2), Pong(n=2)])
        await pings.wait_for(2)
        await pongs.wait_for(2)
    assert [e.n for e in pings.items] == [1, 2]
    assert [e.n for e in pongs.items] == [1, 2]


@pytest.mark.both_buses
async def test_retry_then_dead_letter_with_metrics(make_bus, channel):
    """A failing handler is retried, then dead-lettered; later events flow; metrics count it."""
    Order = event_on(channel)
    handled = Collector()
    bus = make_bus()

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


@pytest.mark.both_buses
async def test_listen_and_unlisten_while_running(make_bus, channel):
    """A subscription added while running receives; after unlisten it receives no more."""
    Ping = event_on(channel)
    seen, marker = Collector(), Collector()
    bus = make_bus()
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


@pytest.mark.both_buses
async def test_too_large_is_refused_before_sending(make_bus, channel):
    """An event of 8000 bytes or more raises PayloadTooLarge on either bus."""
    Big = type("Big", (pgbus.Event,), {"__annotations__": {"s": str}}, channel=channel)
    async with make_bus() as bus:
        with pytest.raises(pgbus.PayloadTooLarge):
            await bus.publish(Big(s="x" * 8000))


@pytest.mark.both_buses
async def test_a_bare_object_decodes_and_a_malformed_payload_is_a_dead_letter(make_bus, channel):
    """The codec: a bare JSON object decodes against the channel's model; garbage is kept."""
    Ping = event_on(channel)
    got = Collector()
    bus = make_bus()
    bus.subscribe(Ping)(got)
    async with bus:
        await bus.notify(channel, "not json")
        await bus.notify(channel, '{"n": 3}')
        [event] = await got.wait_for(1)
    assert event == Ping(n=3)
    [letter] = bus.dead_letters
    assert (letter.channel, letter.payload, letter.subscription) == (channel, "not json", None)
    assert isinstance(letter.error, pgbus.DecodeError)


@pytest.mark.both_buses
async def test_a_sync_handler_runs_in_a_thread_with_its_context(make_bus, channel):
    """A plain def handler gets the event and its Context (id, headers, attempt)."""
    Ping = event_on(channel)
    seen: list[tuple[int, str | None, dict[str, str], int]] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    bus = make_bus()

    @bus.subscribe(Ping)
    def handler(event: pgbus.Event, context: pgbus.Context) -> None:
        seen.append((event.n, context.id, dict(context.headers), context.attempt))  # type: ignore[attr-defined]
        loop.call_soon_threadsafe(done.set)

    async with bus:
        event_id = await bus.publish(Ping(n=4), headers={"k": "v"})
        await asyncio.wait_for(done.wait(), 10)
    assert seen == [(4, event_id, {"k": "v"}, 1)]


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
    """connection= (also with delay= in durable mode) and the publish pool raise ConfigError."""
    Ping = event_on(channel)
    async with pgbus.Bus("memory://", load_entrypoints=False) as bus:
        with pytest.raises(pgbus.ConfigError, match="no transaction to join"):
            await bus.publish(Ping(n=1), connection=object())  # type: ignore[arg-type]
        with pytest.raises(pgbus.ConfigError, match="no publish pool"):
            await bus.pool()
    async with pgbus.Bus("memory://", durable=True, load_entrypoints=False) as bus:
        for delay in (None, 1.0):
            with pytest.raises(pgbus.ConfigError, match="no transaction to join"):
                await bus.publish(Ping(n=1), connection=object(), delay=delay)  # type: ignore[arg-type]
        with pytest.raises(pgbus.ConfigError, match="keeps its journal in the process"):
            await bus.plugins.get("durable").pool()


async def test_durable_true_takes_the_memory_plugin_and_migrate_has_nothing_to_do(channel):
    """durable=True on memory:// registers MemoryDurablePlugin as "durable"; migrate() returns."""
    bus = pgbus.Bus(f"memory://{uuid.uuid4().hex}", durable=True, load_entrypoints=False)
    assert isinstance(bus.plugins.get("durable"), MemoryDurablePlugin)
    await bus.migrate()
    got = Collector()
    bus.subscribe(event_on(channel), durable="g")(got)
    async with bus:
        assert [s.name for s in await bus.durable_subscriptions()] == ["g"]


async def test_each_durable_plugin_refuses_the_other_kind_of_bus(pg_dsn):
    """DurablePlugin on memory:// and MemoryDurablePlugin on PostgreSQL are ConfigErrors."""
    with pytest.raises(pgbus.ConfigError, match="serves a memory:// bus"):
        pgbus.Bus(pg_dsn, plugins=[MemoryDurablePlugin()], load_entrypoints=False)
    bus = pgbus.Bus("memory://", plugins=[DurablePlugin()], load_entrypoints=False)
    with pytest.raises(pgbus.ConfigError, match="DurablePlugin needs PostgreSQL"):
        await bus.start()


async def test_durable_journals_of_two_names_are_apart(channel):
    """A durable bus of memory://b replays nothing journaled on memory://a, and vice versa."""
    Ping = event_on(channel)
    name = uuid.uuid4().hex
    on_a, on_b = Collector(), Collector()
    async with pgbus.Bus(f"memory://{name}", durable=True, load_entrypoints=False) as a:
        await a.publish(Ping(n=1))
        same = pgbus.Bus(f"memory://{name}", durable=True, load_entrypoints=False)
        same.subscribe(Ping, durable="g", start="earliest")(on_a)
        other = pgbus.Bus(f"memory://{name}-b", durable=True, load_entrypoints=False)
        other.subscribe(Ping, durable="g", start="earliest")(on_b)
        async with other, same:
            await on_a.wait_for(1)
            await other.publish(Ping(n=2))
            await on_b.wait_for(1)
    assert ([e.n for e in on_a.items], [e.n for e in on_b.items]) == ([1], [2])


async def test_durable_batch_handlers_are_refused_on_memory(channel):
    """batch= on a durable subscription of a memory:// bus is a ConfigError (not built here)."""
    bus = pgbus.Bus("memory://", durable=True, load_entrypoints=False)

    async def handler(events: list[pgbus.Event]) -> None: ...

    async def subscribe_and_start() -> None:  # refused at subscribe or at start
        bus.subscribe(event_on(channel), durable="b", batch=10)(handler)
        await bus.start()

    with pytest.raises(pgbus.ConfigError, match="batch"):
        await subscribe_and_start()
    await bus.stop()


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
