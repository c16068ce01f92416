"""Fault 3: the throwaway PostgreSQL cluster restarts while the bus runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from _faults import Receiver, Stream, check_delivery

if TYPE_CHECKING:
    from pgbus.server import StopMode, TempCluster


@pytest.mark.restarts_server
@pytest.mark.parametrize("mode", ["fast", "immediate", "kill"])
async def test_server_restart_during_a_stream(
    cluster: TempCluster, channel: str, mode: StopMode
) -> None:
    """After a restart the bus re-LISTENs by itself; later events all arrive, none twice."""
    receiver = Receiver(cluster.dsn, channel)
    async with receiver.bus, Stream(cluster.dsn, channel) as stream:
        await stream.published_at_least(20)
        cluster.restart(mode)
        await receiver.watch.connects(2)
        await stream.published_after(receiver.watch.connected_at[-1], 20)
        await stream.end([receiver])
    counts = check_delivery(stream, receiver)
    assert receiver.bus.reconnects == 1
    assert counts["after_relisten"] >= 20


@pytest.mark.restarts_server
async def test_server_down_for_a_while(cluster: TempCluster, channel: str) -> None:
    """The bus keeps retrying (backoff) while the server is down and is back once it is up."""
    receiver = Receiver(cluster.dsn, channel, connect_timeout=0.5)
    async with receiver.bus, Stream(cluster.dsn, channel) as stream:
        await stream.published_at_least(10)
        cluster.stop("fast")
        try:
            await stream.wait_failures(3)  # publishes fail meanwhile, with PublishError
            assert receiver.bus.status.state.value == "reconnecting"
            assert not receiver.bus.ready
        finally:
            cluster.start()
        await receiver.watch.connects(2)
        assert receiver.bus.ready
        await stream.published_after(receiver.watch.connected_at[-1], 20)
        await stream.end([receiver])
    check_delivery(stream, receiver)
