"""Concurrent durable publishes share statements; a failing event fails only its caller."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from _helpers import event_on

import pgbus
import pgbus._publish
from pgbus.durable import DurablePlugin

if TYPE_CHECKING:
    import pytest


async def test_a_failing_event_fails_only_its_caller(
    durable_bus, sql, schema: str, channel: str, monkeypatch: pytest.MonkeyPatch
):
    """Among gathered durable publishes, the one whose id is taken fails; the others land."""
    Ping = event_on(channel)
    ids = iter([f"{i:032x}" for i in range(20)])
    monkeypatch.setattr(pgbus._publish, "new_event_id", lambda: next(ids))
    taken = f"{7:032x}"
    await sql.execute(
        f'INSERT INTO "{schema}".journal (channel, event_id, type, payload)'
        " VALUES ($1, $2, 'Ping', '{}')",
        channel,
        taken,
    )
    bus: pgbus.Bus = durable_bus(plugin={"pool_max_size": 1})
    plugin = bus.plugins.get("durable")
    assert isinstance(plugin, DurablePlugin)
    outcomes = await asyncio.gather(
        *(bus.publish(Ping(n=i)) for i in range(20)), return_exceptions=True
    )
    assert plugin.coalescer.calls == 20
    assert plugin.coalescer.sends < 20
    failure = outcomes[7]
    assert isinstance(failure, pgbus.DuplicateEventId)
    assert failure.event_ids == (taken,)
    assert outcomes[:7] + outcomes[8:] == [f"{i:032x}" for i in range(20) if i != 7]
    count = await sql.fetchval(f'SELECT count(*) FROM "{schema}".journal')
    assert count == 20
