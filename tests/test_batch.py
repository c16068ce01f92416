"""Batch handlers: subscribe(..., batch=N, batch_wait=s) with a list of events."""

from __future__ import annotations

import asyncio

import pytest
from _helpers import Letters, event_on

import pgbus


async def test_batch_handler_gets_lists_in_publish_order(make_bus, channel):
    """A batch handler gets full lists of up to `batch` events, in order, none lost."""
    Order = event_on(channel)
    batches: list[list[int]] = []
    done = asyncio.Event()
    bus = make_bus()

    @bus.subscribe(Order, batch=10, batch_wait=0.5)
    async def handler(events: list[pgbus.Event]) -> None:
        batches.append([e.n for e in events])  # type: ignore[attr-defined]
        if sum(map(len, batches)) == 25:
            done.set()

    async with bus:
        await bus.publish_many([Order(n=i) for i in range(25)])
        await asyncio.wait_for(done.wait(), 10)
    assert [n for b in batches for n in b] == list(range(25))
    assert [len(b) for b in batches] == [10, 10, 5]
    stats = bus.metrics.snapshot().subscriptions[handler.__qualname__]
    assert (stats.received, stats.handled) == (3, 3)  # per batch: the unit of handling


async def test_a_lone_event_is_handed_over_after_batch_wait(make_bus, channel):
    """What arrived within batch_wait is handled then, even a batch of one."""
    Order = event_on(channel)
    got: asyncio.Queue[list[pgbus.Event]] = asyncio.Queue()
    bus = make_bus()

    @bus.subscribe(Order, batch=100, batch_wait=0.01)
    async def handler(events: list[pgbus.Event]) -> None:
        got.put_nowait(events)

    async with bus:
        await bus.publish(Order(n=1))
        assert await asyncio.wait_for(got.get(), 5) == [Order(n=1)]


async def test_untyped_sync_batch_handler_gets_messages(make_bus, channel):
    """A plain-def channel subscription with batch= gets lists of pgbus.Message."""
    got: asyncio.Queue[list[str]] = asyncio.Queue()
    bus = make_bus()
    loop = asyncio.get_running_loop()

    @bus.subscribe(channel, batch=3, batch_wait=0.5)
    def handler(messages: list[pgbus.Message]) -> None:
        loop.call_soon_threadsafe(got.put_nowait, [m.payload for m in messages])

    async with bus:
        for payload in "abc":
            await bus.notify(channel, payload)
        assert await asyncio.wait_for(got.get(), 5) == ["a", "b", "c"]


async def test_a_failing_batch_is_retried_whole_then_dead_lettered_per_event(make_bus, channel):
    """A batch that keeps failing is retried as one; then each of its events is a dead letter."""
    Order = event_on(channel)
    letters = Letters()
    calls: list[list[int]] = []
    bus = make_bus(plugins=[letters])

    @bus.subscribe(
        Order, name="b", batch=3, batch_wait=0.5, retry=pgbus.Retry(attempts=2, backoff=0)
    )
    async def handler(events: list[pgbus.Event]) -> None:
        calls.append([e.n for e in events])  # type: ignore[attr-defined]
        raise RuntimeError("downstream is down")

    async with bus:
        await bus.publish_many([Order(n=i) for i in range(3)])
        dead = [await letters.next() for _ in range(3)]
    assert calls == [[0, 1, 2], [0, 1, 2]]
    assert [(d.subscription, d.attempts, str(d.error)) for d in dead] == [
        ("b", 2, "downstream is down")
    ] * 3
    assert all(f'"n":{i}' in d.payload for i, d in enumerate(dead))


async def test_a_rejected_batch_dead_letters_every_event_at_once(make_bus, channel):
    """Reject from a batch handler dead-letters each event of the batch, without retries."""
    Order = event_on(channel)
    letters = Letters()
    bus = make_bus(plugins=[letters])

    @bus.subscribe(Order, name="r", batch=2, batch_wait=0.5)
    async def handler(events: list[pgbus.Event]) -> None:
        raise pgbus.Reject("bad batch")

    async with bus:
        await bus.publish_many([Order(n=1), Order(n=2)])
        dead = [await letters.next() for _ in range(2)]
    assert [(d.attempts, type(d.error)) for d in dead] == [(1, pgbus.Reject)] * 2
    assert bus.metrics.snapshot().subscriptions["r"].rejected == 2


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"batch": 0}, "batch must be an int of at least 1"),
        ({"batch": -5}, "batch must be an int of at least 1"),
        ({"batch": True}, "batch must be an int of at least 1"),
        ({"batch": 2.5}, "batch must be an int of at least 1"),
        ({"batch": 10, "batch_wait": -1}, "batch_wait must be a finite"),
        ({"batch": 10, "batch_wait": float("nan")}, "batch_wait must be a finite"),
        ({"batch_wait": 0.1}, "batch_wait needs batch="),
        ({"batch": 10, "key": lambda e: e}, "batch= and key="),
    ],
)
def test_bad_batch_options_are_config_errors(make_bus, options, match):
    """Batch options that cannot work are refused at subscribe time."""
    bus = make_bus()

    async def handler(events: list[pgbus.Message]) -> None: ...

    with pytest.raises(pgbus.ConfigError, match=match):
        bus.subscribe("orders_batch", **options)(handler)


def test_batch_handler_must_take_a_list_and_no_context(make_bus):
    """A batch handler annotated with one event, or taking a Context, is refused."""
    bus = make_bus()
    Order = event_on("orders_batch")

    async def one(event: pgbus.Event) -> None: ...

    async def with_context(events: list[pgbus.Event], ctx: pgbus.Context) -> None: ...

    with pytest.raises(pgbus.ConfigError, match=r"annotate 'event' as list\[Event\]"):
        bus.subscribe(Order, batch=5)(one)
    with pytest.raises(pgbus.ConfigError, match=r"no pgbus\.Context"):
        bus.subscribe(Order, batch=5)(with_context)


async def test_a_nacked_batch_comes_back_whole(make_bus, channel):
    """A batch handler's Nack hands the same events again, as one batch, on the next attempt."""
    Order = event_on(channel)
    calls: list[list[int]] = []
    done = asyncio.Event()
    bus = make_bus()

    @bus.subscribe(Order, batch=3, batch_wait=0.5)
    async def handler(events: list[pgbus.Event]) -> None:
        calls.append([e.n for e in events])  # type: ignore[attr-defined]
        if len(calls) == 1:
            raise pgbus.Nack(delay=0.01)
        if sum(map(len, calls)) == 6:
            done.set()

    async with bus:
        await bus.publish_many([Order(n=i) for i in range(3)])
        await asyncio.wait_for(done.wait(), 5)
    assert calls == [[0, 1, 2], [0, 1, 2]]
