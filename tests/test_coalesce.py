"""Concurrent publishes through the pool share statements."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from _helpers import Collector, event_on

if TYPE_CHECKING:
    import pgbus


async def test_concurrent_publishes_share_statements(make_bus, channel: str):
    """64 concurrent publish() calls on a one-connection pool take fewer than 64 statements,
    and every event arrives."""
    Ping = event_on(channel)
    got = Collector()
    bus: pgbus.Bus = make_bus(pool_max_size=1)
    bus.subscribe(Ping)(got)
    statements: list[str] = []
    async with bus:
        pool = await bus.pool()
        async with pool.acquire() as conn:  # the pool's one connection
            conn.add_query_logger(lambda record: statements.append(record.query))
        await asyncio.gather(*(bus.publish(Ping(n=i)) for i in range(64)))
        await got.wait_for(64)
    assert sorted(e.n for e in got.items) == list(range(64))
    assert len(statements) < 64
