"""The handler context: a parameter annotated pgbus.Context, and the signature check."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest
from _helpers import event_on

import pgbus

#: Shared behaviour: each test runs on the PostgreSQL bus and on a memory:// bus.
pytestmark = pytest.mark.both_buses


NO_DELAY = pgbus.Retry(attempts=3, backoff=0)


async def test_typed_async_handler_gets_the_context_of_its_delivery(make_bus, channel):
    """A typed async handler's Context carries the event's id, type, headers and publish time."""
    Order = event_on(channel, "Order")
    got: asyncio.Queue[tuple[pgbus.Event, pgbus.Context]] = asyncio.Queue()
    bus = make_bus()

    @bus.subscribe(Order, name="orders")
    async def handler(event: pgbus.Event, context: pgbus.Context) -> None:
        got.put_nowait((event, context))

    async with bus:
        before = time.time()
        event_id = await bus.publish(Order(n=1), headers={"trace": "abc"})
        event, context = await asyncio.wait_for(got.get(), 5)
    assert event == Order(n=1)
    assert context.id == event_id
    assert (context.type, context.channel, dict(context.headers)) == (
        "Order",
        channel,
        {"trace": "abc"},
    )
    assert context.published_at.tzinfo is not None
    assert abs(context.published_at.timestamp() - before) < 5
    assert (context.attempt, context.redelivered, context.subscription) == (1, False, "orders")


async def test_untyped_handler_gets_the_envelope_fields_in_its_context(make_bus, channel):
    """A channel subscription's Context has the id, type and headers of the pgbus envelope."""
    Order = event_on(channel, "Order")
    got: asyncio.Queue[tuple[pgbus.Message, pgbus.Context]] = asyncio.Queue()
    bus = make_bus()

    @bus.subscribe(channel, name="raw")
    async def raw(message: pgbus.Message, context: pgbus.Context) -> None:
        got.put_nowait((message, context))

    async with bus:
        await bus.publish(Order(n=2), headers={"k": "v"})
        await bus.notify(channel, "plain text")
        (message, context), (bare, bare_context) = [
            await asyncio.wait_for(got.get(), 5) for _ in range(2)
        ]
    assert f'"id":"{context.id}"' in message.payload
    assert (context.type, dict(context.headers), context.subscription) == (
        "Order",
        {"k": "v"},
        "raw",
    )
    assert bare.payload == "plain text"
    assert (bare_context.id, bare_context.type, dict(bare_context.headers)) == (None, None, {})
    assert bare_context.published_at == dt.datetime.fromtimestamp(bare.received_at, dt.UTC)


async def test_sync_handler_gets_the_context_by_keyword(make_bus, channel):
    """A plain-def handler with a keyword-only Context parameter is given the context."""
    Order = event_on(channel)
    got: asyncio.Queue[pgbus.Context] = asyncio.Queue()
    bus = make_bus()
    loop = asyncio.get_running_loop()

    @bus.subscribe(Order)
    def handler(event: pgbus.Event, *, ctx: pgbus.Context, extra: int = 0) -> None:
        loop.call_soon_threadsafe(got.put_nowait, ctx)

    async with bus:
        await bus.publish(Order(n=3))
        context = await asyncio.wait_for(got.get(), 5)
    assert (context.attempt, context.channel) == (1, channel)


async def test_positional_only_context_after_the_event_is_filled(make_bus, channel):
    """A positional-only Context parameter right after the event is passed positionally."""
    Order = event_on(channel)
    got: asyncio.Queue[pgbus.Context] = asyncio.Queue()
    bus = make_bus()

    async def handler(event: pgbus.Event, ctx: pgbus.Context, /) -> None:
        got.put_nowait(ctx)

    bus.subscribe(Order)(handler)
    async with bus:
        await bus.publish(Order(n=4))
        context = await asyncio.wait_for(got.get(), 5)
    assert context.type == "Ping"


async def test_context_counts_the_attempts_of_a_retried_delivery(make_bus, channel):
    """Each retry of a failing handler sees the next attempt number, marked redelivered."""
    Order = event_on(channel)
    seen: list[tuple[int, bool]] = []
    done = asyncio.Event()
    bus = make_bus()

    @bus.subscribe(Order, retry=NO_DELAY)
    async def handler(event: pgbus.Event, context: pgbus.Context) -> None:
        seen.append((context.attempt, context.redelivered))
        if context.attempt < 3:
            raise RuntimeError("not yet")
        done.set()

    async with bus:
        await bus.publish(Order(n=5))
        await asyncio.wait_for(done.wait(), 5)
    assert seen == [(1, False), (2, True), (3, True)]


def test_subscribe_refuses_a_parameter_it_cannot_fill(make_bus):
    """subscribe() raises a ConfigError naming a handler parameter pgbus cannot fill."""
    bus = make_bus()
    Order = event_on("orders_ctx")

    async def handler(event: pgbus.Event, delivery: pgbus.Delivery) -> None: ...

    with pytest.raises(pgbus.ConfigError, match=r"parameter 'delivery' \(annotated Delivery\)"):
        bus.subscribe(Order)(handler)
    assert bus.subscriptions == ()


def test_subscribe_refuses_a_handler_without_a_parameter_for_the_event(make_bus):
    """A handler that takes nothing positional cannot be given the event: a ConfigError."""
    bus = make_bus()

    async def nothing() -> None: ...

    async def keyword_only(*, event: pgbus.Event) -> None: ...

    for handler in (nothing, keyword_only):
        with pytest.raises(pgbus.ConfigError, match="first positional parameter"):
            bus.subscribe("orders_ctx")(handler)


def test_subscribe_refuses_two_context_parameters(make_bus):
    """A handler with two Context parameters is refused, both named."""
    bus = make_bus()

    async def handler(event: pgbus.Event, a: pgbus.Context, b: pgbus.Context) -> None: ...

    with pytest.raises(pgbus.ConfigError, match="'a' and 'b'"):
        bus.subscribe("orders_ctx")(handler)


async def test_listen_checks_the_signature_too(make_bus, channel):
    """listen() on a running bus refuses an unfillable parameter before it LISTENs."""
    bus = make_bus()

    async def handler(message: pgbus.Message, other: int) -> None: ...

    async with bus:
        with pytest.raises(pgbus.ConfigError, match="'other'"):
            await bus.listen(channel, handler)
        assert bus.subscriptions == ()
