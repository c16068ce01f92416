"""Durable batch handlers: the batch is the unit of handling, acks, retries and dead letters."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from _helpers import Letters, ticket_type

import pgbus


class Batches:
    """A batch handler that records the ``n`` of each batch's events, batch by batch."""

    def __init__(self, total: int) -> None:
        self.batches: list[list[int]] = []
        self.total = total
        self.done = asyncio.Event()

    async def __call__(self, events: list[Any]) -> None:
        self.batches.append([e.n for e in events])
        if sum(map(len, self.batches)) == self.total:
            self.done.set()

    async def wait(self, timeout: float = 20) -> list[list[int]]:
        """The batches, once they hold ``total`` events in all."""
        await asyncio.wait_for(self.done.wait(), timeout)
        return self.batches


async def test_durable_batch_handler_gets_the_journal_in_order_and_acks_it(
    durable_bus, sql, schema, channel
):
    """A durable batch handler gets lists of up to `batch` events, in journal order; all acked."""
    ticket = ticket_type(channel)
    handler = Batches(250)
    publisher = durable_bus()
    bus = durable_bus(plugin={"batch_size": 100})
    bus.subscribe(ticket, durable="bulk", name="bulk", batch=40, batch_wait=0.01)(handler)
    async with bus:
        await publisher.publish_many([ticket(n=i) for i in range(250)])
        batches = await handler.wait()
        stats = bus.metrics.snapshot().subscriptions["bulk"]
    assert [n for b in batches for n in b] == list(range(250))
    assert max(map(len, batches)) == 40
    assert stats.handled == len(batches)  # one handler call per batch
    assert await sql.fetchval(f'SELECT count(*) FROM "{schema}".batches') == 0


async def test_a_batch_larger_than_batch_size_stays_whole(durable_bus, channel):
    """batch= above the plugin's batch_size: the consumer cuts batch rows that hold a batch."""
    ticket = ticket_type(channel)
    handler = Batches(300)
    publisher = durable_bus()
    bus = durable_bus(plugin={"batch_size": 10})
    bus.subscribe(ticket, durable="big", batch=300, batch_wait=0.01)(handler)
    async with bus:
        await publisher.publish_many([ticket(n=i) for i in range(300)])
        batches = await handler.wait()
    assert batches == [list(range(300))]


async def test_durable_batch_wait_gathers_events_published_one_by_one(durable_bus, channel):
    """Events published one at a time within batch_wait of the first come as one batch."""
    ticket = ticket_type(channel)
    got: asyncio.Queue[list[int]] = asyncio.Queue()

    async def handler(events: list[Any]) -> None:
        got.put_nowait([e.n for e in events])

    publisher = durable_bus()
    bus = durable_bus()
    bus.subscribe(ticket, durable="gather", batch=10, batch_wait=2.0)(handler)
    async with bus:
        for i in range(5):
            await publisher.publish(ticket(n=i))
        assert await asyncio.wait_for(got.get(), 10) == [0, 1, 2, 3, 4]


async def test_a_nacked_durable_batch_is_persisted_whole_and_survives_a_restart(
    durable_bus, sql, schema, channel
):
    """A Nack from a durable batch handler keeps the batch as one retry row (attempt 2); a new
    bus handles the same batch, whole, after its delay; then nothing is left."""
    ticket = ticket_type(channel)
    nacked = asyncio.Event()

    async def first(events: list[Any]) -> None:
        nacked.set()
        raise pgbus.Nack(delay=0.5)

    bus = durable_bus()
    bus.subscribe(ticket, durable="later", batch=10, batch_wait=0.01)(first)
    async with bus:
        await bus.publish_many([ticket(n=i) for i in range(3)])
        await asyncio.wait_for(nacked.wait(), 10)
    rows = await sql.fetch(
        "SELECT cardinality(journal_ids) AS n, attempt, not_before IS NOT NULL AS later"
        f' FROM "{schema}".batches'
    )
    assert [tuple(r) for r in rows] == [(3, 2, True)]

    got: asyncio.Queue[list[int]] = asyncio.Queue()

    async def second(events: list[Any]) -> None:
        got.put_nowait([e.n for e in events])

    bus = durable_bus()
    bus.subscribe(ticket, durable="later", batch=10, batch_wait=0.01)(second)
    async with bus:
        assert await asyncio.wait_for(got.get(), 10) == [0, 1, 2]
    assert await sql.fetchval(f'SELECT count(*) FROM "{schema}".batches') == 0


async def test_a_durable_batch_nacked_to_its_limit_is_dead_lettered_per_event(
    durable_bus, sql, schema, channel
):
    """Persisted nack attempts of a batch count towards the retry policy; then each event of
    the batch is a dead-letter row with the attempts of the batch."""
    ticket = ticket_type(channel)
    calls: list[list[int]] = []

    async def handler(events: list[Any]) -> None:
        calls.append([e.n for e in events])
        raise pgbus.Nack(delay=0.01)

    letters = Letters()
    bus = durable_bus()
    bus.plugins.register(letters)
    bus.subscribe(ticket, durable="limit", batch=5, retry=pgbus.Retry(attempts=3))(handler)
    async with bus:
        await bus.publish_many([ticket(n=i) for i in range(2)])
        await letters.next()
        await letters.next()
    assert calls == [[0, 1]] * 3
    rows = await sql.fetch(f'SELECT attempts FROM "{schema}".dead_letters ORDER BY journal_id')
    assert [r["attempts"] for r in rows] == [3, 3]
    assert await sql.fetchval(f'SELECT count(*) FROM "{schema}".batches') == 0


