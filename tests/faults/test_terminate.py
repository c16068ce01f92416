"""Fault 1: the listener's backend is terminated during a steady stream of events."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import asyncpg
from _faults import Receiver, Stream, check_delivery

if TYPE_CHECKING:
    from pgbus.server import TempCluster


async def test_terminate_listener_backend_during_a_stream(
    cluster: TempCluster, channel: str
) -> None:
    """After pg_terminate_backend the bus re-LISTENs; later events all arrive, none twice."""
    receiver = Receiver(cluster.dsn, channel)
    admin = await asyncpg.connect(cluster.dsn)
    try:
        async with receiver.bus, Stream(cluster.dsn, channel) as stream:
            await stream.published_at_least(20)
            for round_ in range(1, 4):
                pid = receiver.bus.listener_pid
                assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
                await receiver.watch.connects(round_ + 1)
                assert receiver.bus.listener_pid != pid
                await stream.published_after(receiver.watch.connected_at[-1], 20)
            await stream.end([receiver])
            counts = check_delivery(stream, receiver)
            assert receiver.bus.reconnects == 3
            assert counts["after_relisten"] >= 20
    finally:
        await admin.close()


async def test_events_before_the_fault_are_all_received(cluster: TempCluster, channel: str) -> None:
    """Events delivered before the termination stay delivered exactly once."""
    receiver = Receiver(cluster.dsn, channel)
    admin = await asyncpg.connect(cluster.dsn)
    try:
        async with receiver.bus:
            for seq in range(50):
                await receiver.bus.notify(channel, str(seq))
            await receiver.bus.notify(channel, "before")
            await receiver.marker("before")
            await admin.fetchval("SELECT pg_terminate_backend($1)", receiver.bus.listener_pid)
            await receiver.watch.connects(2)
            await receiver.bus.notify(channel, "after")
            await asyncio.wait_for(receiver.marker("after"), 10)
            assert receiver.received == list(range(50))
    finally:
        await admin.close()
