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
        ({"batch": 10, "key": 3}, "key must be callable"),
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


async def test_key_ordered_batches_keep_each_key_in_order_and_never_overlap(make_bus, channel):
    """batch= with key=: batches of many keys; no key in two running batches; keys in order."""
    Order = event_on(channel)
    running: set[int] = set()
    overlaps: list[int] = []
    by_key: dict[int, list[int]] = {}
    done = asyncio.Event()
    total = 120
    bus = make_bus()

    @bus.subscribe(Order, concurrency=4, key=lambda e: e.n % 5, batch=7, batch_wait=0.01)
    async def handler(events: list[pgbus.Event]) -> None:
        keys = {e.n % 5 for e in events}  # type: ignore[attr-defined]
        overlaps.extend(keys & running)
        running.update(keys)
        await asyncio.sleep(0.002)  # the other workers run meanwhile
        running.difference_update(keys)
        for e in events:
            by_key.setdefault(e.n % 5, []).append(e.n)  # type: ignore[attr-defined]
        if sum(map(len, by_key.values())) == total:
            done.set()

    async with bus:
        for start in range(0, total, 10):
            await bus.publish_many([Order(n=i) for i in range(start, start + 10)])
        await asyncio.wait_for(done.wait(), 20)
    assert overlaps == []
    assert by_key == {k: list(range(k, total, 5)) for k in range(5)}


async def test_key_ordered_batches_without_a_common_key_run_at_once(make_bus, channel):
    """Two batches of different keys are handled in parallel (each waits for the other here)."""
    Order = event_on(channel)
    seen = {0: asyncio.Event(), 1: asyncio.Event()}
    bus = make_bus()
    finished: asyncio.Queue[int] = asyncio.Queue()

    @bus.subscribe(Order, concurrency=2, key=lambda e: e.n // 10, batch=2, batch_wait=0.5)
    async def handler(events: list[pgbus.Event]) -> None:
        key = events[0].n // 10  # type: ignore[attr-defined]
        seen[key].set()
        await asyncio.wait_for(seen[1 - key].wait(), 5)  # deadlocks if run one at a time
        finished.put_nowait(key)

    async with bus:
        await bus.publish_many([Order(n=0), Order(n=1), Order(n=10), Order(n=11)])
        got = {await asyncio.wait_for(finished.get(), 10) for _ in range(2)}
    assert got == {0, 1}


async def test_a_key_function_raising_in_a_batch_dead_letters_only_that_event(make_bus, channel):
    """The event whose key function raises is a dead letter; the rest of its batch is handled."""
    Order = event_on(channel)
    letters = Letters()
    got: asyncio.Queue[list[int]] = asyncio.Queue()
    bus = make_bus(plugins=[letters])

    def key(event: pgbus.Event) -> int:
        if event.n == 1:  # type: ignore[attr-defined]
            raise KeyError("no customer")
        return 0

    @bus.subscribe(Order, name="k", key=key, batch=3, batch_wait=0.5)
    async def handler(events: list[pgbus.Event]) -> None:
        got.put_nowait([e.n for e in events])  # type: ignore[attr-defined]

    async with bus:
        await bus.publish_many([Order(n=0), Order(n=1), Order(n=2)])
        dead = await letters.next()
        assert await asyncio.wait_for(got.get(), 5) == [0, 2]
    assert (dead.subscription, type(dead.error)) == ("k", KeyError)
    assert '"n":1' in dead.payload
