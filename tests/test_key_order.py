"""Key-ordered concurrency: subscribe(..., concurrency=N, key=...)."""

from __future__ import annotations

import asyncio
import random

import pytest
from _helpers import Letters

import pgbus

#: Shared behaviour: each test runs on the PostgreSQL bus and on a memory:// bus.
pytestmark = pytest.mark.both_buses


def keyed_type(channel: str) -> type[pgbus.Event]:
    """A fresh event type with a key ``k`` and a sequence number ``n``."""

    class Keyed(pgbus.Event, channel=channel):
        k: str
        n: int

    return Keyed


async def test_equal_keys_wait_while_other_keys_go_on(make_bus, channel):
    """A slow event holds up only the later events of its key; another key is handled meanwhile."""
    Keyed = keyed_type(channel)
    release_a1 = asyncio.Event()
    b_done, a2_done = asyncio.Event(), asyncio.Event()
    order: list[tuple[str, int]] = []
    bus = make_bus()

    @bus.subscribe(Keyed, concurrency=4, key=lambda e: e.k)
    async def handler(event: pgbus.Event) -> None:
        order.append((event.k, event.n))  # type: ignore[attr-defined]
        if (event.k, event.n) == ("a", 1):  # type: ignore[attr-defined]
            await asyncio.wait_for(release_a1.wait(), 5)
        if event.k == "b":  # type: ignore[attr-defined]
            b_done.set()
        if event.n == 2:  # type: ignore[attr-defined]
            a2_done.set()

    async with bus:
        await bus.publish_many([Keyed(k="a", n=1), Keyed(k="a", n=2), Keyed(k="b", n=1)])
        await asyncio.wait_for(b_done.wait(), 5)  # b went on while a1 is still running
        assert order == [("a", 1), ("b", 1)]  # a2 waits behind a1, not on a worker
        assert bus.metrics.snapshot().subscriptions[handler.__qualname__].pending == 1
        release_a1.set()
        await asyncio.wait_for(a2_done.wait(), 5)
    assert order == [("a", 1), ("b", 1), ("a", 2)]


async def test_each_key_is_handled_in_publish_order_one_at_a_time(make_bus, channel):
    """Under load with uneven handler times, every key keeps its order and never overlaps."""
    Keyed = keyed_type(channel)
    seen: dict[str, list[int]] = {}
    running: set[str] = set()
    overlaps: list[str] = []
    most = 0
    done = asyncio.Event()
    rng = random.Random(15)
    total = 200
    bus = make_bus()

    @bus.subscribe(Keyed, concurrency=8, key=lambda e: e.k, max_pending=5)
    async def handler(event: pgbus.Event) -> None:
        nonlocal most
        key = event.k  # type: ignore[attr-defined]
        if key in running:
            overlaps.append(key)
        running.add(key)
        most = max(most, len(running))
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
        running.discard(key)
        seen.setdefault(key, []).append(event.n)  # type: ignore[attr-defined]
        if sum(map(len, seen.values())) == total:
            done.set()

    events = [Keyed(k=f"k{i % 5}", n=i) for i in range(total)]
    async with bus:
        await bus.publish_many(events)
        await asyncio.wait_for(done.wait(), 20)
    assert overlaps == []
    assert most > 1  # different keys did run in parallel
    for key, ns in seen.items():
        assert ns == sorted(ns), key
    assert sorted(n for ns in seen.values() for n in ns) == list(range(total))


async def test_a_failing_key_function_dead_letters_the_event(make_bus, channel):
    """An event whose key function raises is a dead letter; the events after it go on."""
    Keyed = keyed_type(channel)
    letters = Letters()
    handled: asyncio.Queue[int] = asyncio.Queue()
    bus = make_bus(plugins=[letters])

    def key(event: pgbus.Event) -> object:
        if event.n == 1:  # type: ignore[attr-defined]
            raise LookupError("no customer")
        return [] if event.n == 2 else event.k  # type: ignore[attr-defined]  # [] is unhashable

    @bus.subscribe(Keyed, name="keyed", concurrency=2, key=key)
    async def handler(event: pgbus.Event) -> None:
        handled.put_nowait(event.n)  # type: ignore[attr-defined]

    async with bus:
        await bus.publish_many([Keyed(k="a", n=n) for n in (1, 2, 3)])
        first, second = await letters.next(), await letters.next()
        assert await asyncio.wait_for(handled.get(), 5) == 3
    assert isinstance(first.error, LookupError)
    assert isinstance(second.error, TypeError)
    assert (first.subscription, first.attempts) == ("keyed", 1)
    assert bus.metrics.snapshot().subscriptions["keyed"].dead_lettered == 2


async def test_untyped_subscription_keys_on_the_message(make_bus, channel):
    """A channel subscription's key function is given the raw message."""
    got: asyncio.Queue[str] = asyncio.Queue()
    bus = make_bus()

    @bus.subscribe(channel, concurrency=2, key=lambda m: m.payload[0])
    async def handler(message: pgbus.Message) -> None:
        got.put_nowait(message.payload)

    async with bus:
        for payload in ("a1", "b1", "a2"):
            await bus.notify(channel, payload)
        received = [await asyncio.wait_for(got.get(), 5) for _ in range(3)]
    assert [p for p in received if p[0] == "a"] == ["a1", "a2"]


def test_key_must_be_callable(make_bus):
    """A key that is not callable is a ConfigError at subscribe time."""
    bus = make_bus()
    with pytest.raises(pgbus.ConfigError, match="key must be callable"):
        bus.subscribe("orders_keyed", key="customer_id")(lambda message: None)


async def test_a_nack_holds_its_key_but_not_the_other_keys(make_bus, channel):
    """A nacked event of a key-ordered subscription is retried before its key's next event."""
    Keyed = keyed_type(channel)
    order: list[tuple[str, int, int]] = []
    done = asyncio.Event()
    bus = make_bus()

    @bus.subscribe(Keyed, concurrency=2, key=lambda e: e.k)
    async def handler(event: pgbus.Event, context: pgbus.Context) -> None:
        order.append((event.k, event.n, context.attempt))  # type: ignore[attr-defined]
        if (event.n, context.attempt) == (1, 1):  # type: ignore[attr-defined]
            raise pgbus.Nack(delay=0.05)
        if len(order) == 4:
            done.set()

    async with bus:
        await bus.publish_many([Keyed(k="a", n=1), Keyed(k="a", n=2), Keyed(k="b", n=3)])
        await asyncio.wait_for(done.wait(), 5)
    assert [o for o in order if o[0] == "a"] == [("a", 1, 1), ("a", 1, 2), ("a", 2, 1)]
    assert order.index(("b", 3, 1)) < order.index(("a", 1, 2))  # b did not wait for a's delay
