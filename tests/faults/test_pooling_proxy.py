"""A proxy on which LISTEN silently does nothing (transaction pooling) fails start() clearly."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from _faults import Receiver
from _pooler import NotificationDroppingProxy

import pgbus

if TYPE_CHECKING:
    from pgbus.server import TempCluster


async def test_start_fails_when_notifications_never_come_back(
    cluster: TempCluster, channel: str
) -> None:
    """start() names the likely cause (a pooling proxy) instead of listening to nothing."""
    async with NotificationDroppingProxy("127.0.0.1", cluster.port) as pooler:
        receiver = Receiver(
            pooler.dsn_for(cluster.dsn), channel, health_check_timeout=0.5, start_timeout=30
        )
        with pytest.raises(pgbus.ListenerError, match="PgBouncer") as info:
            await asyncio.wait_for(receiver.bus.start(), 10)
        assert "LISTEN does nothing" in str(info.value)
        assert pooler.dropped == 1
        assert receiver.bus.state is pgbus.BusState.STOPPED


async def test_start_succeeds_through_the_same_proxy_code_without_the_fault(
    cluster: TempCluster, channel: str
) -> None:
    """The probe passes when notifications do come back (the proxy itself is not the fault)."""
    async with NotificationDroppingProxy("127.0.0.1", cluster.port) as pooler:
        receiver = Receiver(pooler.dsn_for(cluster.dsn), channel)
        pooler.drop = False
        async with receiver.bus:
            await receiver.bus.notify(channel, "ok")
            await receiver.marker("ok")
