"""The metrics of durable outcomes: nacks, rejects, retries waiting, events not yet due."""

from __future__ import annotations

import asyncio
from typing import Any

from _helpers import eventually, ticket_type
from rich.console import Console

import pgbus
from pgbus.cli._top import Board


async def test_retries_waiting_and_scheduled_events_reach_every_metrics_output(
    durable_bus, channel
):
    """The snapshot, the published metrics and `pgbus top` show nacks, rejects, the retries
    waiting in the database (delayed) and the events published for later (scheduled); a
    new bus on the same database shows the same backlog from the start."""
    ticket = ticket_type(channel)
    handled = asyncio.Event()

    async def handler(event: Any) -> None:
        if event.n == 1:
            raise pgbus.Nack(delay=3600)
        if event.n == 2:
            raise pgbus.Reject("no such customer")
        handled.set()

    publisher = pgbus.MetricsPublisher(interval=60)
    bus = durable_bus()
    bus.plugins.register(publisher)
    bus.subscribe(ticket, durable="m", name="m")(handler)
    async with bus:
        await bus.publish_many([ticket(n=1), ticket(n=2), ticket(n=3)])
        await bus.publish(ticket(n=4), delay=3600)
        await asyncio.wait_for(handled.wait(), 10)
        await eventually(
            lambda: (
                (
                    bus.metrics.snapshot().subscriptions["m"].delayed,
                    bus.metrics.snapshot().scheduled,
                )
                == (1, 1)
            )
        )
        snap = bus.metrics.snapshot()
        stats = snap.subscriptions["m"]
        assert (stats.nacked, stats.rejected, snap.delayed) == (1, 1, 1)
        published = publisher.snapshot(bus)
    assert published["scheduled"] == 1
    assert {k: published["channels"][channel][k] for k in ("nacked", "rejected", "delayed")} == {
        "nacked": 1,
        "rejected": 1,
        "delayed": 1,
    }
    assert published["subscriptions"]["m"]["delayed"] == 1
    board = Board()
    board.add(published)
    console = Console(record=True, width=200)
    console.print(board.table())
    table = console.export_text()
    assert "nacks" in table
    assert "scheduled" in table
    row = next(line for line in table.splitlines() if channel in line)
    cells = [cell.strip() for cell in row.split("│")]
    assert cells[6:10] == ["1", "1", "1", "1"]  # nacks, rejects, delayed, scheduled

    again = durable_bus()  # another process: the backlog is read from the database
    again.subscribe(ticket, durable="m", name="m")(handler)
    async with again:
        await eventually(
            lambda: (
                (
                    again.metrics.snapshot().subscriptions["m"].delayed,
                    again.metrics.snapshot().scheduled,
                )
                == (1, 1)
            )
        )
