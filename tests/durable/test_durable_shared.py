"""Durable behaviour through the bus's API only, on PostgreSQL and on a memory:// bus.

Every test here is ``both_buses``: it runs once with the durable plugin on the test
server and once with :class:`~pgbus.durable.MemoryDurablePlugin`, so the in-memory
durable mode cannot drift from the real one. (Other durable modules mark their tests
that need no SQL of their own the same way.)
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest
from _helpers import Collector, Letters, eventually, ticket_type

import pgbus

pytestmark = pytest.mark.both_buses


async def test_a_nacked_event_leaves_the_next_to_be_handled_now(durable_bus, channel):
    """With concurrency=1, an event nacked for a minute does not hold up the one behind it."""
    ticket = ticket_type(channel)
    got = Collector()

    async def handler(event: Any) -> None:
        if event.n == 1:
            raise pgbus.Nack(delay=60)
        await got(event)

    bus = durable_bus()
    bus.subscribe(ticket, durable="behind", name="behind")(handler)
    async with bus:
        await bus.publish_many([ticket(n=1), ticket(n=2)])
        assert [e.n for e in await got.wait_for(1)] == [2]
        # the retry waiting shows in the delayed gauge (the consumer counts it at its ack)
        await eventually(lambda: bus.metrics.snapshot().subscriptions["behind"].delayed == 1)
    [sub] = await bus.durable_subscriptions()  # stopped: what was decided is acked
    assert (sub.backlog, sub.retries) == (0, 1)


async def test_nacks_count_towards_the_retry_policy_then_dead_letter(durable_bus, channel):
    """A handler that always nacks runs `attempts` times; then it is a dead letter."""
    ticket = ticket_type(channel)
    attempts: list[int] = []
    letters = Letters()

    async def handler(event: Any, context: pgbus.Context) -> None:
        attempts.append(context.attempt)
        raise pgbus.Nack(delay=0.01)

    bus = durable_bus()
    bus.plugins.register(letters)
    bus.subscribe(ticket, durable="limit", name="limit", retry=pgbus.Retry(attempts=3))(handler)
    async with bus:
        event_id = await bus.publish(ticket(n=1))
        letter = await letters.next()
    assert attempts == [1, 2, 3]
    assert (letter.attempts, letter.id, letter.subscription) == (3, event_id, "limit")
    assert isinstance(letter.error, pgbus.Nack)


async def test_reject_dead_letters_at_once_and_the_group_moves_on(durable_bus, channel):
    """Reject is one attempt and one dead letter; the next event is handled; metrics count it."""
    ticket = ticket_type(channel)
    got = Collector()

    async def handler(event: Any) -> None:
        if event.n == 1:
            raise pgbus.Reject("unknown customer")
        await got(event)

    bus = durable_bus()
    bus.subscribe(ticket, durable="rj", name="rj", retry=pgbus.Retry(attempts=5, backoff=0))(
        handler
    )
    async with bus:
        ids = await bus.publish_many([ticket(n=1), ticket(n=2)])
        await got.wait_for(1)
    [sub] = await bus.durable_subscriptions()  # stopped: what was decided is acked
    [letter] = bus.dead_letters
    assert (letter.id, letter.attempts, str(letter.error)) == (ids[0], 1, "unknown customer")
    stats = bus.metrics.snapshot().subscriptions["rj"]
    assert (stats.handled, stats.rejected, stats.dead_lettered) == (1, 1, 1)
    assert (sub.backlog, sub.retries) == (0, 0)


async def test_a_durable_handler_answers_a_request(durable_bus, channel):
    """request() is answered by a durable subscriber's return value, decoded."""
    ticket = ticket_type(channel)

    async def handler(event: Any) -> dict[str, int]:
        return {"doubled": event.n * 2}

    server = durable_bus()
    server.subscribe(ticket, durable="answers")(handler)
    client = durable_bus()
    async with server, client:
        assert await client.request(ticket(n=21), timeout=10) == {"doubled": 42}


async def test_a_group_of_three_buses_shares_the_events(durable_bus, channel):
    """Three buses with one durable name: each event handled once, by one of them."""
    ticket = ticket_type(channel)
    handled: collections.Counter[int] = collections.Counter()
    by_member: collections.Counter[str] = collections.Counter()
    all_done = asyncio.Event()
    total = 300

    def member(name: str) -> Any:
        async def handle(event: Any) -> None:
            handled[event.n] += 1
            by_member[name] += 1
            await asyncio.sleep(0)  # let the other members claim meanwhile
            if len(handled) == total:
                all_done.set()

        return handle

    buses = [durable_bus(plugin={"batch_size": 10}) for _ in range(3)]
    for i, bus in enumerate(buses):
        bus.subscribe(ticket, durable="shared")(member(f"m{i}"))
    async with buses[0], buses[1], buses[2]:
        await buses[0].publish_many([ticket(n=i) for i in range(total)])
        await asyncio.wait_for(all_done.wait(), 30)
    assert set(handled.values()) == {1}
    assert sum(by_member.values()) == total
    assert len(by_member) >= 2


async def test_a_delayed_event_waits_while_no_bus_runs(durable_bus, channel):
    """An event published for later reaches the group's bus that starts after it fell due."""
    ticket = ticket_type(channel)
    got = Collector()
    publisher = durable_bus()
    consumer = durable_bus()
    consumer.subscribe(ticket, durable="afterwards", start="earliest")(got)
    async with publisher:
        await publisher.publish(ticket(n=7), delay=0.2)
        count, _ = await publisher.plugins.get("durable").scheduled()
        assert count == 1
        async with consumer:
            [event] = await got.wait_for(1)
    assert event.n == 7


async def test_cancelling_one_event_of_a_delayed_batch_keeps_the_others(durable_bus, channel):
    """publish_many(delay=) then cancel(first): the rest of the batch still comes, in order."""
    ticket = ticket_type(channel)
    got = Collector()
    bus = durable_bus()
    bus.subscribe(ticket, durable="partly")(got)
    async with bus:
        ids = await bus.publish_many([ticket(n=1), ticket(n=2), ticket(n=3)], delay=0.2)
        assert await bus.cancel(ids[0]) is True
        await got.wait_for(2)
        assert await bus.plugins.get("durable").scheduled() == (0, None)
    assert [e.n for e in got.items] == [2, 3]
