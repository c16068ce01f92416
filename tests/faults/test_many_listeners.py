"""Fault 6: 100 listeners and a publisher while backends die, connections are cut and the
server restarts; each listener's receipts are counted and checked."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import asyncpg
import pytest
from _faults import Receiver, Stream, check_delivery

if TYPE_CHECKING:
    from _proxy import TcpProxy

    from pgbus.server import TempCluster

LISTENERS = 100


@pytest.mark.restarts_server
async def test_100_listeners_through_terminate_cut_and_restart(
    cluster: TempCluster, proxy: TcpProxy, channel: str
) -> None:
    """Every listener recovers from each fault and gets every event published after it."""
    receivers = [
        Receiver(proxy.dsn_for(cluster.dsn), channel, pool_max_size=1) for _ in range(LISTENERS)
    ]
    await asyncio.gather(*(r.bus.start() for r in receivers))
    admin = await asyncpg.connect(cluster.dsn)
    try:
        async with Stream(cluster.dsn, channel, interval=0.01) as stream:
            await stream.published_at_least(10)

            async def recovered(n: int) -> None:
                await asyncio.gather(*(r.watch.connects(n, timeout=60) for r in receivers))
                last = max(r.watch.connected_at[-1] for r in receivers)
                await stream.published_after(last, 10, timeout=30)

            # 1. every listener backend terminated
            pids = [r.bus.listener_pid for r in receivers]
            await admin.fetch("SELECT pg_terminate_backend(p) FROM unnest($1::int[]) p", pids)
            await recovered(2)
            # 2. every connection through the proxy cut
            proxy.cut()
            await recovered(3)
            # 3. the server restarts (the admin connection dies with it)
            await admin.close()
            cluster.restart("fast")
            await recovered(4)
            await stream.end(receivers)
        totals = [check_delivery(stream, r) for r in receivers]
    finally:
        await admin.close()
        await asyncio.gather(*(r.bus.stop() for r in receivers))
    assert all(r.bus.reconnects == 3 for r in receivers)
    assert all(t["after_relisten"] >= 10 for t in totals)
