"""Routing: by type, several types per handler, `where` predicates, a replaceable router."""

from __future__ import annotations

import asyncio

import pytest
from _helpers import OnlyOdd, logged

import pgbus

#: Shared behaviour: each test runs on the PostgreSQL bus and on a memory:// bus.
pytestmark = pytest.mark.both_buses


def models(channel: str) -> tuple[type[pgbus.Event], type[pgbus.Event]]:
    placed = type(
        "OrderPlaced",
        (pgbus.Event,),
        {"__annotations__": {"n": int, "total": float}},
        channel=channel,
    )
    cancelled = type(
        "OrderCancelled", (pgbus.Event,), {"__annotations__": {"n": int}}, channel=channel
    )
    return placed, cancelled


async def take(queue: asyncio.Queue, n: int) -> list:
    return [await asyncio.wait_for(queue.get(), 5) for _ in range(n)]


async def test_where_filters_on_payload_content(make_bus, channel):
    """A subscription with where= gets only the events its predicate accepts; others get all."""
    Placed, _ = models(channel)
    big: asyncio.Queue[int] = asyncio.Queue()
    every: asyncio.Queue[int] = asyncio.Queue()
    bus = make_bus()

    @bus.subscribe(Placed, where=lambda e: e.total > 100)
    async def big_orders(event: pgbus.Event) -> None:
        await big.put(event.n)  # type: ignore[attr-defined]

    @bus.subscribe(Placed)
    async def all_orders(event: pgbus.Event) -> None:
        await every.put(event.n)  # type: ignore[attr-defined]

    async with bus:
        totals = [5.0, 150.0, 99.0, 101.0, 100.0]
        await bus.publish_many([Placed(n=i, total=t) for i, t in enumerate(totals)])
        assert await take(every, 5) == [0, 1, 2, 3, 4]
        await bus.publish(Placed(n=99, total=1000.0))  # a marker: all earlier ones were routed
        assert await take(big, 3) == [1, 3, 99]


async def test_one_handler_subscribes_to_several_event_types(make_bus, channel):
    """subscribe(A, B) gives one handler both types, in publish order; a third type is not given."""
    Placed, Cancelled = models(channel)
    Other = type("Refunded", (pgbus.Event,), {"__annotations__": {"n": int}}, channel=channel)
    got: asyncio.Queue[pgbus.Event] = asyncio.Queue()
    bus = make_bus()

    @bus.subscribe(Placed, Cancelled)
    async def handler(event: pgbus.Event) -> None:
        await got.put(event)

    @bus.subscribe(Other)
    async def other(event: pgbus.Event) -> None:
        pass

    async with bus:
        await bus.publish_many(
            [Placed(n=1, total=1.0), Other(n=2), Cancelled(n=3), Placed(n=4, total=2.0)]
        )
        events = await take(got, 3)
    assert [(type(e).__name__, e.n) for e in events] == [  # type: ignore[attr-defined]
        ("OrderPlaced", 1),
        ("OrderCancelled", 3),
        ("OrderPlaced", 4),
    ]


async def test_one_handler_on_event_types_of_two_channels(make_bus, channel):
    """A handler subscribed to types on two channels receives the events of both."""
    Placed, _ = models(channel)
    Shipped = type(
        "Shipped", (pgbus.Event,), {"__annotations__": {"n": int}}, channel=f"{channel}_x"
    )
    got: asyncio.Queue[str] = asyncio.Queue()
    bus = make_bus()

    @bus.subscribe(Placed, Shipped)
    async def handler(event: pgbus.Event) -> None:
        await got.put(type(event).__name__)

    async with bus:
        await bus.publish(Placed(n=1, total=1.0))
        assert await asyncio.wait_for(got.get(), 5) == "OrderPlaced"
        await bus.publish(Shipped(n=2))
        assert await asyncio.wait_for(got.get(), 5) == "Shipped"
    assert set(bus.channels) == {channel, f"{channel}_x"}


async def test_where_on_an_untyped_subscription_sees_the_message(make_bus, channel):
    """On a channel subscription, where= receives the raw Message."""
    got: asyncio.Queue[str] = asyncio.Queue()
    bus = make_bus()

    @bus.subscribe(channel, where=lambda m: m.payload.startswith("keep"))
    async def handler(message: pgbus.Message) -> None:
        await got.put(message.payload)

    async with bus:
        for payload in ("keep 1", "drop 2", "keep 3"):
            await bus.notify(channel, payload)
        assert await take(got, 2) == ["keep 1", "keep 3"]


async def test_listen_accepts_where(make_bus, channel):
    """bus.listen(..., where=) filters like subscribe(..., where=)."""
    Placed, _ = models(channel)
    got: asyncio.Queue[int] = asyncio.Queue()
    bus = make_bus()

    async def handler(event: pgbus.Event) -> None:
        await got.put(event.n)  # type: ignore[attr-defined]

    async with bus:
        await bus.listen(Placed, handler, where=lambda e: e.n % 2 == 0)
        await bus.publish_many([Placed(n=i, total=0.0) for i in range(5)])
        assert await take(got, 3) == [0, 2, 4]


async def test_a_raising_predicate_is_logged_and_events_flow_on(make_bus, channel):
    """A where= that raises skips that subscription for that event, is logged, and nothing stops."""
    Placed, _ = models(channel)
    got: asyncio.Queue[int] = asyncio.Queue()
    bus = make_bus()

    def picky(event: pgbus.Event) -> bool:
        if event.n == 1:  # type: ignore[attr-defined]
            raise ZeroDivisionError("bad predicate")
        return True

    @bus.subscribe(Placed, where=picky)
    async def handler(event: pgbus.Event) -> None:
        await got.put(event.n)  # type: ignore[attr-defined]

    with logged("pgbus.default_plugins.routing") as records:
        async with bus:
            await bus.publish_many([Placed(n=i, total=0.0) for i in range(3)])
            assert await take(got, 2) == [0, 2]
    [record] = records
    assert "where= predicate raised" in record.getMessage()
    assert record.exc_info is not None


async def test_the_router_can_be_replaced(make_bus, channel):
    """A plugin implementing pgbus_router decides instead of the built-in one."""
    Placed, _ = models(channel)
    got: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

    bus = make_bus(disable_plugins=["routing"], plugins=[OnlyOdd()])

    @bus.subscribe(Placed, name="a")
    async def a(event: pgbus.Event) -> None:
        await got.put(("a", event.n))  # type: ignore[attr-defined]

    async with bus:
        await bus.publish_many([Placed(n=i, total=0.0) for i in range(4)])
        assert await take(got, 2) == [("a", 1), ("a", 3)]
