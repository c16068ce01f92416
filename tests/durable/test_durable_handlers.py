"""Handler context and outcomes on durable subscriptions (what needs no durable change)."""

from __future__ import annotations

import asyncio
from typing import Any

from _helpers import Letters, ticket_type

import pgbus


async def test_durable_handler_gets_its_context_and_may_nack(durable_bus, sql, schema, channel):
    """A durable handler sees the event id and attempt; a Nack retries it, then it is done."""
    ticket = ticket_type(channel)
    seen: list[tuple[str | None, int, bool, str]] = []
    done = asyncio.Event()

    async def handler(event: Any, context: pgbus.Context) -> None:
        seen.append((context.id, context.attempt, context.redelivered, context.subscription))
        if context.attempt == 1:
            raise pgbus.Nack(delay=0.01)
        done.set()

    bus: pgbus.Bus = durable_bus()
    bus.subscribe(ticket, durable="ctx", name="ctx")(handler)
    async with bus:
        event_id = await bus.publish(ticket(n=1))
        await asyncio.wait_for(done.wait(), 10)
    assert seen == [(event_id, 1, False, "ctx"), (event_id, 2, True, "ctx")]
    assert await sql.fetchval(f'SELECT count(*) FROM "{schema}".dead_letters') == 0


async def test_durable_reject_is_a_dead_letter_row_after_one_attempt(
    durable_bus, sql, schema, channel
):
    """Reject in a durable handler stores one dead letter, after one attempt, and moves on."""
    ticket = ticket_type(channel)
    letters = Letters()

    async def handler(event: Any) -> None:
        raise pgbus.Reject("unknown customer")

    bus: pgbus.Bus = durable_bus()
    bus.plugins.register(letters)
    bus.subscribe(ticket, durable="rj", retry=pgbus.Retry(attempts=5, backoff=0))(handler)
    async with bus:
        await bus.publish(ticket(n=1))
        letter = await letters.next()
        assert isinstance(letter.error, pgbus.Reject)
    row = await sql.fetchrow(f'SELECT attempts, error FROM "{schema}".dead_letters')
    assert row["attempts"] == 1
    assert "unknown customer" in row["error"]
