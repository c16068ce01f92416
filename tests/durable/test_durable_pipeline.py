"""Pipelining: a plain durable subscription claims its next batch while it handles one."""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any

from _helpers import eventually, ticket_type

if TYPE_CHECKING:
    import pgbus


async def test_stop_hands_back_the_batch_claimed_ahead(durable_bus, channel: str):
    """stop() while the next batch is claimed ahead: it goes to the other member at once."""
    ticket = ticket_type(channel)
    handled: dict[str, list[int]] = {"a": [], "b": []}
    gate = asyncio.Event()
    total = 20

    async def handle_a(event: Any) -> None:
        if event.n == 0:
            await gate.wait()
        handled["a"].append(event.n)

    async def handle_b(event: Any) -> None:
        handled["b"].append(event.n)

    settings = {"batch_size": 5, "lease": 30.0}  # a lease far beyond the test's waits
    a: pgbus.Bus = durable_bus(plugin=settings)
    a.subscribe(ticket, durable="ahead")(handle_a)
    await a.start()
    await a.publish_many([ticket(n=i) for i in range(total)])
    consumer = a.plugins.get("durable").consumers["ahead"]
    await eventually(lambda: consumer._next is not None and consumer._next[2])
    stopping = asyncio.create_task(a.stop())
    await asyncio.sleep(0.05)
    gate.set()
    await stopping
    assert handled["a"] == list(range(5))  # the batch in hand is finished, nothing more
    b: pgbus.Bus = durable_bus(plugin=settings)
    b.subscribe(ticket, durable="ahead")(handle_b)
    async with b:
        await eventually(lambda: len(handled["b"]) >= total - 5)
        await asyncio.sleep(0.1)
    assert handled["b"] == list(range(5, total))  # in order, none twice, none lost


async def test_lease_of_the_batch_claimed_ahead_is_renewed(durable_bus, channel: str):
    """A slow batch keeps the claim on the one claimed ahead: no event handled twice."""
    ticket = ticket_type(channel)
    handled: collections.Counter[int] = collections.Counter()
    settings = {"batch_size": 1, "lease": 0.3, "poll_interval": 0.05}
    slow_done = asyncio.Event()

    async def handle(event: Any) -> None:
        handled[event.n] += 1
        if event.n == 0:
            await asyncio.sleep(1.5)  # five leases
            slow_done.set()

    a: pgbus.Bus = durable_bus(plugin=settings)
    b: pgbus.Bus = durable_bus(plugin=settings)
    a.subscribe(ticket, durable="renew")(handle)
    async with a:
        await a.publish_many([ticket(n=i) for i in range(3)])
        await eventually(lambda: handled[0] == 1)
        b.subscribe(ticket, durable="renew")(handle)
        async with b:
            await asyncio.wait_for(slow_done.wait(), 10)
            await eventually(lambda: len(handled) == 3)
            await asyncio.sleep(0.3)  # a handles what it claimed ahead now
    assert handled == {0: 1, 1: 1, 2: 1}


async def test_acks_of_the_last_batch_reach_the_server(durable_bus, sql, schema, channel: str):
    """When the flow stops, the last batch is acked without waiting for the next wake-up."""
    ticket = ticket_type(channel)
    handled: list[int] = []

    async def handle(event: Any) -> None:
        handled.append(event.n)

    a: pgbus.Bus = durable_bus(plugin={"batch_size": 3})
    a.subscribe(ticket, durable="flush")(handle)
    async with a:
        await a.publish_many([ticket(n=i) for i in range(10)])
        await eventually(lambda: len(handled) == 10)

        async def left() -> int:
            query = f'SELECT count(*) FROM "{schema}".batches WHERE subscription = $1'
            return int(await sql.fetchval(query, "flush"))

        for _ in range(500):
            if await left() == 0:
                break
            await asyncio.sleep(0.01)
        assert await left() == 0
    assert handled == list(range(10))


async def test_a_failed_claim_ahead_is_raised_after_the_batch_in_hand(durable_bus, channel: str):
    """The claim made ahead fails: the batch in hand is still finished and acked, the
    consumer backs off and goes on; every event handled once."""
    ticket = ticket_type(channel)
    handled: collections.Counter[int] = collections.Counter()
    total = 30

    async def handle(event: Any) -> None:
        handled[event.n] += 1
        await asyncio.sleep(0.01)

    a: pgbus.Bus = durable_bus(plugin={"batch_size": 5})
    a.subscribe(ticket, durable="fails")(handle)
    await a.start()
    consumer = a.plugins.get("durable").consumers["fails"]
    fetch = consumer._fetch
    failed: list[list[int]] = []

    async def failing(name: str, *, pump: bool) -> Any:
        if consumer._claimed and not failed:  # the claim ahead of the first batch
            failed.append(list(consumer._claimed))
            raise ConnectionResetError("the claim ahead failed")
        return await fetch(name, pump=pump)

    consumer._fetch = failing
    await a.publish_many([ticket(n=i) for i in range(total)])
    await eventually(lambda: len(handled) == total)
    await asyncio.sleep(0.2)
    await a.stop()
    assert failed
    assert handled == dict.fromkeys(range(total), 1)