async def test_a_rejected_durable_batch_dead_letters_each_event_and_moves_on(
    durable_bus, sql, schema, channel
):
    """Reject from a durable batch handler: a dead-letter row per event at once; the next
    batch is handled."""
    ticket = ticket_type(channel)
    handled = asyncio.Event()

    async def handler(events: list[Any]) -> None:
        if events[0].n == 0:
            raise pgbus.Reject("bad batch")
        handled.set()

    bus = durable_bus()
    bus.subscribe(ticket, durable="rj", batch=2, retry=pgbus.Retry(attempts=5, backoff=0))(handler)
    async with bus:
        await bus.publish_many([ticket(n=0), ticket(n=1)])
        await bus.publish(ticket(n=2))
        await asyncio.wait_for(handled.wait(), 10)
    rows = await sql.fetch(
        f'SELECT attempts, error FROM "{schema}".dead_letters ORDER BY journal_id'
    )
    assert [(r["attempts"], "bad batch" in r["error"]) for r in rows] == [(1, True)] * 2
    assert await sql.fetchval(f'SELECT count(*) FROM "{schema}".batches') == 0


async def test_a_failing_durable_batch_is_retried_whole_then_dead_lettered(
    durable_bus, sql, schema, channel
):
    """An exception from a durable batch handler retries the batch whole, then dead-letters it."""
    ticket = ticket_type(channel)
    calls: list[list[int]] = []
    letters = Letters()

    async def handler(events: list[Any]) -> None:
        calls.append([e.n for e in events])
        raise RuntimeError("downstream is down")

    bus = durable_bus()
    bus.plugins.register(letters)
    bus.subscribe(ticket, durable="f", batch=3, retry=pgbus.Retry(attempts=2, backoff=0))(handler)
    async with bus:
        await bus.publish_many([ticket(n=i) for i in range(3)])
        dead = [await letters.next() for _ in range(3)]
    assert calls == [[0, 1, 2]] * 2
    assert [d.attempts for d in dead] == [2, 2, 2]
    assert await sql.fetchval(f'SELECT count(*) FROM "{schema}".dead_letters') == 3


async def test_two_durable_batch_members_share_the_work(durable_bus, channel):
    """A consumer group of batch handlers: each event handled by exactly one member, in order
    within each member's share."""
    ticket = ticket_type(channel)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    done = asyncio.Event()
    total = 1000

    def handler(member: str) -> Any:
        async def handle(events: list[Any]) -> None:
            seen[member].extend(e.n for e in events)
            await asyncio.sleep(0.001)
            if len(seen["a"]) + len(seen["b"]) >= total:
                done.set()

        return handle

    buses = [durable_bus(plugin={"batch_size": 10}) for _ in "ab"]
    for bus, member in zip(buses, "ab", strict=True):
        bus.subscribe(ticket, durable="pair", batch=10, batch_wait=0)(handler(member))
    async with buses[0], buses[1]:
        for start in range(0, total, 50):
            await buses[0].publish_many([ticket(n=i) for i in range(start, start + 50)])
        await asyncio.wait_for(done.wait(), 30)
    assert sorted(seen["a"] + seen["b"]) == list(range(total))
    assert seen["a"] == sorted(seen["a"])
    assert seen["b"] == sorted(seen["b"])


async def test_a_durable_batch_stopped_midway_is_handed_back_whole(durable_bus, channel):
    """A batch still running when its bus stops is handed back and handled whole by the next."""
    ticket = ticket_type(channel)
    started = asyncio.Event()

    async def stuck(events: list[Any]) -> None:
        started.set()
        await asyncio.Event().wait()

    bus = durable_bus(stop_timeout=0.5)
    bus.subscribe(ticket, durable="resume", batch=10)(stuck)
    async with bus:
        await bus.publish_many([ticket(n=i) for i in range(4)])
        await asyncio.wait_for(started.wait(), 10)
    got: asyncio.Queue[list[int]] = asyncio.Queue()

    async def handler(events: list[Any]) -> None:
        got.put_nowait([e.n for e in events])

    bus = durable_bus()
    bus.subscribe(ticket, durable="resume", batch=10)(handler)
    async with bus:
        # handed back once: split as a redelivery (its first event alone, then the rest)
        assert await asyncio.wait_for(got.get(), 10) == [0]
        assert await asyncio.wait_for(got.get(), 10) == [1, 2, 3]


async def test_a_key_ordered_durable_batch_group_keeps_keys_in_order(durable_bus, channel):
    """Durable batch handlers with key= in a group: no key in two running batches, keys in order."""
    ticket = ticket_type(channel)
    total = 300
    running: set[int] = set()
    overlaps: list[int] = []
    by_key: dict[int, list[int]] = collections.defaultdict(list)
    done = asyncio.Event()

    async def handle(events: list[Any]) -> None:
        keys = {e.n % 3 for e in events}
        overlaps.extend(keys & running)
        running.update(keys)
        await asyncio.sleep(0.001)  # the other member and workers run meanwhile
        running.difference_update(keys)
        for e in events:
            by_key[e.n % 3].append(e.n)
        if sum(map(len, by_key.values())) >= total:
            done.set()

    buses = [durable_bus(plugin={"batch_size": 20, "poll_interval": 0.2}) for _ in "ab"]
    for bus in buses:
        bus.subscribe(ticket, durable="kb", concurrency=4, key=lambda e: e.n % 3, batch=4)(handle)
    async with buses[0], buses[1]:
        for start in range(0, total, 50):
            await buses[0].publish_many([ticket(n=i) for i in range(start, start + 50)])
        await asyncio.wait_for(done.wait(), 30)
    assert overlaps == []
    assert dict(by_key) == {k: list(range(k, total, 3)) for k in range(3)}
