"""Fault 2: a TCP proxy between the bus and PostgreSQL cuts, blackholes and delays traffic."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from _faults import Receiver, Stream, check_delivery

if TYPE_CHECKING:
    from _proxy import TcpProxy

    from pgbus.server import TempCluster


@pytest.mark.parametrize("rst", [True, False], ids=["rst", "fin"])
async def test_cut_all_connections_during_a_stream(
    cluster: TempCluster, proxy: TcpProxy, channel: str, rst: bool
) -> None:
    """Cutting every connection (RST or FIN) is noticed at once; later events all arrive."""
    receiver = Receiver(proxy.dsn_for(cluster.dsn), channel)
    async with receiver.bus, Stream(cluster.dsn, channel) as stream:
        await stream.published_at_least(20)
        proxy.cut(rst=rst)
        await receiver.watch.connects(2)
        await stream.published_after(receiver.watch.connected_at[-1], 20)
        await stream.end([receiver])
    counts = check_delivery(stream, receiver)
    assert receiver.bus.reconnects == 1
    assert counts["after_relisten"] >= 20


async def test_blackhole_is_found_by_the_health_check(
    cluster: TempCluster, proxy: TcpProxy, channel: str
) -> None:
    """A half-open connection (no FIN, no RST) is replaced after the health check times out."""
    receiver = Receiver(
        proxy.dsn_for(cluster.dsn),
        channel,
        health_check_interval=0.2,
        health_check_timeout=0.5,
        connect_timeout=0.5,
    )
    async with receiver.bus, Stream(cluster.dsn, channel) as stream:
        await stream.published_at_least(20)
        proxy.blackhole = True
        await receiver.watch.disconnects(1, timeout=10)
        proxy.blackhole = False  # only new connections work again: old ones stay dead
        await receiver.watch.connects(2, timeout=10)
        await stream.published_after(receiver.watch.connected_at[-1], 20)
        await stream.end([receiver])
    check_delivery(stream, receiver)
    assert receiver.bus.reconnects >= 1
    assert "health check" in repr(receiver.bus.status.last_error) or (receiver.bus.reconnects > 1)


async def test_latency_loses_nothing_and_keeps_the_connection(
    cluster: TempCluster, proxy: TcpProxy, channel: str
) -> None:
    """With 50 ms added each way, every event arrives, in order, on the same connection."""
    receiver = Receiver(
        proxy.dsn_for(cluster.dsn), channel, health_check_interval=0.2, health_check_timeout=2
    )
    async with receiver.bus, Stream(cluster.dsn, channel) as stream:
        await stream.published_at_least(10)
        proxy.latency = 0.05
        await stream.published_at_least(len(stream.published) + 50)
        proxy.latency = 0.0
        await stream.end([receiver])
    assert receiver.received == sorted(stream.published)
    assert receiver.bus.reconnects == 0
